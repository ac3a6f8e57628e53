"""Which `llm` replica serves a session: the one holding its KV cache, while it exists.

Replicas come from a static list (outside Kubernetes) or from the EndpointSlices of the
headless `llm` Service. A session without affinity, or whose replica is gone, is placed on a
rendezvous-hash choice and the choice is stored in Redis so every gateway agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from iomni.errors import Unavailable


class AffinityStore(Protocol):
    async def get_affinity(self, session_id: str) -> str | None: ...

    async def set_affinity(self, session_id: str, replica: str) -> None: ...


def rendezvous(session_id: str, replicas: Sequence[str]) -> str:
    """Highest-random-weight choice: stable, and only 1/n of sessions move when n changes."""
    return max(replicas, key=lambda r: hashlib.sha256(f"{session_id}|{r}".encode()).digest())


class AffinityRouter:
    def __init__(self, store: AffinityStore, replicas: Sequence[str], on_result=None) -> None:  # type: ignore[no-untyped-def]
        self.store = store
        self.replicas = list(replicas)
        self.on_result = on_result or (lambda result: None)

    def update(self, replicas: Sequence[str]) -> None:
        self.replicas = list(replicas)

    async def route(self, session_id: str) -> str:
        if not self.replicas:
            raise Unavailable("no ready llm replica is known (EndpointSlices empty?)")
        if session_id:
            held = await self.store.get_affinity(session_id)
            if held in self.replicas:
                self.on_result("hit")
                return held
        choice = rendezvous(session_id or "-", self.replicas)
        self.on_result("miss")
        if session_id:
            await self.store.set_affinity(session_id, choice)
        return choice
