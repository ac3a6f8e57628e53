"""A live conversation in-process: Silero VAD on speech made by espeak-ng, the real tiny model,
the turn core on the in-memory store. Turn-taking, early start, barge-in by voice, playback
truncation, camera frames, bad input."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from tests.conftest import png_bytes

from iomni.engine.events import AudioChunk, TextDelta
from iomni.errors import ErrorCode
from iomni.live.detector import SpeechStarted, SpeechStopped, TurnDetection
from iomni.live.session import (
    Interrupted,
    LiveSession,
    LiveSettings,
    LiveWarning,
    ReplyTruncated,
    TurnCommitted,
)
from iomni.model.sampling import SamplingParams
from iomni.parts import SpeechOptions
from iomni.runtime.build import Runtime
from iomni.testing.speech import RATE, espeak_available, pcm, silence, spoken
from iomni.turns.runner import TurnFinished

pytestmark = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng")
PARAMS = SamplingParams(temperature=0.0, max_new_tokens=24)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[float, str, object]] = []

    async def __call__(self, turn_id: str, event: object) -> None:
        self.events.append((time.monotonic(), turn_id, event))

    def of(self, kind: type) -> list[tuple[str, object]]:
        return [(t, e) for _, t, e in self.events if isinstance(e, kind)]

    def kinds(self) -> list[str]:
        return [type(e).__name__ for _, _, e in self.events]

    async def wait_for(self, kind: type, count: int = 1, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.of(kind)) < count:
            assert time.monotonic() < deadline, f"no {kind.__name__} #{count}: {self.kinds()}"
            await asyncio.sleep(0.02)


async def live(runtime: Runtime, **changes) -> tuple[LiveSession, Recorder]:  # type: ignore[no-untyped-def]
    session_id = (await runtime.store.create_session("acme")).session_id
    recorder = Recorder()
    settings = LiveSettings(detection=TurnDetection(), max_speedup=1000.0, **changes)
    session = LiveSession(
        runtime.runner, "acme", session_id, PARAMS, SpeechOptions(), settings, recorder
    )
    return session, recorder


async def stream(session: LiveSession, samples: np.ndarray, speed: float = 0.0) -> None:
    """40 ms chunks; `speed` > 0 paces them at that many times real time."""
    step = RATE * 40 // 1000
    for start in range(0, len(samples), step):
        await session.push_audio(pcm(samples[start : start + step]), RATE)
        if speed:
            await asyncio.sleep(0.04 / speed)


async def test_speech_then_silence_is_committed_and_answered(runtime: Runtime) -> None:
    session, events = await live(runtime)
    await stream(
        session, np.concatenate([silence(0.5), spoken("What is the weather?"), silence(1.5)])
    )
    await events.wait_for(TurnFinished)
    kinds = events.kinds()
    assert kinds[:3] == ["SpeechStarted", "SpeechStopped", "TurnCommitted"]
    assert "TextDelta" in kinds and "AudioChunk" in kinds and kinds[-1] == "TurnFinished"
    (_, started), (_, stopped) = events.of(SpeechStarted)[0], events.of(SpeechStopped)[0]
    assert 300 <= started.audio_start_ms <= 700  # type: ignore[attr-defined]
    assert stopped.audio_end_ms > started.audio_start_ms + 500  # type: ignore[attr-defined]
    turn_id, finished = events.of(TurnFinished)[0]
    assert [t for t, _ in events.of(TurnCommitted)] == [turn_id]
    history = await runtime.store.history("acme", session.session_id)
    assert [m.role for m in history] == ["user", "assistant"]
    assert [p.type for p in history[0].media] == ["audio"]
    assert history[1].text == finished.text  # type: ignore[attr-defined]
    await session.close()


async def test_a_pause_then_more_speech_discards_the_early_turn(runtime: Runtime) -> None:
    """The user pauses (end of speech: the reply starts early), then goes on: the early turn is
    dropped without a trace; one turn is committed, for all that was said."""
    session, events = await live(runtime)
    audio = np.concatenate(
        [spoken("First part"), silence(0.45), spoken("and the second part"), silence(1.5)]
    )
    await stream(session, audio, speed=4.0)  # real pauses: the early turn gets to run
    await events.wait_for(TurnFinished)
    await asyncio.sleep(0.3)
    stops = events.of(SpeechStopped)
    assert len(stops) == 2 and len(events.of(TurnCommitted)) == 1
    assert any(getattr(e, "resumed", False) for _, e in events.of(SpeechStarted))
    committed_turn = events.of(TurnCommitted)[0][0]
    # Nothing of the discarded turn reached the client.
    assert {t for _, t, _ in events.events if t} == {committed_turn}
    history = await runtime.store.history("acme", session.session_id)
    assert len(history) == 2
    assert runtime.runner.active == 0
    await session.close()


async def test_the_early_turn_is_kept_when_the_silence_confirms_it(runtime: Runtime) -> None:
    session, events = await live(runtime, early_start=True)
    started = time.monotonic()
    await stream(session, np.concatenate([spoken("Hello"), silence(1.0)]), speed=2.0)
    await events.wait_for(TurnFinished)
    committed_turn = events.of(TurnCommitted)[0][0]
    assert events.of(TurnFinished)[0][0] == committed_turn
    # Its outputs were held until the commit, then released: none came before it.
    commit_index = events.kinds().index("TurnCommitted")
    assert "TextDelta" not in events.kinds()[:commit_index]
    assert time.monotonic() - started < 60
    await session.close()


async def test_speech_over_a_reply_interrupts_it_and_playback_cuts_the_history(
    runtime: Runtime,
) -> None:
    session, events = await live(runtime)
    await stream(session, np.concatenate([spoken("Tell me a long story"), silence(0.8)]))
    await events.wait_for(AudioChunk)
    first_turn = events.of(TurnCommitted)[0][0]
    await stream(session, np.concatenate([spoken("Stop, wait a moment"), silence(1.0)]))
    await events.wait_for(Interrupted)
    turn, interrupted = events.of(Interrupted)[0]
    assert turn == first_turn and interrupted.by == "voice"  # type: ignore[attr-defined]
    await events.wait_for(TurnFinished, count=2)
    first = next(e for t, e in events.of(TurnFinished) if t == first_turn)
    assert first.stop_reason == "cancelled"  # type: ignore[attr-defined]
    # The client heard 1 s of the first reply: the stored reply is cut to its first 5 tokens.
    await session.playback(first_turn, 1000)
    await events.wait_for(ReplyTruncated)
    _, truncated = events.of(ReplyTruncated)[0]
    deltas = [e for t, e in events.of(TextDelta) if t == first_turn]
    expected = "".join(d.text for d in deltas if d.token_index < 5)  # type: ignore[attr-defined]
    assert truncated.text == expected  # type: ignore[attr-defined]
    history = await runtime.store.history("acme", session.session_id)
    assert len(history) == 4 and history[1].text == expected
    await session.close()


async def test_a_click_does_not_interrupt(runtime: Runtime) -> None:
    session, events = await live(runtime)
    await stream(session, np.concatenate([spoken("Describe the room"), silence(0.8)]))
    await events.wait_for(AudioChunk)
    rng = np.random.default_rng(0)
    click = (0.6 * rng.standard_normal(int(0.15 * RATE))).astype(np.float32)
    await stream(session, np.concatenate([click, silence(1.0)]))
    await events.wait_for(TurnFinished)
    assert events.of(Interrupted) == []
    assert events.of(TurnFinished)[0][1].stop_reason != "cancelled"  # type: ignore[attr-defined]
    await session.close()


def count_image_encodes(runtime: Runtime) -> list[int]:
    """Counts vision encoder calls from now on (the list's one item)."""
    parts, encodes = runtime.parts, [0]
    encode = parts.encode_images

    async def counting(pixels):  # type: ignore[no-untyped-def]
        encodes[0] += 1
        return await encode(pixels)

    parts.encode_images = counting  # type: ignore[method-assign]
    return encodes


async def test_camera_frames_are_encoded_on_arrival_and_join_the_turn(runtime: Runtime) -> None:
    session, events = await live(runtime)
    encodes = count_image_encodes(runtime)
    await session.push_frame(png_bytes(320, 240, seed=1))
    await session.push_frame(png_bytes(320, 240, seed=2))
    assert encodes[0] == 2  # encoded as they arrived, before any turn
    await stream(session, np.concatenate([spoken("What do you see?"), silence(1.0)]))
    await events.wait_for(TurnFinished)
    assert events.of(TurnCommitted)[0][1].frames == 2  # type: ignore[attr-defined]
    finished = events.of(TurnFinished)[0][1]
    assert finished.usage.media_cache_hits == 2 and encodes[0] == 2  # type: ignore[attr-defined]
    assert finished.usage.image_tokens > 0  # type: ignore[attr-defined]
    history = await runtime.store.history("acme", session.session_id)
    assert [p.type for p in history[0].media] == ["frame", "frame", "audio"]
    # The next turn's prompt holds those frames again: still from the cache.
    await stream(session, np.concatenate([spoken("And now?"), silence(1.0)]))
    await events.wait_for(TurnFinished, count=2)
    assert events.of(TurnFinished)[1][1].usage.media_cache_hits >= 3  # type: ignore[attr-defined]
    assert encodes[0] == 2
    await session.close()


async def test_bad_input_gets_a_warning_and_the_session_goes_on(runtime: Runtime) -> None:
    session_id = (await runtime.store.create_session("acme")).session_id
    events = Recorder()
    session = LiveSession(
        runtime.runner, "acme", session_id, PARAMS, None, LiveSettings(burst_s=2.0), events
    )
    await session.push_audio(pcm(silence(0.1, 11025)), 11025)  # unsupported rate
    await session.push_audio(b"\x00\x01\x02", RATE)  # half a sample
    await session.push_frame(b"\x89PNG not really")
    # 20 s at once: far faster than real time; beyond the burst it is dropped, bounded.
    for _ in range(50):
        await session.push_audio(pcm(silence(0.4)), RATE)
    codes = [e.code for _, e in events.of(LiveWarning)]  # type: ignore[attr-defined]
    assert codes[:3] == [ErrorCode.INVALID_INPUT] * 3
    assert ErrorCode.RESOURCE_EXHAUSTED in codes[3:]
    assert session.detector.position_ms <= 2000 + 4 * 1000  # what was taken, no more
    # Still usable: real speech at real pace is heard and answered.
    await asyncio.sleep(2.0)
    await stream(session, np.concatenate([spoken("Are you there?"), silence(1.0)]), speed=1.0)
    await events.wait_for(TurnFinished)
    await session.close()


async def test_a_flood_of_camera_frames_is_cut_to_the_frame_rate(runtime: Runtime) -> None:
    """Each frame costs a vision encode: 40 frames at once take a burst of max_frames, the
    rest are dropped with a warning instead of occupying the encoder."""
    session, events = await live(runtime, max_frames=4, max_frame_fps=2.0)
    encodes = count_image_encodes(runtime)
    started = time.monotonic()
    for seed in range(40):  # distinct frames: no cache hits
        await session.push_frame(png_bytes(64, 48, seed=seed))
    allowed = 4 + 2.0 * (time.monotonic() - started) + 1
    calls = encodes[0]
    assert 4 <= calls <= allowed, (calls, allowed)
    warnings = [e for _, e in events.of(LiveWarning) if e.code is ErrorCode.RESOURCE_EXHAUSTED]  # type: ignore[attr-defined]
    assert len(warnings) == 40 - calls and "per second" in warnings[0].message  # type: ignore[attr-defined]
    await session.close()


async def test_clearing_the_input_drops_a_reply_started_early_on_it(runtime: Runtime) -> None:
    """The user pauses (the reply starts early), then the client clears the input (Realtime
    `input_audio_buffer.clear`): the early reply goes with it. Its confirming silence can no
    longer come; it used to wait for it until the turn timeout, holding the session."""
    session, events = await live(runtime, early_start=True)
    await stream(session, np.concatenate([spoken("Hello"), silence(0.45)]), speed=2.0)
    await events.wait_for(SpeechStopped)
    reply = session.reply
    assert reply is not None and reply.speculative
    session.clear()
    assert reply.running.discarded
    deadline = time.monotonic() + 30
    while runtime.runner.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert runtime.runner.active == 0, "the early reply still waits for its verdict"
    assert not [t for _, t, _ in events.events if t == reply.turn_id]  # nothing of it was sent
    assert await runtime.store.history("acme", session.session_id) == []
    await session.close()
