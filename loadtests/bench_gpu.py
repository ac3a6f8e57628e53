"""GPU benchmark: the embedded (in-process) engine on CUDA in bfloat16, for the generated
`small` and `4b` checkpoints: time to first audio at 1 and 8 concurrent spoken turns, LLM
decode tokens/s at 1 and 8 streams, and the speech decoder's real-time factor.

Writes docs/benchmarks/gpu.{md,json}. On a machine without CUDA it says so and writes nothing
(`make bench` runs it everywhere). A checkpoint that is missing is generated first; the next
size's is generated in a separate process while the current size is measured.

Each figure is measured in its own try: a failure is written down with its error and the
rest still run, so one run on a borrowed machine says as much as it can.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from iomni.engine.parts import InProcessParts
from iomni.engine.turn import TurnEngine
from iomni.model.checkpoint import load_checkpoint
from iomni.model.generate import make_checkpoint
from iomni.model.processor import Processor
from loadtests import harness
from loadtests.bench_inprocess import speech_rtf

SIZES = ("small", "4b")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
REPLY_TOKENS = 24  # as bench_gateway's turns
CONCURRENT = 8
ROUNDS = 3  # rounds of CONCURRENT turns at once
ALONE = 5  # turns one after another
PROMPT_TOKENS = 128  # decode-rate prompts
DECODE_TOKENS = 128
SPEECH_TEXT_TOKENS = 200  # the RTF utterance: about 40 s of audio


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


async def decode_streams(parts: InProcessParts, streams: int) -> dict[str, float]:
    """Aggregate and slowest-stream decode rates (hidden states on, as a spoken turn has)."""
    return await harness.decode_rate(
        parts, streams, PROMPT_TOKENS, DECODE_TOKENS, return_hidden=True
    )


async def first_audio(engine: TurnEngine) -> dict[str, float]:
    await harness.inprocess_turn(engine, "warm up", REPLY_TOKENS)
    alone = [
        await harness.inprocess_turn(engine, f"question {i}", REPLY_TOKENS) for i in range(ALONE)
    ]
    loaded = []
    for round_ in range(ROUNDS):
        loaded += await asyncio.gather(
            *(
                harness.inprocess_turn(engine, f"user {i} round {round_}", REPLY_TOKENS)
                for i in range(CONCURRENT)
            )
        )
    at_1 = [t["first_audio_ms"] for t in alone]
    at_8 = [t["first_audio_ms"] for t in loaded]
    tokens = sorted({int(t["prompt_tokens"]) for t in alone + loaded})
    return {
        "ttfa_p50_at_1_ms": harness.percentile(at_1, 0.5),
        "ttfa_p50_at_8_ms": harness.percentile(at_8, 0.5),
        "ttfa_p95_at_8_ms": harness.percentile(at_8, 0.95),
        "ttfa_p95_at_8_over_p50_at_1": harness.percentile(at_8, 0.95)
        / harness.percentile(at_1, 0.5),
        "ttfa_prompt_tokens": f"{tokens[0]}-{tokens[-1]}",
    }


def measure(result: dict, name: str, fn: Callable[[], dict], save: Callable[[], None]) -> None:
    """Run one measurement into `result` and save at once (a run cut off at its time limit
    keeps what it measured); a failure is recorded, not raised."""
    started = time.perf_counter()
    try:
        figures = fn()
        result.update(figures)
        print(f"  {name}: {json.dumps(figures, default=str)}", flush=True)
    except Exception as exc:  # a borrowed machine: keep going, say what failed
        traceback.print_exc()
        result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
    print(f"  {name}: {time.perf_counter() - started:.1f} s", flush=True)
    save()


def bench_size(
    result: dict,
    path: Path,
    device: str,
    dtype: torch.dtype,
    save: Callable[[], None],
    cudnn_ab: bool = False,
) -> None:
    """Fill `result` with one size's figures, saving after each."""
    started = time.perf_counter()
    checkpoint = load_checkpoint(path, dtype=dtype, device=device)
    synchronize()
    result["load_s"] = time.perf_counter() - started
    result["parameters_billions"] = sum(p.numel() for p in checkpoint.model.parameters()) / 1e9
    parts = InProcessParts(checkpoint)
    engine = TurnEngine(parts, Processor.from_checkpoint(path))

    async def decode() -> dict:
        await decode_streams(parts, 1)  # warm-up
        one = await decode_streams(parts, 1)
        eight = await decode_streams(parts, CONCURRENT)
        return {
            "decode_tokens_per_s_at_1": one["tokens_per_s"],
            f"decode_tokens_per_s_at_{CONCURRENT}": eight["tokens_per_s"],
            f"decode_gain_at_{CONCURRENT}": eight["tokens_per_s"] / one["tokens_per_s"],
            f"decode_slowest_stream_at_{CONCURRENT}": eight["slowest_stream_tokens_per_s"],
        }

    def rtf() -> dict:
        speech_rtf(checkpoint, 20)  # warm-up
        return speech_rtf(checkpoint, SPEECH_TEXT_TOKENS)

    def memory() -> dict:
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}

    def without_cudnn() -> dict:
        """Decode at 8 and a short utterance's RTF with and without cuDNN (attention and
        convolutions): it builds a plan per new shape, and every decode step's KV length and
        every speech chunk's length is new."""
        short = speech_rtf(checkpoint, 50)["speech_rtf"]
        torch.backends.cudnn.enabled = False
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            eight = asyncio.run(decode_streams(parts, CONCURRENT))
            return {
                "speech_rtf_50_tokens": short,
                "cudnn_off_speech_rtf_50_tokens": speech_rtf(checkpoint, 50)["speech_rtf"],
                f"cudnn_off_decode_tokens_per_s_at_{CONCURRENT}": eight["tokens_per_s"],
            }
        finally:
            torch.backends.cudnn.enabled = True
            torch.backends.cuda.enable_cudnn_sdp(True)

    measure(result, "decode", lambda: asyncio.run(decode()), save)
    measure(result, "speech_rtf", rtf, save)
    measure(result, "first_audio", lambda: asyncio.run(first_audio(engine)), save)
    if torch.cuda.is_available():
        measure(result, "memory", memory, save)
        if cudnn_ab:
            measure(result, "without_cudnn", without_cudnn, save)
    asyncio.run(parts.close())


def write_report(meta: dict, results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n"
    )
    lines = [
        f"# In-process engine on {meta['gpu']} ({meta['dtype']})",
        "",
        f"Measured {meta['date']} with torch {meta['torch']}, {meta['cpu_count']} CPU cores. "
        "Random weights (the generated checkpoints), greedy decoding, the embedded engine "
        "(`InProcessParts`): no Triton, no gateway. One run; regenerate with "
        "`python -m loadtests.bench_gpu` on a CUDA machine.",
        "",
        f"- TTFA: spoken turns of {REPLY_TOKENS} tokens, {ALONE} one after another "
        f"(p50 at 1), then {ROUNDS} rounds of {CONCURRENT} at once (p50/p95 at "
        f"{CONCURRENT}); each turn read to its end.",
        f"- Decode: {PROMPT_TOKENS}-token prompts, {DECODE_TOKENS} new tokens; tokens / wall "
        "time from the start, prefill included (as bench_triton counts); the slowest "
        "stream's own rate after its first token beside it.",
        f"- Speech RTF: the speech decoder alone (voice LM, flow, vocoder) on "
        f"{SPEECH_TEXT_TOKENS} text tokens, wall time / audio time.",
        "",
        *harness.metric_table(results),
    ]
    for size, result in results.items():
        for name, error in result.get("errors", {}).items():
            lines.append(f"\n{size}, {name}: not measured: {error}")
    harness.publish(out, "gpu", lines)


def _generate(size: str, path: Path) -> multiprocessing.Process | None:
    if (path / "config.json").exists():
        return None
    process = multiprocessing.get_context("spawn").Process(
        target=make_checkpoint, args=(size, path)
    )
    process.start()
    return process


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument(
        "--cudnn-ab", action="store_true", help="also measure decode at 8 and RTF without cuDNN"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here, nothing measured")
        return
    import transformers

    transformers.logging.set_verbosity_error()
    meta = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "cpu_count": multiprocessing.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    results: dict[str, dict] = {}
    paths = [args.checkpoints / size for size in args.sizes]
    pending = _generate(args.sizes[0], paths[0])
    for index, (size, path) in enumerate(zip(args.sizes, paths, strict=True)):
        started = time.perf_counter()
        if pending is not None:
            pending.join()
            if pending.exitcode != 0:
                results[size] = {"errors": {"generate": f"exit code {pending.exitcode}"}}
                continue
        waited = time.perf_counter() - started
        following = index + 1 < len(paths)
        pending = _generate(args.sizes[index + 1], paths[index + 1]) if following else None
        print(f"{size}: checkpoint ready (waited {waited:.1f} s)", flush=True)
        results[size] = {"checkpoint_wait_s": waited}

        def save() -> None:
            write_report(meta, results, args.out)

        try:
            bench_size(results[size], path, args.device, DTYPES[args.dtype], save, args.cudnn_ab)
        except Exception as exc:
            traceback.print_exc()
            results[size].setdefault("errors", {})["load"] = f"{type(exc).__name__}: {exc}"
            save()
    if pending is not None:
        pending.join()


if __name__ == "__main__":
    main()
