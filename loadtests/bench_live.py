"""Live mode vs manual turns, one run on the `small` checkpoint (Redis, Triton, gateway real).

The same spoken questions (espeak-ng) are sent three ways, each in a fresh session, the audio
streamed at real time as a microphone would:
- manual: the client ends the turn itself (`end_of_turn`) the moment the speech ends, the best a
  client-side detector could do;
- live, early start off: the server's VAD decides, the turn starts after `silence_ms` (500 ms);
- live, early start on: the reply starts at the end of speech and is confirmed by the silence.
Reported: end of speech -> first audio byte at the client (p50 / p95), and the VAD's cost per
second of audio (from the gateway's metrics). Writes docs/benchmarks/live.{md,json}.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np

from iomni.client import AsyncDialogueClient
from iomni.testing.speech import RATE, pcm, silence, spoken
from iomni.v1 import dialogue_pb2 as pb
from loadtests import harness
from loadtests.bench_gateway import KEY, gateway_stack

TOKENS = 24
CHUNK_S = 0.04
QUESTIONS = (
    "What is on the table in front of me?",
    "Can you tell me the time please?",
    "How far is it to the station?",
    "Which colour do you like best?",
    "Tell me a short story about a cat.",
    "What should I cook for dinner tonight?",
)
METRICS = "http://127.0.0.1:18452/metrics"
VAD_SECONDS = "iomni_gateway_live_vad_seconds_total"
INPUT_SECONDS = "iomni_gateway_live_input_audio_seconds_total"


async def send_paced(send, samples: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """Send 40 ms chunks at real time; returns when the last one went out."""
    step, started = int(RATE * CHUNK_S), time.monotonic()
    for index, start in enumerate(range(0, len(samples), step)):
        send(pcm(samples[start : start + step]))
        delay = started + (index + 1) * CHUNK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    return time.monotonic()


async def manual(client: AsyncDialogueClient, clip: np.ndarray) -> float:
    queue: asyncio.Queue = asyncio.Queue()
    config = pb.SessionConfig(
        output=pb.OutputOptions(speech=True),
        sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=TOKENS),
    )
    queue.put_nowait(pb.ConverseRequest(config=config))

    async def requests():  # type: ignore[no-untyped-def]
        while (item := await queue.get()) is not None:
            yield item

    def send(data: bytes) -> None:
        audio = pb.UserAudio(data=data, encoding=pb.AUDIO_ENCODING_PCM16, sample_rate_hz=RATE)
        queue.put_nowait(pb.ConverseRequest(audio=audio))

    first: float | None = None
    reader = asyncio.create_task(_first_audio(client.converse(requests())))
    ended = await send_paced(send, clip)
    queue.put_nowait(pb.ConverseRequest(end_of_turn=pb.EndOfTurn()))
    first = await reader
    queue.put_nowait(None)
    return (first - ended) * 1000


async def live(client: AsyncDialogueClient, clip: np.ndarray, early: bool) -> float:
    detection = pb.TurnDetection(mode=pb.TURN_DETECTION_SERVER_VAD, early_start=early)
    stream = client.live(detection=detection, speech=True, temperature=0.0, max_new_tokens=TOKENS)
    reader = asyncio.create_task(_first_audio(stream))
    ended = await send_paced(lambda data: stream.send_audio(data, RATE), clip)
    tail = asyncio.create_task(send_paced(lambda data: stream.send_audio(data, RATE), silence(3.0)))
    first = await reader
    tail.cancel()
    stream.close()
    return (first - ended) * 1000


async def _first_audio(responses) -> float:  # type: ignore[no-untyped-def]
    async for response in responses:
        if response.WhichOneof("payload") == "audio":
            return time.monotonic()
    raise RuntimeError("the turn ended without audio")


async def measure(target: str) -> dict:
    clips = [spoken(q) for q in QUESTIONS]
    async with AsyncDialogueClient(target, KEY) as client:
        await manual(client, clips[0])  # warm up every part
        vad_before = harness.scrape(METRICS, VAD_SECONDS)
        audio_before = harness.scrape(METRICS, INPUT_SECONDS)
        runs: dict[str, list[float]] = {"manual": [], "live": [], "live_early_start": []}
        for clip in clips:
            runs["manual"].append(await manual(client, clip))
            runs["live"].append(await live(client, clip, early=False))
            runs["live_early_start"].append(await live(client, clip, early=True))
        vad_s = harness.scrape(METRICS, VAD_SECONDS) - vad_before
        audio_s = harness.scrape(METRICS, INPUT_SECONDS) - audio_before
    results: dict = {
        mode: {
            "p50_ms": harness.percentile(values, 0.5),
            "p95_ms": harness.percentile(values, 0.95),
            "samples": values,
        }
        for mode, values in runs.items()
    }
    results["early_start_saves_p50_ms"] = (
        results["live"]["p50_ms"] - results["live_early_start"]["p50_ms"]
    )
    results["live_early_over_manual_p50"] = (
        results["live_early_start"]["p50_ms"] / results["manual"]["p50_ms"]
    )
    results["vad_ms_per_audio_s"] = 1000 * vad_s / audio_s if audio_s else float("nan")
    results["clip_seconds"] = [round(len(c) / RATE, 2) for c in clips]
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "checkpoint": "small",
        "reply": f"{TOKENS} text tokens with speech",
        "detection": "threshold 0.5, min_speech 250 ms, end_of_speech 192 ms, silence 500 ms",
    }
    (out / "live.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    rows = [
        ("manual (`end_of_turn` at the end of speech)", "manual"),
        ("live, server VAD, early start off", "live"),
        ("live, server VAD, early start on (default)", "live_early_start"),
    ]
    lines = [
        "# Live mode: end of speech to first audio (CPU, `small` checkpoint, one run)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} CPU cores: Redis, Triton (CPU profile) "
        f"and the gateway as real local processes; {len(results['clip_seconds'])} spoken "
        f"questions (espeak-ng, {min(results['clip_seconds'])}-{max(results['clip_seconds'])} "
        f"s) streamed at real time in 40 ms chunks, each in a new session; {meta['reply']}; "
        f"{meta['detection']}. Time is measured by the client from the last chunk of speech sent "
        "to the first audio chunk received. Regenerate with `make bench`.",
        "",
        "| turn-taking | p50 (ms) | p95 (ms) |",
        "|---|---|---|",
        *[
            f"| {label} | {results[key]['p50_ms']:.0f} | {results[key]['p95_ms']:.0f} |"
            for label, key in rows
        ],
        "",
        f"Early start removes {results['early_start_saves_p50_ms']:.0f} ms at the median. Live "
        f"with early start ÷ manual: {results['live_early_over_manual_p50']:.2f} at the median "
        "(live mode also waits out the silence that proves the turn is over; manual mode "
        "assumes a client that knows it at once). Voice activity detection costs "
        f"{results['vad_ms_per_audio_s']:.1f} ms of CPU per second of audio.",
    ]
    harness.publish(out, "live", lines)


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    checkpoint = harness.checkpoint(args)
    with gateway_stack(checkpoint, "iomni-bench-live-") as (target, _, _):
        results = asyncio.run(measure(target))
    write(results, args.out)


if __name__ == "__main__":
    main()
