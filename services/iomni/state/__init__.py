"""Dialogue state in Redis: the turn core's `DialogueStore` (sessions, leases, turn records),
the media and embedding caches, llm affinity and the Kafka published marks.

See docs/state.md for the key layout and the guarantees.
"""

from iomni.state.blobs import RedisEmbeddingCache, RedisMediaStore
from iomni.state.keys import PREFIX
from iomni.state.redis_store import DialogueState

__all__ = ["PREFIX", "DialogueState", "RedisEmbeddingCache", "RedisMediaStore"]
