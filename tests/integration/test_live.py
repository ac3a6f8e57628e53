"""Live mode over the real stack (Triton, Redis, the gateway): a microphone stream of speech made
by espeak-ng, turn-taking and barge-in decided by the server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from iomni.client import AsyncDialogueClient, LiveStream
from iomni.testing.speech import RATE, espeak_available, pcm, silence, spoken
from iomni.v1 import dialogue_pb2 as pb
from tests.conftest import png_bytes
from tests.integration.conftest import TENANT_KEYS, GatewayProcess
from tests.integration.prom import Scrape, delta

pytestmark = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng")
SPEED = 3.5  # audio is sent at 3.5x real time (the server accepts up to 4x sustained)


class Live:
    """A live Converse stream with a reader collecting (time, response)."""

    def __init__(self, client: AsyncDialogueClient, **options) -> None:  # type: ignore[no-untyped-def]
        self.stream: LiveStream = client.live(temperature=0.0, max_new_tokens=40, **options)
        self.responses: list[tuple[float, pb.ConverseResponse]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.stream:
            self.responses.append((time.monotonic(), response))

    def of(self, kind: str, turn_id: str | None = None) -> list[pb.ConverseResponse]:
        return [
            r
            for _, r in self.responses
            if r.WhichOneof("payload") == kind and (turn_id is None or r.turn_id == turn_id)
        ]

    async def wait_for(self, kind: str, count: int = 1, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.of(kind)) < count:
            if self.reader.done():
                self.reader.result()  # raises the stream's error
            assert time.monotonic() < deadline, f"no {kind} #{count}: {self.kinds()}"
            await asyncio.sleep(0.02)

    def kinds(self) -> list[str]:
        return [r.WhichOneof("payload") for _, r in self.responses]

    async def say(self, samples: np.ndarray) -> None:
        step = RATE * 40 // 1000
        for start in range(0, len(samples), step):
            self.stream.send_audio(pcm(samples[start : start + step]), RATE)
            await asyncio.sleep(0.04 / SPEED)

    async def close(self) -> None:
        self.stream.close()
        await asyncio.wait_for(self.reader, 30)


def client(gateway: GatewayProcess) -> AsyncDialogueClient:
    return AsyncDialogueClient(gateway.target, TENANT_KEYS["acme"])


async def test_speech_then_silence_gets_a_committed_turn_and_a_spoken_reply(
    gateway: GatewayProcess,
) -> None:
    """(a) No end_of_turn: the server hears the end of speech and answers."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    before = Scrape(url)
    async with client(gateway) as c:
        live = Live(c)
        await live.wait_for("started")
        await live.say(np.concatenate([silence(0.3), spoken("What is on the table?")]))
        await live.say(silence(1.5))
        await live.wait_for("done")
        kinds = live.kinds()
        assert kinds[:4] == ["started", "speech_started", "speech_stopped", "committed"]
        committed = live.of("committed")[0]
        assert committed.turn_id and committed.committed.audio_end_ms > 500
        assert live.of("text", committed.turn_id) and live.of("audio", committed.turn_id)
        done = live.of("done")[0]
        assert done.turn_id == committed.turn_id and done.done.usage.audio_tokens > 0
        session = await c.get_session(committed.session_id)
        assert session.turns == 1 and session.history[0].parts[0].media_ref.kind == "audio"
        await live.close()
    after = Scrape(url)
    assert delta(before, after, "iomni_gateway_live_turns_committed_total", how="vad") == 1
    assert delta(before, after, "iomni_gateway_live_speech_to_first_audio_seconds_count") == 1
    assert delta(before, after, "iomni_gateway_live_input_audio_seconds_total") > 2
    assert delta(before, after, "iomni_gateway_live_vad_seconds_total") > 0


async def test_speech_over_a_reply_cuts_it_and_the_history_keeps_what_was_heard(
    gateway: GatewayProcess,
) -> None:
    """(b) Speaking over a reply stops it at once (no audio after `interrupted`); the client's
    playback position cuts the stored reply to the text spoken by then."""
    async with client(gateway) as c:
        live = Live(c)
        await live.say(np.concatenate([spoken("Tell me a long story"), silence(0.8)]))
        await live.wait_for("audio")
        first = live.of("committed")[0].turn_id
        await live.say(np.concatenate([spoken("No, stop, something else"), silence(1.2)]))
        await live.wait_for("interrupted")
        interrupted_at = next(t for t, r in live.responses if r.HasField("interrupted"))
        interrupted = live.of("interrupted")[0]
        assert interrupted.turn_id == first
        assert interrupted.interrupted.by == pb.INTERRUPTED_BY_VOICE
        await live.wait_for("done", count=2)
        late_audio = [t for t, r in live.responses if r.turn_id == first and r.HasField("audio")]
        assert all(t <= interrupted_at for t in late_audio)
        first_done = next(r for r in live.of("done") if r.turn_id == first)
        assert first_done.done.stop_reason == pb.STOP_REASON_CANCELLED
        live.stream.playback(first, 1000)  # the client played 1 s of it
        await live.wait_for("truncated")
        truncated = live.of("truncated")[0]
        said = [r.text for r in live.of("text", first)]
        heard = "".join(t.text for t in said if t.token_index < 5)
        assert truncated.turn_id == first and truncated.truncated.text == heard
        session = await c.get_session(interrupted.session_id)
        assert session.turns == 2
        assert session.history[1].parts[0].text == heard
        assert heard != first_done.done.text or len(said) <= 5
        await live.close()


async def test_a_short_click_does_not_interrupt(gateway: GatewayProcess) -> None:
    """(c) 150 ms of noise over the reply is not speech: the reply goes on to its end."""
    async with client(gateway) as c:
        live = Live(c)
        await live.say(np.concatenate([spoken("Describe the room"), silence(0.8)]))
        await live.wait_for("audio")
        click = (0.6 * np.random.default_rng(0).standard_normal(int(0.15 * RATE))).astype(
            np.float32
        )
        await live.say(np.concatenate([click, silence(1.0)]))
        await live.wait_for("done")
        assert live.of("interrupted") == []
        assert live.of("done")[0].done.stop_reason != pb.STOP_REASON_CANCELLED
        await live.close()


async def test_camera_frames_join_the_turn_and_hit_the_cache_next_turn(
    gateway: GatewayProcess,
) -> None:
    """(d) Frames sent while the user speaks are media of the committed turn; the next turn
    finds their embeddings in the cache."""
    async with client(gateway) as c:
        live = Live(c)
        speech = spoken("What do you see in front of you?")
        half = len(speech) // 2
        await live.say(speech[:half])
        live.stream.send_frame(png_bytes(320, 240, seed=11))
        live.stream.send_frame(png_bytes(320, 240, seed=12))
        await live.say(np.concatenate([speech[half:], silence(1.2)]))
        await live.wait_for("done")
        committed = live.of("committed")[0]
        assert committed.committed.frames == 2
        first = live.of("done")[0].done
        assert first.usage.image_tokens > 0 and first.usage.media_cache_hits >= 2
        session = await c.get_session(committed.session_id)
        kinds = [p.media_ref.kind for p in session.history[0].parts if p.HasField("media_ref")]
        assert kinds == ["frame", "frame", "audio"]
        await live.say(np.concatenate([spoken("And what colour is it?"), silence(1.2)]))
        await live.wait_for("done", count=2)
        second = live.of("done")[1].done
        assert second.usage.media_cache_hits >= 3  # both frames and the first clip
        await live.close()


async def test_a_discarded_early_turn_leaves_no_trace(gateway: GatewayProcess) -> None:
    """(e) A pause long enough to end speech (the reply starts early) but not the turn: the
    user goes on, the early turn is dropped; only one turn, for all that was said, remains."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    before = Scrape(url)
    async with client(gateway) as c:
        live = Live(c)
        await live.say(
            np.concatenate(
                [spoken("First part"), silence(0.45), spoken("and the rest"), silence(1.2)]
            )
        )
        await live.wait_for("done")
        await asyncio.sleep(0.5)
        after = Scrape(url)
        assert len(live.of("speech_stopped")) == 2 and len(live.of("committed")) == 1
        assert (
            delta(before, after, "iomni_gateway_live_speculative_turns_total", result="discarded")
            >= 1
        )
        turn_ids = {r.turn_id for _, r in live.responses if r.turn_id}
        assert turn_ids == {live.of("committed")[0].turn_id}  # nothing from the dropped turn
        session = await c.get_session(live.of("committed")[0].session_id)
        assert session.turns == 1
        await live.close()


async def test_a_client_that_stops_sending_still_gets_its_reply(gateway: GatewayProcess) -> None:
    """(f) Speech, `end_of_turn`, then the client closes its side of the stream (as a request
    generator that runs out does) but still reads: the reply is finished and committed (it
    used to be cancelled with no `done`)."""
    async with client(gateway) as c:
        live = Live(c)
        await live.wait_for("started")
        await live.say(spoken("What is on the table?"))
        live.stream.end_of_turn()
        await live.close()  # ends the requests, then reads the responses to their end
        committed = live.of("committed")
        assert len(committed) == 1 and live.of("done", committed[0].turn_id)
        assert live.of("done")[0].done.stop_reason != pb.STOP_REASON_CANCELLED
        session = await c.get_session(committed[0].session_id)
        assert session.turns == 1


async def test_bad_live_input_is_a_warning_and_the_stream_goes_on(gateway: GatewayProcess) -> None:
    async with client(gateway) as c:
        live = Live(c)
        live.stream.send_audio(b"\x00\x00" * 100, 11025)
        live.stream.send_frame(b"not an image")
        await live.wait_for("warning", count=2)
        codes = [r.warning.code for r in live.of("warning")]
        assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
        assert "11025" in live.of("warning")[0].warning.message
        await live.say(np.concatenate([spoken("Are you still there?"), silence(1.2)]))
        await live.wait_for("done")
        await live.close()
