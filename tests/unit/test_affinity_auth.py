"""KV-affinity routing and API-key authentication, without servers."""

from __future__ import annotations

import pytest

from iomni.gateway.auth import Tenants, Unauthenticated, key_hash
from iomni.runtime.affinity import AffinityRouter, rendezvous


class MemoryAffinity:
    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    async def get_affinity(self, session_id: str) -> str | None:
        return self.held.get(session_id)

    async def set_affinity(self, session_id: str, replica: str) -> None:
        self.held[session_id] = replica


async def test_router_keeps_a_session_on_its_replica_and_falls_back_when_gone() -> None:
    results: list[str] = []
    store = MemoryAffinity()
    router = AffinityRouter(store, ["a:8001", "b:8001", "c:8001"], on_result=results.append)
    first = await router.route("s1")
    assert await router.route("s1") == first
    assert results == ["miss", "hit"]
    router.update([r for r in ["a:8001", "b:8001", "c:8001"] if r != first])
    moved = await router.route("s1")
    assert moved != first and store.held["s1"] == moved and results[-1] == "miss"


def test_rendezvous_moves_few_sessions_when_a_replica_is_added() -> None:
    sessions = [f"s{i}" for i in range(300)]
    before = {s: rendezvous(s, ["a", "b", "c"]) for s in sessions}
    after = {s: rendezvous(s, ["a", "b", "c", "d"]) for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert all(after[s] == "d" for s in moved)
    assert 30 < len(moved) < 120  # about a quarter


def test_api_keys() -> None:
    tenants = Tenants({key_hash("k1"): "acme"})
    assert tenants.authenticate([("authorization", "Bearer k1")]) == "acme"
    assert tenants.authenticate([("x-api-key", b"k1")]) == "acme"
    with pytest.raises(Unauthenticated, match="missing"):
        tenants.authenticate([])
    with pytest.raises(Unauthenticated, match="invalid"):
        tenants.authenticate([("authorization", "Bearer nope")])
