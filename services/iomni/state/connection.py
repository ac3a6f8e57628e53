"""Turning redis-py failures into the project's errors, naming the server that failed."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex

from iomni.errors import Internal, Unavailable

P = ParamSpec("P")
R = TypeVar("R")


class HasRedis(Protocol):
    redis: aioredis.Redis


def address(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


@contextmanager
def redis_errors(client: aioredis.Redis) -> Iterator[None]:
    """Map redis-py exceptions to `Unavailable` (retryable) or `Internal` (a bug or bad data)."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, TimeoutError, ConnectionError) as exc:
        # BusyLoadingError (replaying the AOF after a restart) is a ConnectionError too.
        raise Unavailable(f"Redis at {address(client)} is unreachable: {exc}") from exc
    except rex.ReadOnlyError as exc:  # a failover is in progress; the new primary will take it
        raise Unavailable(f"Redis at {address(client)} is read-only right now: {exc}") from exc
    except rex.ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise Unavailable(f"Redis at {address(client)} is out of memory: {exc}") from exc
        raise Internal(f"Redis at {address(client)} rejected a command: {exc}") from exc
    except rex.RedisError as exc:
        raise Internal(f"Redis at {address(client)} failed: {exc}") from exc


S = TypeVar("S", bound=HasRedis)


def guarded(
    method: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Awaitable[R]]:
    """Decorator for async methods of objects with a `redis` attribute."""

    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        with redis_errors(self.redis):
            return await method(self, *args, **kwargs)

    return wrapper


def text(value: Any) -> str:
    """Replies arrive as bytes (the client must not decode: media are binary)."""
    return value.decode() if isinstance(value, bytes) else str(value)
