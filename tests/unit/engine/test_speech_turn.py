"""Speech in a turn: audio interleaved with text, speech off, cancel, speakers."""

from __future__ import annotations

import asyncio
import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from iomni.engine.events import AudioChunk, TextDelta, TurnDone, TurnEvent
from iomni.engine.parts import InProcessParts, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.errors import CheckpointError, InvalidInput
from iomni.model.checkpoint import LoadedCheckpoint, load_checkpoint
from iomni.model.conversation import Message, TextPart
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.model.speech.stream import SAMPLES_PER_TOKEN, to_pcm16

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


@pytest.fixture
def engine(tiny: LoadedCheckpoint, processor: Processor) -> TurnEngine:
    return TurnEngine(InProcessParts(tiny), processor)


def voice(seconds: float = 2.0, rate: int = 16000, pitch: float = 180.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.3 * np.sin(2 * np.pi * pitch * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


async def run(
    engine: TurnEngine, speech: SpeechOptions | None, params: SamplingParams = GREEDY
) -> list[TurnEvent]:
    request = TurnRequest(
        user=Message("user", (TextPart("Say something"),)), params=params, speech=speech
    )
    return [e async for e in engine.start(request).events()]


def audio_of(events: list[TurnEvent]) -> bytes:
    return b"".join(e.pcm for e in events if isinstance(e, AudioChunk))


async def test_audio_starts_after_five_text_tokens_and_before_the_text_ends(
    engine: TurnEngine,
) -> None:
    events = await run(engine, SpeechOptions(seed=1))
    done = events[-1]
    assert isinstance(done, TurnDone) and done.usage.completion_tokens == 24
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    first = events.index(chunks[0])
    text_before = sum(1 for e in events[:first] if isinstance(e, TextDelta))
    assert chunks[0].text_tokens >= 5 and text_before >= 1
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert {c.sample_rate for c in chunks} == {24000}


class PacedParts(InProcessParts):
    """The tiny model with a slower LLM or a slower speech decoder."""

    def __init__(self, tiny: LoadedCheckpoint, step_s: float = 0.0, speech_s: float = 0.0):
        super().__init__(tiny)
        self.step_s, self.speech_s = step_s, speech_s

    async def generate(self, request):  # type: ignore[no-untyped-def]
        async for step in super().generate(request):
            await asyncio.sleep(self.step_s)
            yield step

    async def open_speech(self, options: SpeechOptions):  # type: ignore[no-untyped-def]
        speech = await super().open_speech(options)
        push = speech.push_text

        async def slow(ids, hidden, on_chunk=None):  # type: ignore[no-untyped-def]
            await asyncio.sleep(self.speech_s)
            return await push(ids, hidden, on_chunk)

        speech.push_text = slow  # type: ignore[method-assign]
        return speech


async def test_speech_starts_while_the_text_is_still_being_generated(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    events = await run(TurnEngine(PacedParts(tiny, step_s=0.1), processor), SpeechOptions(seed=1))
    first = next(e for e in events if isinstance(e, AudioChunk))
    assert first.text_tokens < events[-1].usage.completion_tokens


async def test_text_is_not_held_back_by_the_speech_decoder(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    """Each text group goes to the speech decoder without waiting for the audio before it, so
    a slow decoder delays the audio, not the text."""
    engine = TurnEngine(PacedParts(tiny, speech_s=1.0), processor)
    events = await run(engine, SpeechOptions(seed=1))
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    assert not any(isinstance(e, TextDelta) for e in events[first_audio:])
    assert sum(isinstance(e, AudioChunk) for e in events) >= 4


async def test_audio_duration_matches_speech_tokens(engine: TurnEngine) -> None:
    events = await run(engine, SpeechOptions(seed=1))
    done = events[-1]
    samples = len(audio_of(events)) // 2
    assert samples == done.usage.speech_tokens * SAMPLES_PER_TOKEN
    assert done.usage.audio_ms == pytest.approx(samples / 24)
    assert done.usage.speech_tokens >= 24 // 5 * 25
    assert "first_audio" in done.timings_ms and "speech" in done.timings_ms


async def test_speech_off_yields_no_audio(engine: TurnEngine) -> None:
    events = await run(engine, None)
    assert not any(isinstance(e, AudioChunk) for e in events)
    assert events[-1].usage.audio_ms == 0


async def test_same_seed_same_audio(engine: TurnEngine) -> None:
    a = audio_of(await run(engine, SpeechOptions(seed=3)))
    b = audio_of(await run(engine, SpeechOptions(seed=3)))
    c = audio_of(await run(engine, SpeechOptions(seed=4)))
    assert a == b and a != c


async def test_cancel_mid_speech_stops_audio(engine: TurnEngine) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=200)
    turn = engine.start(
        TurnRequest(
            user=Message("user", (TextPart("Talk"),)), params=params, speech=SpeechOptions()
        )
    )
    events: list[TurnEvent] = []
    async for event in turn.events():
        events.append(event)
        if isinstance(event, AudioChunk) and not turn.cancelled:
            turn.cancel()
            cancelled_at = len(events)
    after = events[cancelled_at:]
    assert not any(isinstance(e, AudioChunk) for e in after)
    done = events[-1]
    assert done.stop_reason == "cancelled" and done.usage.completion_tokens < 200
    assert done.record[1].text == "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_cloned_voice_changes_the_audio(engine: TurnEngine) -> None:
    default = audio_of(await run(engine, SpeechOptions(seed=1)))
    cloned = audio_of(await run(engine, SpeechOptions(speaker_wav=voice(), seed=1)))
    assert len(default) == len(cloned) and default != cloned


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (b"definitely not audio", "speaker reference: audio could not be decoded"),
        (voice(seconds=0.4), "speaker reference is 0.40 s long"),
        (voice(rate=8000), "sampled at 8000 Hz"),
        (voice(pitch=0.0), "speaker reference: audio is silent"),
    ],
)
async def test_bad_speaker_reference_is_invalid_input(
    engine: TurnEngine, reference: bytes, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        await run(engine, SpeechOptions(speaker_wav=reference))


async def test_cloning_without_the_speaker_model_is_a_clear_error(
    tiny_dir: Path, processor: Processor, tmp_path: Path
) -> None:
    copy = tmp_path / "no-campplus"
    shutil.copytree(tiny_dir, copy)
    (copy / "campplus.onnx").unlink()
    engine = TurnEngine(InProcessParts(load_checkpoint(copy)), processor)
    with pytest.raises(CheckpointError, match="campplus.onnx"):
        await run(engine, SpeechOptions(speaker_wav=voice()))
    assert audio_of(await run(engine, SpeechOptions())) != b""  # the default voice still works


async def test_a_short_first_chunk_set_by_environment_speaks_after_the_first_group(
    tiny_dir: Path, engine: TurnEngine
) -> None:
    """IOMNI_SPEECH_FIRST_CHUNK_TOKENS reaches the embedded engine's speech decoder: its first
    chunk is 10 speech tokens instead of 25 (less the 4 held back for the cross-fade)."""
    from iomni.runtime.build import build_runner
    from iomni.runtime.settings import Settings

    env = {"IOMNI_SPEECH_FIRST_CHUNK_TOKENS": "10"}
    settings = Settings.resolve("chat", None, env=env)
    settings = replace(settings, model=tiny_dir, transport="inprocess", redis_url="memory")
    built = build_runner(settings, role="test")
    short = TurnEngine(built.parts, engine.processor)
    try:
        firsts = [
            next(e for e in await run(which, SpeechOptions(seed=1)) if isinstance(e, AudioChunk))
            for which in (engine, short)
        ]
    finally:
        await built.parts.close()
    assert [len(first.pcm) // 2 for first in firsts] == [
        (tokens - 4) * SAMPLES_PER_TOKEN for tokens in (25, 10)
    ]


async def test_a_chunk_goes_out_while_its_call_still_renders_the_next(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    """The reply's tail renders as several chunks in one call: the first is handed out while
    the call renders the next, not when the call returns them all."""
    tail = [np.full(2400, 0.1, np.float32), np.full(2400, 0.2, np.float32)]
    first_out = asyncio.Event()
    waited: list[str] = []

    class TwoChunkTail(InProcessParts):
        async def open_speech(self, options: SpeechOptions):  # type: ignore[no-untyped-def]
            speech = await super().open_speech(options)

            async def finish(on_chunk=None):  # type: ignore[no-untyped-def]
                on_chunk(tail[0])
                try:
                    await asyncio.wait_for(first_out.wait(), 5)
                    waited.append("first chunk out")
                except TimeoutError:
                    waited.append("timed out")
                on_chunk(tail[1])
                return list(tail)

            speech.finish = finish  # type: ignore[method-assign]
            return speech

    request = TurnRequest(
        user=Message("user", (TextPart("Say something"),)),
        params=GREEDY,
        speech=SpeechOptions(seed=1),
    )
    pcm = []
    async for event in TurnEngine(TwoChunkTail(tiny), processor).start(request).events():
        if isinstance(event, AudioChunk):
            pcm.append(event.pcm)
            if event.pcm == to_pcm16(tail[0]):
                first_out.set()
    assert waited == ["first chunk out"]
    assert pcm[-2:] == [to_pcm16(t) for t in tail]  # each once, in order
    assert pcm.count(to_pcm16(tail[0])) == 1
