"""Engine-level figures under load, in-process on the `small` checkpoint, one run:

- inter-token latency of running streams while 3k-token prompts join: chunked prefill vs
  whole-prompt prefill (the batcher of both transports), against the undisturbed step;
- the cost of speech per chunk as the reply grows (32 / 128 / 512 text tokens): the flow
  streamed incrementally vs re-rendered from the start (the old way), side by side;
- the audio-changing latency settings (off by default): a short first chunk and fewer flow
  steps, their first-audio time and cost against the default's, and how far their audio is
  from the default's (log-spectral distance), beside the distance that vocoder noise alone
  makes.

Writes docs/benchmarks/engine.{md,json}. Never asserted in tests.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from iomni.model.batcher import ContinuousBatcher, SequenceRequest, StepEvent
from iomni.model.checkpoint import LoadedCheckpoint, load_checkpoint
from iomni.model.sampling import SamplingParams
from iomni.model.speech.stream import SpeechSession, SpeechSettings
from loadtests import harness

RUNNING = 4  # streams decoding throughout
JOINING = 3  # long prompts that join while they run
JOIN_TOKENS = 3000
SETTINGS_TEXT = 64  # text tokens of the reply the latency settings are measured on
VARIANTS = {
    "default": SpeechSettings(),
    "first_chunk_tokens=10": SpeechSettings(first_chunk_tokens=10),
    "flow_steps=5": SpeechSettings(flow_steps=5),
    "both": SpeechSettings(first_chunk_tokens=10, flow_steps=5),
}


class Stamps:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.done = threading.Event()

    def __call__(self, event: StepEvent) -> None:
        if event.token_id >= 0:
            self.times.append(time.perf_counter())
        if event.finish_reason or event.error:
            self.done.set()


def _request(ids: list[int], tokens: int, emit: Stamps) -> SequenceRequest:
    return SequenceRequest(
        ids, {}, SamplingParams(temperature=0.0, max_new_tokens=tokens), (), emit=emit
    )


def inter_token_latency(lm, prefill_chunk: int | None) -> dict:  # type: ignore[no-untyped-def]
    """ITL of RUNNING streams before and while JOINING long prompts are prefilled."""
    batcher = ContinuousBatcher(lm, max_batch=16, idle_wait_s=0.005, prefill_chunk=prefill_chunk)
    batcher.start()
    try:
        generator = torch.Generator().manual_seed(0)
        running = [Stamps() for _ in range(RUNNING)]
        for stamps in running:
            ids = torch.randint(1000, 100000, (64,), generator=generator).tolist()
            batcher.submit(_request(ids, 100000, stamps))
        time.sleep(3.0)  # undisturbed
        joined_at = time.perf_counter()
        joining = [Stamps() for _ in range(JOINING)]
        for stamps in joining:
            ids = torch.randint(1000, 100000, (JOIN_TOKENS,), generator=generator).tolist()
            batcher.submit(_request(ids, 4, stamps))
            time.sleep(0.3)
        for stamps in joining:
            stamps.done.wait(600)
        joined_until = max(s.times[0] for s in joining)
        time.sleep(0.5)
    finally:
        batcher.stop()

    def gaps(start: float, end: float) -> list[float]:
        out = []
        for stamps in running:
            t = [x for x in stamps.times if start <= x <= end]
            out += [(b - a) * 1000 for a, b in zip(t, t[1:], strict=False)]
        return out

    before = gaps(joined_at - 2.5, joined_at)
    during = gaps(joined_at, joined_until)
    first_token_ms = [(s.times[0] - joined_at) * 1000 for s in joining]
    return {
        "undisturbed_p50_ms": statistics.median(before),
        "undisturbed_p95_ms": harness.percentile(before, 0.95),
        "joining_p95_ms": harness.percentile(during, 0.95),
        "joining_max_ms": max(during),
        "p95_ratio": harness.percentile(during, 0.95) / harness.percentile(before, 0.95),
        "joining_first_token_ms": first_token_ms,
    }


def speech_cost(checkpoint: LoadedCheckpoint, text_tokens: int) -> dict:
    """ms of speech decoding per audio chunk, first and last, for one reply of `text_tokens`.

    The re-render baseline (the old way: every chunk renders the flow from the start) is timed
    on its first and last chunk only: running all of a 512-token reply that way takes far
    longer than the rest of this benchmark together."""
    model = checkpoint.model
    session = SpeechSession(
        model.voicelm, model.flow, model.hifigan, model.default_speaker_embedding
    )
    generator = torch.Generator().manual_seed(text_tokens)
    ids = torch.randint(0, 150000, (text_tokens,), generator=generator).tolist()
    hidden = torch.randn(text_tokens, checkpoint.config.llm_hidden_size, generator=generator)
    chunk_ms: list[float] = []
    total = time.perf_counter()
    for start in range(0, text_tokens, 5):
        began = time.perf_counter()
        out = session.push_text(ids[start : start + 5], hidden[start : start + 5])
        if out:
            chunk_ms.append((time.perf_counter() - began) * 1000)
    session.finish()
    total_ms = (time.perf_counter() - total) * 1000
    audio_s = session.samples_out / 24000
    incremental = {
        "speech_tokens": len(session.tokens),
        "chunks": len(chunk_ms),
        "first_chunk_ms": chunk_ms[0],
        "last_chunk_ms": chunk_ms[-1],
        "total_ms": total_ms,
        "audio_s": audio_s,
        "ms_per_audio_s": total_ms / audio_s,
    }
    flow, hop = model.flow, session.settings.token_hop + session.settings.lookahead
    re_render = {}
    for label, upto in (("first_chunk_ms", hop), ("last_chunk_ms", len(session.tokens))):
        ids_prefix = torch.tensor([session.tokens[:upto]])
        began = time.perf_counter()
        with torch.inference_mode():
            flow.inference(ids_prefix, session.speaker, finalize=False, streaming=True)
        re_render[label] = (time.perf_counter() - began) * 1000  # the flow part alone
    return {"incremental": incremental, "re_render": re_render}


def _speak(
    checkpoint: LoadedCheckpoint, settings: SpeechSettings, vocoder_seed: int | None = None
) -> tuple[float, float, np.ndarray]:
    """(ms from the reply's first text to its first audio, speech ms per audio second, audio):
    5 text tokens at a time, as the engine feeds them."""
    model = checkpoint.model
    session = SpeechSession(
        model.voicelm,
        model.flow,
        model.hifigan,
        model.default_speaker_embedding,
        seed=3,
        settings=settings,
    )
    if vocoder_seed is not None:
        session.vocoder.generator = torch.Generator().manual_seed(vocoder_seed)
    generator = torch.Generator().manual_seed(SETTINGS_TEXT)
    ids = torch.randint(0, 150000, (SETTINGS_TEXT,), generator=generator).tolist()
    hidden = torch.randn(SETTINGS_TEXT, checkpoint.config.llm_hidden_size, generator=generator)
    chunks: list[np.ndarray] = []
    began = time.perf_counter()
    first_ms = None
    for start in range(0, SETTINGS_TEXT, 5):
        chunks += session.push_text(ids[start : start + 5], hidden[start : start + 5])
        if chunks and first_ms is None:
            first_ms = (time.perf_counter() - began) * 1000
    chunks += session.finish()
    total_ms = (time.perf_counter() - began) * 1000
    audio = np.concatenate(chunks)
    return first_ms or total_ms, total_ms / (audio.size / 24000), audio


def log_spectral_distance(a: np.ndarray, b: np.ndarray) -> float:
    """dB, mean over 1024-point STFT frames of the RMS log-magnitude difference."""
    window = torch.hann_window(1024)

    def magnitude(x: np.ndarray) -> torch.Tensor:
        spectrum = torch.stft(torch.from_numpy(x), 1024, 256, window=window, return_complex=True)
        return spectrum.abs().clamp_min(1e-5)

    ratio = 20 * torch.log10(magnitude(a) / magnitude(b))
    return float(ratio.pow(2).mean(dim=0).sqrt().mean())


def latency_settings(checkpoint: LoadedCheckpoint, repeats: int = 3) -> dict:
    results: dict = {}
    for label, settings in VARIANTS.items():
        runs = [_speak(checkpoint, settings) for _ in range(repeats)]
        results[label] = {
            "first_audio_ms": statistics.median(r[0] for r in runs),
            "ms_per_audio_s": statistics.median(r[1] for r in runs),
            "audio": runs[0][2],
        }
    reference = results["default"]["audio"]
    noise = _speak(checkpoint, VARIANTS["default"], vocoder_seed=99)[2]
    for r in results.values():
        audio = r.pop("audio")
        r["samples"] = int(audio.size)
        r["lsd_db"] = log_spectral_distance(audio, reference)
    results["vocoder_noise_lsd_db"] = log_spectral_distance(noise, reference)
    return results


def measure(checkpoint: LoadedCheckpoint) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    lm = checkpoint.model.language_model
    results: dict = {
        "itl_chunked": inter_token_latency(lm, None),
        "itl_whole_prompt": inter_token_latency(lm, 1 << 30),
        "speech": {},
    }
    for tokens in (32, 128, 512):
        results["speech"][tokens] = speech_cost(checkpoint, tokens)
    results["latency_settings"] = latency_settings(checkpoint)
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "checkpoint": "small"}
    (out / "engine.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    chunked, whole = results["itl_chunked"], results["itl_whole_prompt"]
    lines = [
        "# The engine under load (CPU, `small` checkpoint, in-process, one run)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} CPU cores. Regenerate with `make bench`.",
        "",
        f"## Inter-token latency while {JOINING} prompts of {JOIN_TOKENS} tokens join "
        f"{RUNNING} running streams",
        "",
        "| prefill | undisturbed p95 (ms) | while joining p95 (ms) | ratio | worst gap (ms) "
        "| joiners' first token (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("chunked (adaptive, default)", chunked), ("whole prompt", whole)):
        firsts = ", ".join(f"{v:.0f}" for v in r["joining_first_token_ms"])
        lines.append(
            f"| {label} | {r['undisturbed_p95_ms']:.0f} | {r['joining_p95_ms']:.0f} | "
            f"{r['p95_ratio']:.2f} | {r['joining_max_ms']:.0f} | {firsts} |"
        )
    lines += [
        "",
        "## Speech cost as the reply grows",
        "",
        "| text tokens | speech tokens | audio (s) | incremental: first / last chunk (ms) "
        "| incremental: ms per audio s | re-render, flow alone: first / last chunk (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for tokens, r in results["speech"].items():
        inc, old = r["incremental"], r["re_render"]
        lines.append(
            f"| {tokens} | {inc['speech_tokens']} | {inc['audio_s']:.1f} | "
            f"{inc['first_chunk_ms']:.0f} / {inc['last_chunk_ms']:.0f} | "
            f"{inc['ms_per_audio_s']:.0f} | {old['first_chunk_ms']:.0f} / "
            f"{old['last_chunk_ms']:.0f} |"
        )
    lines += [
        "",
        "An incremental chunk does not re-render what came before (the flow keeps the states "
        "of the chunks it rendered): its cost grows only with the flow's attention over the "
        "reply's history, a few times the first chunk's after 100 s of audio. Re-rendering the "
        "flow from the start, as before, makes the last chunk of a long reply cost hundreds of "
        "times the first.",
    ]
    lines += _settings_lines(results["latency_settings"])
    harness.publish(out, "engine", lines)


def _settings_lines(results: dict) -> list[str]:
    default = results["default"]
    lines = [
        "",
        "## Latency settings (off by default: they change the audio)",
        "",
        f"One {SETTINGS_TEXT}-token reply fed 5 text tokens at a time, as the engine does; median "
        "of 3. `first_chunk_tokens` renders the first chunk from fewer speech tokens (audio after "
        "the first text group instead of the second); `flow_steps` runs fewer Euler steps of the "
        "flow's ODE (the checkpoint's is 10).",
        "",
        "| setting | first audio (ms) | ÷ default | speech ms per audio s | ÷ default "
        "| distance from the default's audio (LSD, dB) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        if not isinstance(r, dict):
            continue
        lsd = "–" if label == "default" else f"{r['lsd_db']:.2f}"
        lines.append(
            f"| {label} | {r['first_audio_ms']:.0f} | "
            f"{r['first_audio_ms'] / default['first_audio_ms']:.2f} | "
            f"{r['ms_per_audio_s']:.0f} | {r['ms_per_audio_s'] / default['ms_per_audio_s']:.2f} "
            f"| {lsd} |"
        )
    lines += [
        "",
        f"For scale: the same tokens with only the vocoder's noise reseeded are "
        f"{results['vocoder_noise_lsd_db']:.2f} dB from the default. Every setting keeps the "
        "length (40 ms per speech token). On the random `small` weights this says how much the "
        "signal moves, not how it sounds: judge a real checkpoint by ear before turning either on.",
    ]
    return lines


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    write(measure(load_checkpoint(harness.checkpoint(args))), args.out)


if __name__ == "__main__":
    main()
