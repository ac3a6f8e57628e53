"""Triton vs in-process, measured side by side in one run on the `small` checkpoint.

- time to first token and to first audio for the same turn through each transport (the ratio
  is the transport overhead);
- aggregate LLM tokens/s with 1, 4 and 8 concurrent streams through Triton (the gain from
  continuous batching).

Writes docs/benchmarks/triton.{md,json}. Never asserted in tests.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from iomni.engine.events import TurnDone
from iomni.engine.parts import InProcessParts, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.model.checkpoint import fingerprint, load_checkpoint
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.triton.client import TritonParts
from iomni.triton.server import TritonPorts, TritonServer
from iomni.triton.tensors import AUDIO_EMBEDS, IMAGE_EMBEDS
from loadtests import harness

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def png() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


async def turn_timings(engine: TurnEngine, repeats: int) -> dict[str, float]:
    image = png()
    firsts, audios, totals = [], [], []
    for i in range(repeats):
        user = Message("user", (MediaPart.from_bytes("image", image), TextPart(f"Describe {i}")))
        request = TurnRequest(
            user=user,
            params=SamplingParams(temperature=0.0, max_new_tokens=24),
            speech=SpeechOptions(seed=0),
        )
        done = [e async for e in engine.start(request).events()][-1]
        assert isinstance(done, TurnDone)
        firsts.append(done.timings_ms["first_token"])
        audios.append(done.timings_ms["first_audio"])
        totals.append(done.timings_ms["total"])
    return {
        "first_token_ms": statistics.median(firsts),
        "first_audio_ms": statistics.median(audios),
        "turn_ms": statistics.median(totals),
    }


async def measure(server: TritonServer, checkpoint: Path, repeats: int) -> dict:
    processor = Processor.from_checkpoint(checkpoint)
    special = processor.tokenizer.special
    remote = TritonParts(
        server.grpc_url,
        fingerprint(checkpoint),
        {special.img_context: IMAGE_EMBEDS, special.audio_context: AUDIO_EMBEDS},
    )
    await remote.check_ready()
    local = InProcessParts(load_checkpoint(checkpoint))
    results = {
        "triton": await turn_timings(TurnEngine(remote, processor), repeats),
        "in_process": await turn_timings(TurnEngine(local, processor), repeats),
    }
    results["ratio"] = {
        k: results["triton"][k] / results["in_process"][k] for k in results["triton"]
    }
    rates = {n: (await harness.decode_rate(remote, n))["tokens_per_s"] for n in (1, 4, 8)}
    results["llm_tokens_per_s"] = {str(n): r for n, r in rates.items()}
    results["batching_gain"] = {str(n): rates[n] / rates[1] for n in (4, 8)}
    await remote.close()
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "checkpoint": "small",
        "triton": "2.51 (nvidia-pytriton 0.7.0), CPU profile",
        "note": (
            "Triton stubs run 1 torch thread each; in-process, the batcher and the speech "
            "decoder use half the cores each"
        ),
    }
    (out / "triton.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    t, p, r = results["triton"], results["in_process"], results["ratio"]
    rates = results["llm_tokens_per_s"]
    lines = [
        "# Triton vs in-process (CPU, `small` checkpoint, one run)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} CPU cores; {meta['triton']}. "
        f"{meta['note']}. Medians of turns with an image, 24 text tokens and speech on. "
        "Regenerate with `make bench`.",
        "",
        "| metric | Triton | in-process | ratio |",
        "|---|---|---|---|",
        *[f"| {k} | {t[k]:.1f} | {p[k]:.1f} | {r[k]:.2f} |" for k in t],
        "",
        "| concurrent LLM streams | aggregate tokens/s | gain vs 1 stream |",
        "|---|---|---|",
        f"| 1 | {rates['1']:.1f} | 1.00 |",
        *[f"| {n} | {rates[n]:.1f} | {results['batching_gain'][n]:.2f} |" for n in ("4", "8")],
    ]
    harness.publish(out, "triton", lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkpoint = harness.checkpoint(args)
    server = TritonServer(
        REPOSITORY, checkpoint, Path(".cache/triton-bench"), TritonPorts(18300, 18301, 18302)
    )
    server.start(timeout_s=300)
    try:
        results = asyncio.run(measure(server, checkpoint, args.repeats))
    finally:
        server.stop()
    write(results, args.out)


if __name__ == "__main__":
    main()
