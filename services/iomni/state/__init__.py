"""The gateway's dialogue state in Redis: sessions, leases, turn records, media, affinity.

See docs/state.md for the key layout and the guarantees.
"""

from iomni.state.blobs import RedisEmbeddingCache, RedisMediaStore
from iomni.state.keys import PREFIX
from iomni.state.redis_store import DialogueState
from iomni.state.types import Lease, LeaseLost, SessionBusy, SessionInfo, TurnRecord, TurnState

__all__ = [
    "PREFIX",
    "DialogueState",
    "Lease",
    "LeaseLost",
    "RedisEmbeddingCache",
    "RedisMediaStore",
    "SessionBusy",
    "SessionInfo",
    "TurnRecord",
    "TurnState",
]
