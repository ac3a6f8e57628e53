"""Where media lives between turns: raw bytes by content hash, and their encoded embeddings.

A turn's prompt contains every earlier image and clip of the session, so their embeddings are
cached by content hash (scoped to the model that made them) to avoid re-encoding each turn.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file


class EmbeddingCache(Protocol):
    async def get(self, key: str) -> torch.Tensor | None: ...

    async def put(self, key: str, value: torch.Tensor) -> None: ...


class MediaStore(Protocol):
    async def get(self, sha256: str) -> bytes | None: ...

    async def put(self, sha256: str, data: bytes) -> None: ...

    async def touch(self, sha256s: Sequence[str]) -> None:
        """Keep these blobs as long as a new one: a session still uses them (their
        embeddings were cached, so nothing read the bytes)."""


def embedding_key(model_id: str, kind: str, sha256: str, variant: str = "") -> str:
    return f"{model_id}:{kind}:{sha256}:{variant}"


class MemoryEmbeddingCache:
    """LRU bounded by total bytes."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    async def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    async def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()


class MemoryMediaStore:
    """The embedded default: least recently used blobs evicted beyond `max_bytes` in all."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    async def get(self, sha256: str) -> bytes | None:
        data = self._blobs.get(sha256)
        if data is not None:
            self._blobs.move_to_end(sha256)
        return data

    async def put(self, sha256: str, data: bytes) -> None:
        if sha256 in self._blobs:
            self._blobs.move_to_end(sha256)
            return
        if len(data) > self.max_bytes:
            return
        self._blobs[sha256] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._blobs.popitem(last=False)
            self._bytes -= len(evicted)

    async def touch(self, sha256s: Sequence[str]) -> None:
        for sha256 in sha256s:
            if sha256 in self._blobs:
                self._blobs.move_to_end(sha256)


class DirectoryMediaStore:
    """Blobs as files named by hash; used by the CLI's session files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def get(self, sha256: str) -> bytes | None:
        path = self.root / sha256
        return path.read_bytes() if path.exists() else None

    async def put(self, sha256: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / sha256
        if not path.exists():
            temp = path.with_suffix(".tmp")
            temp.write_bytes(data)
            temp.replace(path)

    async def touch(self, sha256s: Sequence[str]) -> None:
        """Files do not expire."""


class DirectoryEmbeddingCache:
    """Embeddings as safetensors files; survives between CLI runs of one session."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / (key.replace(":", "_") + ".safetensors")

    async def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return load_file(str(path))["embeddings"]
        except Exception:  # a torn file is just a miss; it is rewritten below
            return None

    async def put(self, key: str, value: torch.Tensor) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        temp = path.with_suffix(".tmp")
        save_file({"embeddings": value.contiguous()}, str(temp))
        temp.replace(path)
