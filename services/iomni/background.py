"""Bulk CPU work off the event loop, at a lower CPU priority than the conversation.

Decoding an uploaded image or video and packing its tiles is throughput work: it can wait a
few milliseconds. Audio already playing cannot. Threads of this pool run at `niceness` above
the process (Linux applies nice per thread), so when the cores are saturated the kernel gives
the time to the turns streaming audio and the media decoding takes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

NICENESS = 10  # above the process's own: CFS weight 110 vs 1024, a tenth of a contended core
# Bytes of a message whose hashing and copying stay on the event loop (1 MiB: about 0.6 ms on
# one core of the CI host); beyond, a 32 MiB upload held every stream of the loop for 20 ms.
LOOP_BYTES = 1 << 20

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _lower_thread(tid: int, niceness: int) -> None:
    lower = min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
    os.setpriority(os.PRIO_PROCESS, tid, lower)


def _lower_priority() -> None:
    # Not Linux, or not permitted: the pool runs at normal priority.
    with contextlib.suppress(OSError, AttributeError):
        _lower_thread(threading.get_native_id(), NICENESS)


def lower_process_priority(niceness: int) -> None:
    """Every thread of this process (and those it starts later) `niceness` steps lower: for a
    Triton stub whose work is throughput, not a stream someone is listening to."""
    if niceness <= 0:
        return
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            _lower_thread(int(task), niceness)


def pool() -> ThreadPoolExecutor:
    """The process's media pool: bounded to the cores, created on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2,
                thread_name_prefix="iomni-media",
                initializer=_lower_priority,
            )
        return _pool


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`asyncio.to_thread`, on the low-priority media pool."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool(), call)


async def run_if_large(size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn` on the event loop for a message of `size` bytes at most `LOOP_BYTES` (the hop to the
    pool, at its lower priority, would cost more), else on the media pool."""
    if size <= LOOP_BYTES:
        return fn(*args, **kwargs)
    return await run(fn, *args, **kwargs)
