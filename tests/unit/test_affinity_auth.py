"""KV-affinity routing and API-key authentication, without servers."""

from __future__ import annotations

import pytest

from iomni.auth import Tenants, Unauthenticated, key_hash
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


def _write_tenants(path, entries) -> None:  # type: ignore[no-untyped-def]
    import json

    path.write_text(json.dumps({"tenants": entries}))


def test_a_key_removed_from_the_tenants_file_stops_working_without_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tenants.json"
    _write_tenants(path, [{"name": "acme", "api_key_sha256": [key_hash("k1"), key_hash("k2")]}])
    tenants = Tenants.from_file(path, reload_s=0)
    assert tenants.authenticate([("authorization", "Bearer k2")]) == "acme"
    _write_tenants(path, [{"name": "acme", "api_key_sha256": [key_hash("k1")]}])
    with pytest.raises(Unauthenticated, match="invalid"):
        tenants.authenticate([("authorization", "Bearer k2")])
    assert tenants.authenticate([("authorization", "Bearer k1")]) == "acme"
    path.write_text("{not json")  # a broken edit keeps the last good file in force
    assert tenants.authenticate([("authorization", "Bearer k1")]) == "acme"


def test_keys_expire(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import time

    path = tmp_path / "tenants.json"
    keys = [
        {"sha256": key_hash("old"), "expires_at": time.time() - 1},
        {"sha256": key_hash("new"), "expires_at": time.time() + 3600},
    ]
    _write_tenants(path, [{"name": "trial", "api_keys": keys}])
    tenants = Tenants.from_file(path)
    assert tenants.authenticate([("x-api-key", "new")]) == "trial"
    with pytest.raises(Unauthenticated, match="expired"):
        tenants.authenticate([("x-api-key", "old")])


def test_binary_headers_are_not_read_and_a_non_ascii_key_is_invalid_input() -> None:
    from iomni.errors import InvalidInput

    tenants = Tenants({key_hash("k1"): "acme"})
    metadata = [("trace-bin", b"\xff\x00\xfe"), ("authorization", "Bearer k1")]
    assert tenants.authenticate(metadata) == "acme"
    with pytest.raises(InvalidInput, match="ASCII"):
        tenants.authenticate([("authorization", b"Bearer \xff")])
