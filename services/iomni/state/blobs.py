"""Media bytes and media embeddings in Redis, for the engine's `MediaStore` / `EmbeddingCache`.

Both are plain caches: a miss is never an error (the engine re-encodes, or asks the user to send
the media again), oversize values are skipped, and every entry has a TTL that a hit refreshes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from iomni import background
from iomni.errors import InvalidInput
from iomni.state.connection import guarded
from iomni.state.keys import embedding_key, media_key

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_TENSOR_NAME = "embeddings"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RedisMediaStore:
    """Raw media by SHA-256 of their bytes. `scope` (e.g. the tenant) keeps tenants apart;
    without it identical bytes are shared, which is safe only because a hash implies the bytes.
    """

    def __init__(
        self, redis: aioredis.Redis, *, ttl_s: int, max_bytes: int, scope: str = ""
    ) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.scope = scope
        media_key(scope, "0")  # validates the scope now, not on the first put

    @guarded
    async def get(self, sha256: str) -> bytes | None:
        return await self.redis.getex(media_key(self.scope, sha256), ex=self.ttl_s)

    @guarded
    async def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            log.info(
                "media %s is %d bytes, over the %d cap; not stored",
                sha256[:12],
                len(data),
                self.max_bytes,
            )
            return
        # A wrong hash would poison every later turn that names it: check before storing.
        actual = await background.run_if_large(len(data), _sha256, data)
        if actual != sha256:
            raise InvalidInput(f"media bytes hash to {actual[:12]}…, not {sha256[:12]}…")
        key = media_key(self.scope, sha256)
        # Content-addressed: when the blob is already there, refreshing its TTL is enough and
        # saves sending up to max_bytes again.
        if not await self.redis.expire(key, self.ttl_s):
            await self.redis.set(key, data, ex=self.ttl_s)

    @guarded
    async def touch(self, sha256s: Sequence[str]) -> None:
        """Refresh the TTL of blobs a session still uses (one round trip): their embeddings
        were cached, so nothing read them; expired, the next turn that needed them re-encoded
        would fail with NOT_FOUND."""
        if not sha256s:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for sha256 in sha256s:
                pipe.expire(media_key(self.scope, sha256), self.ttl_s)
            await pipe.execute()


class RedisEmbeddingCache:
    """Encoded media rows as safetensors bytes. Tensors come back on the CPU."""

    def __init__(
        self, redis: aioredis.Redis, *, ttl_s: int, max_bytes: int, scope: str = ""
    ) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.scope = scope
        embedding_key(scope, "0")
        self.hits = self.misses = 0

    @guarded
    async def get(self, key: str) -> torch.Tensor | None:
        blob = await self.redis.getex(embedding_key(self.scope, key), ex=self.ttl_s)
        if blob is None:
            self.misses += 1
            return None
        try:
            value = await background.run_if_large(len(blob), _load, blob)
        except Exception:  # a corrupt entry is a miss; the engine re-encodes and overwrites it
            log.warning("embedding %s in Redis is corrupt; treating it as a miss", key)
            self.misses += 1
            return None
        self.hits += 1
        return value

    @guarded
    async def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            log.info(
                "embedding %s is %d bytes, over the %d cap; not cached", key, size, self.max_bytes
            )
            return
        blob = await background.run_if_large(size, _save, value)
        await self.redis.set(embedding_key(self.scope, key), blob, ex=self.ttl_s)


def _save(value: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({_TENSOR_NAME: value.detach().to("cpu").contiguous()})


def _load(blob: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(blob)[_TENSOR_NAME]
