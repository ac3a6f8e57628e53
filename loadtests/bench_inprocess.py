"""In-process benchmark for the `tiny` and `small` sizes: per-part latency, LLM tokens/s,
speech-decoder real-time factor and time to first audio.

Prints a table and writes docs/benchmarks/inprocess.{md,json}. Timing is measured here, never
asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from iomni.engine.events import TurnDone
from iomni.engine.parts import GenerationRequest, InProcessParts, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.model.checkpoint import load_checkpoint
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.generate import make_checkpoint
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.model.speech.stream import SpeechSession
from loadtests import harness

SIZES = ("tiny", "small")


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time in ms over `repeat` runs, after one warm-up."""
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def wav_bytes(seconds: float) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


async def decode_rate(parts: InProcessParts, prompt_len: int, new_tokens: int) -> dict:
    request = GenerationRequest(
        input_ids=[1000 + i % 5000 for i in range(prompt_len)],
        media={},
        params=SamplingParams(temperature=0.0, max_new_tokens=new_tokens),
        stop_ids=[],
    )
    started = time.perf_counter()
    first = None
    count = 0
    async for _ in parts.generate(request):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {
        "prefill_ms": (first - started) * 1000,
        "decode_tokens_per_s": (count - 1) / (end - first),
    }


async def turn_latency(engine: TurnEngine, image: bytes) -> dict:
    user = Message("user", (MediaPart.from_bytes("image", image), TextPart("Describe it.")))
    params = SamplingParams(temperature=0.0, max_new_tokens=32)
    done = None
    async for event in engine.start(TurnRequest(user=user, params=params)).events():
        if isinstance(event, TurnDone):
            done = event
    return {
        "first_token_ms": done.timings_ms["first_token"],
        "total_ms": done.timings_ms["total"],
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
    }


async def speech_turn(engine: TurnEngine) -> dict:
    user = Message("user", (TextPart("Tell me about your day."),))
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    request = TurnRequest(user=user, params=params, speech=SpeechOptions(seed=0))
    done = None
    async for event in engine.start(request).events():
        if isinstance(event, TurnDone):
            done = event
    return {
        "speech_turn_first_audio_ms": done.timings_ms["first_audio"],
        "speech_turn_first_token_ms": done.timings_ms["first_token"],
        "speech_turn_audio_s": done.usage.audio_ms / 1000,
        "speech_turn_total_ms": done.timings_ms["total"],
    }


def speech_rtf(checkpoint, text_tokens: int = 50) -> dict:  # type: ignore[no-untyped-def]
    """Speech decoder alone: wall time / audio time for one utterance (VoiceLM+flow+HiFT)."""
    m = checkpoint.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (text_tokens,), generator=g).tolist()
    hidden = torch.randn(text_tokens, checkpoint.config.llm_hidden_size, generator=g)
    session = SpeechSession(m.voicelm, m.flow, m.hifigan, m.default_speaker_embedding)
    started = time.perf_counter()
    first = None
    samples = 0
    with torch.inference_mode():
        for i in range(0, text_tokens, 5):
            chunks = session.push_text(ids[i : i + 5], hidden[i : i + 5])
            if chunks and first is None:
                first = time.perf_counter() - started
            samples += sum(c.size for c in chunks)
        samples += sum(c.size for c in session.finish())
    wall = time.perf_counter() - started
    return {"speech_rtf": wall / (samples / 24000), "speech_first_chunk_ms": first * 1000}


def bench_size(size: str, root: Path) -> dict:
    path = root / size
    if not (path / "config.json").exists():
        make_checkpoint(size, path)
    checkpoint = load_checkpoint(path)
    model = checkpoint.model
    processor = Processor.from_checkpoint(path)
    parts = InProcessParts(checkpoint)
    one_tile = processor.prepare_image(png_bytes(448, 448)).pixel_values
    many = processor.prepare_image(png_bytes(1280, 720)).pixel_values
    audio5 = processor.prepare_audio(wav_bytes(5.0)).windows
    audio30 = processor.prepare_audio(wav_bytes(30.0)).windows
    with torch.inference_mode():
        result = {
            "vision_1_tile_ms": timed(lambda: model.encode_images(one_tile), 5),
            f"vision_{many.shape[0]}_tiles_ms": timed(lambda: model.encode_images(many), 3),
            "audio_5s_ms": timed(lambda: model.encode_audio(audio5), 5),
            "audio_30s_ms": timed(lambda: model.encode_audio(audio30), 3),
        }
    result.update(asyncio.run(decode_rate(parts, 512, 64)))
    engine = TurnEngine(parts, processor)
    result.update(
        {f"turn_{k}": v for k, v in asyncio.run(turn_latency(engine, png_bytes(640, 480))).items()}
    )
    result.update(speech_rtf(checkpoint))
    starting = parts.prepare_speech()  # as the runtime does at startup: its own process
    if starting is not None:
        starting.join()
    result.update(asyncio.run(speech_turn(engine)))
    result["parameters_millions"] = sum(p.numel() for p in model.parameters()) / 1e6
    return result


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "inprocess.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    lines = [
        "# In-process benchmark (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} CPU cores, torch "
        f"{meta['torch']} ({meta['torch_threads']} threads). Random weights; timings are "
        "medians after a warm-up. Regenerate with `make bench`.",
        "",
        *harness.metric_table(results),
    ]
    harness.publish(out, "inprocess", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--checkpoints", type=Path, default=Path(".cache/checkpoints"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    results = {size: bench_size(size, args.checkpoints) for size in args.sizes}
    write_report(results, args.out)


if __name__ == "__main__":
    main()
