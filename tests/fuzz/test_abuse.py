"""Clients that misbehave on purpose: hundreds of silent streams, a client that never reads, media
far faster than real time, a tenant probing another tenant's session ids. Each must stay
bounded (tasks, file descriptors, memory) and get a clear status, and another tenant's first
response must stay within BOUND_S of what it was before (stated in docs/reliability.md)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import dialogue_pb2_grpc as pb_grpc
from tests.conftest import png_bytes
from tests.fuzz.conftest import KEYS, FuzzGateway

pytestmark = pytest.mark.asyncio
BOUND_S = 2.0  # another tenant's first response may be this much slower during an abuse
SILENT_STREAMS = 500


def _auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _first_response_s(stub: pb_grpc.DialogueStub) -> float:
    """Seconds to the first text of a short Chat turn by the other tenant (globex)."""
    request = pb.ChatRequest(turn_id=uuid.uuid4().hex, parts=[pb.Part(text="hello there")])
    request.sampling.max_new_tokens = 4
    started = time.perf_counter()
    first = None
    async for response in stub.Chat(request, metadata=_auth("globex"), timeout=60):
        if first is None and response.WhichOneof("payload") == "text":
            first = time.perf_counter() - started
    assert first is not None
    return first


async def _baseline(stub: pb_grpc.DialogueStub) -> float:
    return statistics.median([await _first_response_s(stub) for _ in range(3)])


def _gateway_tasks(gateway: FuzzGateway) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return gateway.run(count())


def _whole(gateway: FuzzGateway) -> None:
    """Nothing left running and no lease held."""
    runtime = gateway.runtime
    assert runtime.runner.active == 0
    store = runtime.store
    assert [s for s in store._sessions.values() if store._live_lease(s) is not None] == []  # type: ignore[attr-defined]


async def _config(**fields) -> AsyncIterator[pb.ConverseRequest]:  # type: ignore[no-untyped-def]
    yield pb.ConverseRequest(config=pb.SessionConfig(**fields))
    await asyncio.Event().wait()  # then nothing, ever


async def _nothing() -> AsyncIterator[pb.ConverseRequest]:
    await asyncio.Event().wait()
    yield pb.ConverseRequest()  # never reached


async def test_hundreds_of_silent_streams_are_bounded_then_closed(
    fuzz_gateway: FuzzGateway,
) -> None:
    """500 connections open a Converse stream and go silent (half after a config, half before
    anything): the gateway holds a few tasks each, another tenant is served as before, and
    after the idle timeout every stream ends with DEADLINE_EXCEEDED and everything is freed."""
    async with grpc.aio.insecure_channel(fuzz_gateway.target) as channel:
        victim = pb_grpc.DialogueStub(channel)
        before_s = await _baseline(victim)
        tasks_before, fds_before = _gateway_tasks(fuzz_gateway), _fds()
        channels = [grpc.aio.insecure_channel(fuzz_gateway.target) for _ in range(SILENT_STREAMS)]
        calls = [
            pb_grpc.DialogueStub(c).Converse(
                _config() if i % 2 else _nothing(), metadata=_auth("acme"), timeout=120
            )
            for i, c in enumerate(channels)
        ]
        opened = time.monotonic()
        await asyncio.gather(*(c.wait_for_connection() for c in calls))
        await asyncio.sleep(2)
        during_s = await _baseline(victim)
        per_stream = (_gateway_tasks(fuzz_gateway) - tasks_before) / SILENT_STREAMS
        assert per_stream <= 6, f"{per_stream:.1f} gateway tasks per silent stream"
        assert during_s <= before_s + BOUND_S, (before_s, during_s)

        async def ending(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
            return grpc.StatusCode.OK, ""

        endings = await asyncio.gather(*(ending(c) for c in calls))
        closed_after = time.monotonic() - opened
        assert {code for code, _ in endings} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert all("no message on this stream" in detail for _, detail in endings)
        assert closed_after < 10 + 5  # the fixture's idle timeout, plus the watchdog's tick
        for c in channels:
            await c.close()
        await asyncio.sleep(1)
        assert _gateway_tasks(fuzz_gateway) <= tasks_before + 5
        assert _fds() <= fds_before + 10
        _whole(fuzz_gateway)


async def test_a_client_that_never_reads_holds_one_reply_and_no_lease(
    fuzz_gateway: FuzzGateway,
) -> None:
    """Speech streams to a client that reads nothing: the turn still ends (it is not held by
    the client), the lease is released, other tenants are served; the stream is closed after
    the idle timeout with what was not read dropped."""
    async with grpc.aio.insecure_channel(fuzz_gateway.target) as channel:
        stub = pb_grpc.DialogueStub(channel)
        before_s = await _baseline(stub)
        config = pb.SessionConfig(
            output=pb.OutputOptions(speech=True),
            sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=120),
        )
        ended = asyncio.Event()

        async def requests() -> AsyncIterator[pb.ConverseRequest]:
            yield pb.ConverseRequest(config=config)
            yield pb.ConverseRequest(text=pb.UserText(text="tell me a long story"))
            yield pb.ConverseRequest(end_of_turn=pb.EndOfTurn())
            await ended.wait()

        call = stub.Converse(requests(), metadata=_auth("acme"), timeout=120)
        await asyncio.sleep(1)
        during_s = await _baseline(stub)
        assert during_s <= before_s + BOUND_S, (before_s, during_s)
        deadline = time.monotonic() + 60
        while fuzz_gateway.runtime.runner.active and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        _whole(fuzz_gateway)  # the turn ended although nobody read its audio
        await asyncio.sleep(10 + 4)  # still not reading: past the fixture's idle timeout
        started = time.monotonic()
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                received += 1
        ended.set()
        # Closed by the server while unread: what is left is what was already in transit.
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, raised.value.details()
        details = raised.value.details() or ""
        assert "read nothing" in details or "no message" in details, details
        assert time.monotonic() - started < 5, "the stream was still open"
        print(f"unread stream closed: {details!r}; {received} responses were in transit")


async def test_media_far_faster_than_real_time_is_cut_with_warnings(
    fuzz_gateway: FuzzGateway,
) -> None:
    """A live stream pushes 60 s of audio and 40 camera frames as fast as it can: what is past
    the allowance is dropped with RESOURCE_EXHAUSTED warnings, the stream is not failed, and
    another tenant's first response is within the bound."""
    silence = np.zeros(2400, dtype="<i2").tobytes()  # 100 ms at 24 kHz
    live = pb.TurnDetection(mode=pb.TURN_DETECTION_SERVER_VAD)

    async def flood() -> AsyncIterator[pb.ConverseRequest]:
        yield pb.ConverseRequest(config=pb.SessionConfig(turn_detection=live))
        for i in range(600):
            yield pb.ConverseRequest(
                audio=pb.UserAudio(
                    data=silence, encoding=pb.AUDIO_ENCODING_PCM16, sample_rate_hz=24000
                )
            )
            if i % 15 == 0:
                yield pb.ConverseRequest(frame=pb.CameraFrame(data=png_bytes(64, 48, seed=i)))

    async with grpc.aio.insecure_channel(fuzz_gateway.target) as channel:
        stub = pb_grpc.DialogueStub(channel)
        before_s = await _baseline(stub)
        warnings: list[pb.Warning] = []
        call = stub.Converse(flood(), metadata=_auth("acme"), timeout=120)
        victim = asyncio.create_task(_baseline(stub))
        async for response in call:
            if response.WhichOneof("payload") == "warning":
                warnings.append(response.warning)
        during_s = await victim
        # The client finished sending (half-close): the stream ended normally.
        assert await call.code() == grpc.StatusCode.OK
    codes = {w.code for w in warnings}
    assert codes == {"RESOURCE_EXHAUSTED"}, codes
    assert any("real time" in w.message for w in warnings)
    assert any("camera frames" in w.message for w in warnings)
    assert during_s <= before_s + BOUND_S, (before_s, during_s)
    _whole(fuzz_gateway)


async def test_another_tenants_session_ids_are_not_found_and_untouched(
    fuzz_gateway: FuzzGateway,
) -> None:
    """acme hammers globex's session id through every call: NOT_FOUND every time (it does not
    learn the session exists), and globex's session is unchanged and usable."""
    async with grpc.aio.insecure_channel(fuzz_gateway.target) as channel:
        stub = pb_grpc.DialogueStub(channel)
        request = pb.ChatRequest(turn_id=uuid.uuid4().hex, parts=[pb.Part(text="mine")])
        request.sampling.max_new_tokens = 3
        replies = [r async for r in stub.Chat(request, metadata=_auth("globex"), timeout=60)]
        session = replies[0].session_id
        before = await stub.GetSession(
            pb.GetSessionRequest(session_id=session), metadata=_auth("globex")
        )
        acme = _auth("acme")

        async def probe(i: int) -> grpc.StatusCode:
            try:
                if i % 4 == 0:
                    await stub.GetSession(pb.GetSessionRequest(session_id=session), metadata=acme)
                elif i % 4 == 1:
                    await stub.DeleteSession(
                        pb.DeleteSessionRequest(session_id=session), metadata=acme
                    )
                elif i % 4 == 2:
                    chat = pb.ChatRequest(
                        session_id=session, turn_id=uuid.uuid4().hex, parts=[pb.Part(text="x")]
                    )
                    async for _ in stub.Chat(chat, metadata=acme, timeout=30):
                        pass
                else:

                    async def resume() -> AsyncIterator[pb.ConverseRequest]:
                        yield pb.ConverseRequest(config=pb.SessionConfig(session_id=session))

                    async for _ in stub.Converse(resume(), metadata=acme, timeout=30):
                        pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(probe(i) for i in range(200)))
        assert set(codes) == {grpc.StatusCode.NOT_FOUND}
        after = await stub.GetSession(
            pb.GetSessionRequest(session_id=session), metadata=_auth("globex")
        )
        assert after == before
        request = pb.ChatRequest(
            session_id=session, turn_id=uuid.uuid4().hex, parts=[pb.Part(text="again")]
        )
        request.sampling.max_new_tokens = 3
        replies = [r async for r in stub.Chat(request, metadata=_auth("globex"), timeout=60)]
        assert replies[-1].WhichOneof("payload") == "done"
    _whole(fuzz_gateway)
