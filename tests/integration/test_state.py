"""`iomni.state` against a real redis-server: sessions, leases, atomic commits, media, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from iomni.errors import (
    ErrorCode,
    Internal,
    InvalidInput,
    LeaseLost,
    NotFound,
    SessionBusy,
    Unavailable,
)
from iomni.model.conversation import MediaPart, Message, TextPart, content_hash
from iomni.state import PREFIX, DialogueState
from iomni.turns.store import Lease, TurnRecord
from tests.integration.redis_fixture import RedisServer, free_port

USER = Message("user", (TextPart("What is this?"), MediaPart("image", "a" * 64)))
ASSISTANT = Message("assistant", (TextPart("A cat."),))
SERVICES = Path(__file__).resolve().parents[2] / "services"
RESULT = {"stop_reason": "eos", "usage": {"prompt_tokens": 12, "completion_tokens": 3}}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def state(redis_server: RedisServer) -> AsyncIterator[DialogueState]:
    async with DialogueState.from_url(redis_server.url) as store:
        await store.redis.flushall()
        yield store


@pytest.fixture
async def short_state(redis_server: RedisServer) -> AsyncIterator[DialogueState]:
    """Leases of 300 ms, so expiry can be watched."""
    async with DialogueState.from_url(redis_server.url, lease_ttl_ms=300) as store:
        await store.redis.flushall()
        yield store


async def one_turn(state: DialogueState, session_id: str, turn_id: str) -> Lease:
    lease = await state.acquire_lease(session_id, "gw-1", turn_id)
    assert await state.begin_turn(lease, turn_id) is None
    await state.commit_turn(lease, turn_id, USER, ASSISTANT, RESULT)
    await state.release_lease(lease)
    return lease


async def session_keys(state: DialogueState, session_id: str) -> list[bytes]:
    return await state.redis.keys(f"{PREFIX}session:{{{session_id}}}*")


# -- sessions -----------------------------------------------------------------------------------


async def test_session_lifecycle(state: DialogueState) -> None:
    info = await state.create_session("acme", "s1", {"voice": "default"})
    assert (info.session_id, info.tenant, info.turns) == ("s1", "acme", 0)
    assert info.metadata == {"voice": "default"}
    assert abs(info.created_at - time.time()) < 5
    # Same tenant, same id: the existing session, metadata untouched.
    again = await state.create_session("acme", "s1", {"voice": "other"})
    assert again == info
    assert await state.get_session("acme", "s1") == info
    assert await state.history("acme", "s1") == []

    await one_turn(state, "s1", "t1")
    await state.set_affinity("s1", "llm-0")
    assert await state.history("acme", "s1") == [USER, ASSISTANT]
    assert (await state.get_session("acme", "s1")).turns == 1
    assert all(k.startswith(PREFIX.encode()) for k in await state.redis.keys("*"))

    assert await state.delete_session("acme", "s1") is True
    assert await session_keys(state, "s1") == []  # history, meta, fence, records, affinity
    for call in (state.get_session("acme", "s1"), state.history("acme", "s1")):
        with pytest.raises(NotFound, match="session s1 not found"):
            await call
    with pytest.raises(NotFound):
        await state.delete_session("acme", "s1")
    assert await state.delete_session("acme", "s1", missing_ok=True) is False


async def test_generated_ids_and_bad_ids(state: DialogueState) -> None:
    a = await state.create_session("acme")
    b = await state.create_session("acme")
    assert len(a.session_id) == 32 and a.session_id != b.session_id
    with pytest.raises(InvalidInput):
        await state.create_session("acme", "{slot}")
    with pytest.raises(InvalidInput):
        await state.create_session("", "s1")
    with pytest.raises(NotFound, match="not found"):  # an id we never issue cannot exist
        await state.get_session("acme", "has space")


async def test_other_tenant_sees_not_found(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    await one_turn(state, "s1", "t1")
    with pytest.raises(NotFound) as missing:
        await state.get_session("acme", "nope")
    calls = [
        state.get_session("globex", "s1"),
        state.history("globex", "s1"),
        state.delete_session("globex", "s1"),
        state.create_session("globex", "s1"),
        state.turn_record("globex", "s1", "t1"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as other:
            await call
        # Word for word what a missing session says: nothing leaks across tenants.
        assert str(other.value) == str(missing.value).replace("nope", "s1")
    assert await state.delete_session("globex", "s1", missing_ok=True) is False
    assert len(await state.history("acme", "s1")) == 2  # untouched


async def test_use_refreshes_session_ttl(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    await one_turn(state, "s1", "t1")
    keys = state._keys("s1")
    for key in (keys.meta, keys.history, keys.fence, keys.turns):
        assert 0 < await state.redis.ttl(key) <= state.session_ttl_s
        await state.redis.expire(key, 5)
    await state.get_session("acme", "s1")
    for key in (keys.meta, keys.history, keys.fence, keys.turns):
        assert await state.redis.ttl(key) > state.session_ttl_s - 5


# -- leases -------------------------------------------------------------------------------------


async def test_lease_is_exclusive(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    first = await state.acquire_lease("s1", "gw-1", "turn-a")
    assert first.turn_id == "turn-a" and first.expires_at > time.time()
    with pytest.raises(SessionBusy, match="session s1 is busy with turn turn-a; wait") as busy:
        await state.acquire_lease("s1", "gw-2", "turn-b")
    assert busy.value.code is ErrorCode.SESSION_BUSY
    with pytest.raises(SessionBusy):  # one gateway must not run two turns of a session either
        await state.acquire_lease("s1", "gw-1", "turn-b")
    await state.renew_lease(first)
    await state.release_lease(first)
    second = await state.acquire_lease("s1", "gw-2", "turn-b")
    assert second.token > first.token
    await state.release_lease(first)  # stale: must not free the new holder
    with pytest.raises(SessionBusy, match="turn-b"):
        await state.acquire_lease("s1", "gw-3", "turn-c")
    with pytest.raises(NotFound):
        await state.acquire_lease("nope", "gw-1", "turn-a")


CRASHING_GATEWAY = textwrap.dedent(
    """
    import asyncio, sys, time
    from iomni.state import DialogueState

    async def main():
        state = DialogueState.from_url(sys.argv[1], lease_ttl_ms=1000)
        lease = await state.acquire_lease("s1", "gw-dead", "turn-a")
        await state.begin_turn(lease, "turn-a")
        print(lease.token, flush=True)
        time.sleep(60)  # mid-turn, until SIGKILL

    asyncio.run(main())
    """
)


async def test_lease_expires_after_sigkill(short_state: DialogueState, redis_server) -> None:
    state = short_state
    await state.create_session("acme", "s1")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_GATEWAY,
        redis_server.url,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(SERVICES)},
    )
    try:
        dead_token = int(await asyncio.wait_for(child.stdout.readline(), 20))  # type: ignore[union-attr]
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 10)
        killed_at = time.monotonic()
        with pytest.raises(SessionBusy, match="turn-a"):
            await state.acquire_lease("s1", "gw-2", "turn-b")
        running = await state.turn_record("acme", "s1", "turn-a")
        assert running == TurnRecord("turn-a", "running", {})
        while True:
            try:
                lease = await state.acquire_lease("s1", "gw-2", "turn-b")
                break
            except SessionBusy:
                assert time.monotonic() - killed_at < 3, "the dead lease never expired"
                await asyncio.sleep(0.05)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert lease.token > dead_token
    # The crashed turn's "running" record expired with its lease.
    assert await state.turn_record("acme", "s1", "turn-a") is None


async def test_stale_token_cannot_write(short_state: DialogueState) -> None:
    state = short_state
    await state.create_session("acme", "s1")
    stale = await state.acquire_lease("s1", "gw-1", "turn-a")
    assert await state.begin_turn(stale, "turn-a") is None
    await asyncio.sleep(0.4)  # gw-1 stalls past its lease
    fresh = await state.acquire_lease("s1", "gw-2", "turn-b")
    with pytest.raises(LeaseLost, match="no longer held.*turn turn-b holds it") as lost:
        await state.commit_turn(stale, "turn-a", USER, ASSISTANT, RESULT)
    assert lost.value.code is ErrorCode.LEASE_LOST
    for call in (state.renew_lease(stale), state.begin_turn(stale, "turn-a")):
        with pytest.raises(LeaseLost):
            await call
    assert await state.history("acme", "s1") == []
    assert (await state.get_session("acme", "s1")).turns == 0
    assert await state.turn_record("acme", "s1", "turn-a") is None
    await state.commit_turn(fresh, "turn-b", USER, ASSISTANT, RESULT)
    assert len(await state.history("acme", "s1")) == 2


async def test_renew_keeps_lease_and_running_record(short_state: DialogueState) -> None:
    state = short_state
    await state.create_session("acme", "s1")
    lease = await state.acquire_lease("s1", "gw-1", "turn-a")
    await state.begin_turn(lease, "turn-a")
    for _ in range(6):  # 0.6 s in all: twice the TTL
        await asyncio.sleep(0.1)
        await state.renew_lease(lease)
    assert lease.expires_at > time.time()
    assert (await state.turn_record("acme", "s1", "turn-a")).state == "running"  # type: ignore[union-attr]
    await state.commit_turn(lease, "turn-a", USER, ASSISTANT, RESULT)


# -- turns --------------------------------------------------------------------------------------


async def test_commit_is_all_or_nothing(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    await one_turn(state, "s1", "t1")
    lease = await state.acquire_lease("s1", "gw-1", "t2")
    assert await state.begin_turn(lease, "t2") is None
    await state.commit_turn(lease, "t2", USER, ASSISTANT, {"n": 2})
    await state.release_lease(lease)
    assert await state.history("acme", "s1") == [USER, ASSISTANT] * 2
    assert (await state.get_session("acme", "s1")).turns == 2
    assert await state.turn_record("acme", "s1", "t2") == TurnRecord("t2", "done", {"n": 2})
    record_ttl = await state.redis.ttl(state._keys("s1").record("t2"))
    assert state.turn_record_ttl_s - 5 < record_ttl <= state.turn_record_ttl_s

    # A write that fails on the server (here: history is not a list) leaves nothing half-done.
    keys = state._keys("s1")
    saved = await state.redis.dump(keys.history)
    await state.redis.delete(keys.history)
    await state.redis.set(keys.history, "not a list")
    lease3 = await state.acquire_lease("s1", "gw-1", "t3")
    await state.begin_turn(lease3, "t3")
    with pytest.raises(Internal, match="WRONGTYPE"):
        await state.commit_turn(lease3, "t3", USER, ASSISTANT, {"n": 3})
    assert (await state.get_session("acme", "s1")).turns == 2
    assert (await state.turn_record("acme", "s1", "t3")).state == "running"  # type: ignore[union-attr]
    await state.redis.delete(keys.history)
    await state.redis.restore(keys.history, 0, saved)
    assert len(await state.history("acme", "s1")) == 4


async def test_begin_turn_is_idempotent(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    assert await state.turn_record("acme", "s1", "t1") is None
    lease = await state.acquire_lease("s1", "gw-1", "t1")
    assert await state.begin_turn(lease, "t1") is None
    running_ttl = await state.redis.pttl(state._keys("s1").record("t1"))
    assert 0 < running_ttl <= state.lease_ttl_ms  # a crashed gateway's record expires with it
    await state.commit_turn(lease, "t1", USER, ASSISTANT, RESULT)
    await state.commit_turn(lease, "t1", USER, ASSISTANT, {"other": True})  # no-op
    await state.release_lease(lease)

    # The client retries t1 (say through another gateway): the stored result, no second run.
    retry = await state.acquire_lease("s1", "gw-2", "t1")
    assert await state.begin_turn(retry, "t1") == TurnRecord("t1", "done", RESULT)
    await state.release_lease(retry)
    assert await state.turn_record("acme", "s1", "t1") == TurnRecord("t1", "done", RESULT)
    assert len(await state.history("acme", "s1")) == 2
    assert (await state.get_session("acme", "s1")).turns == 1

    fresh = await state.acquire_lease("s1", "gw-2", "t2")
    assert await state.begin_turn(fresh, "t2") is None
    await state.release_lease(fresh)  # ended without a commit: no "running" record left
    assert await state.turn_record("acme", "s1", "t2") is None


# -- media, embeddings, affinity ----------------------------------------------------------------


async def test_media_store(redis_server: RedisServer) -> None:
    async with DialogueState.from_url(redis_server.url, max_media_bytes=1000) as state:
        store = state.media_store()
        data = b"\x89PNG" + bytes(range(256))
        sha = content_hash(data)
        assert await store.get(sha) is None
        await store.put(sha, data)
        await store.put(sha, data)  # already there: only the TTL is refreshed
        assert await store.get(sha) == data
        key = f"{PREFIX}media:shared:{sha}"
        await state.redis.expire(key, 5)
        assert await store.get(sha) == data
        assert await state.redis.ttl(key) > state.media_ttl_s - 5  # a hit refreshes the TTL
        await state.redis.expire(key, 5)
        await store.touch([sha, "c" * 64])  # a session still uses it; an unknown one is no error
        assert await state.redis.ttl(key) > state.media_ttl_s - 5

        big = bytes(1001)
        await store.put(content_hash(big), big)  # over the cap: skipped, not an error
        assert await store.get(content_hash(big)) is None
        with pytest.raises(InvalidInput, match="hash to"):
            await store.put("b" * 64, data)
        # A tenant-scoped store does not see shared (or other tenants') blobs.
        assert await state.media_store("acme").get(sha) is None


async def test_embedding_cache(redis_server: RedisServer) -> None:
    async with DialogueState.from_url(redis_server.url, max_embedding_bytes=4096) as state:
        cache = state.embedding_cache()
        rows = torch.randn(7, 64).to(torch.bfloat16)
        assert await cache.get("m:image:abc:") is None
        await cache.put("m:image:abc:", rows)
        got = await cache.get("m:image:abc:")
        assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got, rows)
        ttl = await state.redis.ttl(f"{PREFIX}emb:shared:m:image:abc:")
        assert state.embedding_ttl_s - 5 < ttl <= state.embedding_ttl_s
        await cache.put("m:image:big:", torch.zeros(1025, dtype=torch.float32))  # 4100 bytes
        assert await cache.get("m:image:big:") is None
        await state.redis.set(f"{PREFIX}emb:shared:m:image:bad:", b"torn")
        assert await cache.get("m:image:bad:") is None  # corrupt entry: a miss, not an error


async def test_affinity(state: DialogueState) -> None:
    assert await state.get_affinity("s1") is None
    await state.set_affinity("s1", "llm-2")
    assert await state.get_affinity("s1") == "llm-2"
    ttl = await state.redis.ttl(state._keys("s1").affinity)
    assert state.session_ttl_s - 5 < ttl <= state.session_ttl_s


# -- Redis itself -------------------------------------------------------------------------------


async def test_history_survives_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        async with DialogueState.from_url(server.url) as state:
            await state.create_session("acme", "s1")
            first = await one_turn(state, "s1", "t1")
        server.stop()  # SIGTERM: AOF flushed
        server.start()  # same --dir and port: the AOF is replayed
        async with DialogueState.from_url(server.url) as state:
            # The script cache is empty after a restart; EVALSHA falls back to loading it.
            assert await state.history("acme", "s1") == [USER, ASSISTANT]
            assert (await state.get_session("acme", "s1")).turns == 1
            assert (await state.turn_record("acme", "s1", "t1")).state == "done"  # type: ignore[union-attr]
            second = await one_turn(state, "s1", "t2")
            assert second.token > first.token
    finally:
        server.stop()


async def test_unavailable_names_the_server() -> None:
    port = free_port()  # nothing listens here
    async with DialogueState.from_url(f"redis://127.0.0.1:{port}/0") as state:
        message = f"Redis at 127.0.0.1:{port}/0 is unreachable"
        with pytest.raises(Unavailable, match=message):
            await state.ping()
        with pytest.raises(Unavailable, match=message):
            await state.create_session("acme", "s1")
        with pytest.raises(Unavailable, match=message):
            await state.media_store().get("a" * 64)


async def test_concurrent_acquires_one_winner(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    results = await asyncio.gather(
        *(state.acquire_lease("s1", f"gw-{i}", f"turn-{i}") for i in range(20)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1
    assert all(isinstance(r, SessionBusy) for r in results if r is not winners[0])


async def test_delete_mid_turn_voids_the_lease(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    lease = await state.acquire_lease("s1", "gw-1", "t1")
    await state.begin_turn(lease, "t1")
    assert await state.delete_session("acme", "s1")
    with pytest.raises(LeaseLost):
        await state.commit_turn(lease, "t1", USER, ASSISTANT, RESULT)
    await state.release_lease(lease)
    assert await session_keys(state, "s1") == []
    # The id comes back: tokens still rise (they follow the clock), the old lease stays dead.
    await state.create_session("acme", "s1")
    again = await state.acquire_lease("s1", "gw-2", "t1")
    assert again.token > lease.token
    with pytest.raises(LeaseLost):
        await state.commit_turn(lease, "t1", USER, ASSISTANT, RESULT)
    assert await state.redis.hget(state._keys("s1").lease, "token") == str(again.token).encode()


async def test_engine_turns_over_redis(state: DialogueState, tiny, processor) -> None:
    """Two turns through the real `TurnRunner` on the Redis store: turn 2 reuses turn 1's
    embedding from Redis, the history is committed, and a retried turn id is replayed."""
    from iomni.engine.parts import InProcessParts
    from iomni.engine.turn import TurnEngine
    from iomni.model.sampling import SamplingParams
    from iomni.turns.runner import TurnFinished, TurnInput, TurnRunner
    from tests.conftest import png_bytes

    engine = TurnEngine(
        InProcessParts(tiny), processor, state.embedding_cache("acme"), state.media_store("acme")
    )
    runner = TurnRunner(engine, state, "gw-1")
    await state.create_session("acme", "s1")
    image = MediaPart.from_bytes("image", png_bytes(64, 48))
    params = SamplingParams(temperature=0, max_new_tokens=4)
    finished: list[TurnFinished] = []

    async def collect(output) -> None:  # type: ignore[no-untyped-def]
        if isinstance(output, TurnFinished):
            finished.append(output)

    for turn_id, parts in (("t1", (image, TextPart("What is it?"))), ("t2", (TextPart("Sure?"),))):
        turn = TurnInput("acme", "s1", turn_id, Message("user", parts), params)
        await runner.run(turn, collect)
    assert finished[0].usage.media_cache_hits == 0
    assert finished[1].usage.media_cache_hits == 1
    history = await state.history("acme", "s1")
    assert [m.role for m in history] == ["user", "assistant"] * 2
    assert history[1].text == finished[0].text and history[3].text == finished[1].text
    assert history[0].media[0].sha256 == image.sha256 and history[0].media[0].data is None
    assert await state.media_store("acme").get(image.sha256) == image.data
    # The lease is free again and a retried turn id answers from the stored result.
    await runner.run(TurnInput("acme", "s1", "t1", Message("user", parts), params), collect)
    assert finished[-1].replayed and finished[-1].text == finished[0].text
    assert len(await state.history("acme", "s1")) == 4


async def test_truncate_reply_cuts_the_stored_reply_of_a_done_turn(state: DialogueState) -> None:
    await state.create_session("acme", "s1")
    await one_turn(state, "s1", "t1")
    await one_turn(state, "s1", "t2")
    assert await state.truncate_reply("acme", "s1", "t1", "A c") is True
    history = await state.history("acme", "s1")
    assert [m.text for m in history if m.role == "assistant"] == ["A c", "A cat."]
    record = await state.turn_record("acme", "s1", "t1")
    assert record is not None and record.result["text"] == "A c" and record.result["truncated"]
    assert await state.truncate_reply("acme", "s1", "nope", "x") is False  # not a done turn
    with pytest.raises(NotFound):  # another tenant's session does not exist for them
        await state.truncate_reply("globex", "s1", "t1", "x")
    assert [m.text for m in await state.history("acme", "s1")][1] == "A c"
