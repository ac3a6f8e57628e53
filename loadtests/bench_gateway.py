"""The gateway vs in-process, one run on the `small` checkpoint (Redis, Triton, gateway real).

- time to first audio through the gateway (client side, over gRPC) vs in-process (ratio);
- p50 / p95 time to first audio with 1, 4, 8 and 16 concurrent sessions;
- cancel latency: cancel sent -> last audio byte received (barge-in), alone and 8 at once;
- the largest gap between audio chunks of a running reply, and the silence a client playing it
  would hear, alone and while others send images (twice: one pair is noise on a shared VM),
  with GetSession's latency meanwhile (is the gateway's event loop free?);
- a CPU profile of every row: CPU seconds each process (gateway, tritonserver, each model's
  stub) used, and how busy the machine's cores were: what bounds time to first audio.

Writes docs/benchmarks/gateway.{md,json}. Never asserted in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc

from iomni.auth import write_dev_tenant
from iomni.client import AsyncDialogueClient, chat_request
from iomni.engine.parts import InProcessParts
from iomni.engine.turn import TurnEngine
from iomni.model.checkpoint import load_checkpoint
from iomni.model.processor import Processor
from iomni.triton.server import TritonPorts, TritonServer
from loadtests import harness

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
KEY = "bench-key"
TOKENS = 24
SESSIONS = (1, 4, 8, 16)
# Turns per row at least (rounds of `sessions` at once): the ratio's denominator, p50 at one
# session, was a median of 2 and moved 560-845 ms between runs of the same code.
MIN_SAMPLES = 8
SIDE_BY_SIDE = 8  # gateway and in-process turns of each kind, alternated
CANCEL_WITHIN_S = 0.3  # a barge-in comes this long after the first audio at most
MARKS = ("first_token_ms", "tenth_token_ms", "last_token_ms", "first_audio_ms")
GAP_PAIRS = 2  # audio-gap measurements (alone, then while images), one after the other


PROMPT_TOKENS: list[int] = []  # of every measured gateway turn
TICKS = os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the gateway, tritonserver, each model's stub process and this
    benchmark's own processes (the client; Redis is left out)."""

    def __init__(self, gateway: int, triton: TritonServer) -> None:
        self.gateway, self.triton = gateway, triton

    def _processes(self) -> list[tuple[str, int]]:
        named = [("gateway", self.gateway)]
        if self.triton.process is not None:
            named.append(("tritonserver", self.triton.process.pid))
        for pid in self.triton.stub_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                named.append((Path(argv[1].decode()).parents[1].name, pid))
            except (OSError, IndexError):
                continue
        return named

    def read(self) -> dict[str, float]:
        """CPU seconds per process name; a model's instances are summed."""
        times: dict[str, float] = {}
        for name, pid in self._processes():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            used = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
            times[name] = times.get(name, 0.0) + used
        times["client"] = _own_cpu_s()
        return times

    def speech_passes(self) -> tuple[float, float]:
        """(replies, passes) the speech decoders' speech-token LM has decoded so far."""
        url = f"http://127.0.0.1:{self.triton.ports.metrics}/metrics"
        series = "iomni_speech_decode_batch_replies"
        return harness.scrape(url, f"{series}_sum"), harness.scrape(url, f"{series}_count")

    async def during(self, work) -> tuple:  # type: ignore[no-untyped-def]
        """(work's result, {process: CPU s}, busy share of all cores)."""
        before, started = self.read(), time.perf_counter()
        result = await work
        after, wall = self.read(), time.perf_counter() - started
        used = {k: after[k] - before.get(k, 0.0) for k in after}
        return result, used, sum(used.values()) / (wall * (os.cpu_count() or 1))


async def gateway_turn(client: AsyncDialogueClient, text: str, speech: bool = True) -> dict:
    """One greedy turn through the gateway (spoken unless `speech` is False): its
    `harness.TurnClock` marks."""
    request = chat_request(
        "", uuid.uuid4().hex, text=text, speech=speech, temperature=0.0, max_new_tokens=TOKENS
    )
    clock = harness.TurnClock()
    async for response in client.chat_stream(request):
        kind = response.WhichOneof("payload")
        if kind == "text":
            clock.text(response.text.token_index)
        elif kind == "audio":
            clock.audio()
        elif kind == "done":
            PROMPT_TOKENS.append(response.done.usage.prompt_tokens)
    return clock.marks


async def gateway_ttfa(client: AsyncDialogueClient, text: str) -> float:
    return (await gateway_turn(client, text))["first_audio_ms"]


async def concurrent(target: str, sessions: int, rounds: int = 2) -> list[float]:
    """TTFA of `rounds` rounds of `sessions` turns at once, after one round left out (it
    opens the connection and meets the batch shapes of this concurrency first)."""
    async with AsyncDialogueClient(target, KEY) as client:
        await asyncio.gather(*(gateway_ttfa(client, f"warm {i}") for i in range(sessions)))
        samples: list[float] = []
        for _ in range(rounds):
            samples += await asyncio.gather(
                *(gateway_ttfa(client, f"user {i}") for i in range(sessions))
            )
        return samples


async def inprocess_concurrent(engine: TurnEngine, sessions: int) -> dict[str, float]:
    """The embedded engine's first audio with `sessions` spoken turns at once, sampled as the
    gateway's rows are (a first round left out)."""
    await asyncio.gather(
        *(harness.inprocess_turn(engine, f"warm {i}", TOKENS) for i in range(sessions))
    )
    samples: list[float] = []
    for _ in range(max(2, MIN_SAMPLES // sessions)):
        turns = await asyncio.gather(
            *(harness.inprocess_turn(engine, f"user {i}", TOKENS) for i in range(sessions))
        )
        samples += [turn["first_audio_ms"] for turn in turns]
        PROMPT_TOKENS.extend(turn["prompt_tokens"] for turn in turns)
    return {
        "p50_ms": harness.percentile(samples, 0.5),
        "p95_ms": harness.percentile(samples, 0.95),
        "samples": len(samples),
    }


async def cancel_latency(
    target: str, repeats: int = 3, sessions: int = 1, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Converse with speech; cancel 0-300 ms after the first audio chunk (drawn, seeded: the
    cancel lands while the next chunk renders as well as between chunks), `sessions` at
    once. Returns (cancel -> last audio byte received, cancel -> turn done received) in ms."""
    if sessions > 1:
        runs = await asyncio.gather(
            *(cancel_latency(target, repeats, 1, seed + n) for n in range(sessions))
        )
        return [v for r in runs for v in r[0]], [v for r in runs for v in r[1]]
    out, done_after = [], []
    delays = random.Random(seed)
    async with AsyncDialogueClient(target, KEY) as client:
        for _ in range(repeats):
            barge_in = await harness.barge_in(client, after_s=delays.uniform(0.0, CANCEL_WITHIN_S))
            out.append(barge_in.to_last_audio_ms)
            done_after.append(barge_in.to_done_ms)
    return out, done_after


def start_gateway(
    checkpoint: Path, triton: TritonServer, redis_port: int, work: Path
) -> subprocess.Popen:
    write_dev_tenant(work / "tenants.json", "bench", KEY)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iomni.cli",
            "gateway",
            "--model",
            str(checkpoint),
            "--tenants",
            str(work / "tenants.json"),
            "--triton",
            triton.grpc_url,
            "--redis",
            f"redis://127.0.0.1:{redis_port}/0",
            "--port",
            "18451",
            "--metrics-port",
            "18452",
            "--realtime-port",
            "18453",
            "--host",
            "127.0.0.1",
        ],
        stdout=(work / "gateway.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while "gateway ready" not in (work / "gateway.log").read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("gateway did not start; see " + str(work / "gateway.log"))
        time.sleep(0.3)
    return process


async def audio_gaps(target: str, image: bytes | None, senders: int = 4) -> tuple[float, float]:
    """One long spoken reply, alone or while `senders` other sessions send large images back
    to back (`loadtests.image_senders`, a process of its own): the largest gap between its
    audio chunks (ms), and the silence (ms) a client playing it from the first chunk on would
    hear."""
    async with contextlib.AsyncExitStack() as stack:
        if image is not None:
            await stack.enter_async_context(_image_senders(target, image, senders))
        async with AsyncDialogueClient(target, KEY) as client:
            request = chat_request(
                "", uuid.uuid4().hex, text="talk", speech=True, temperature=0.0, max_new_tokens=150
            )
            chunks = []
            async for response in client.chat_stream(request):
                if response.WhichOneof("payload") == "audio":
                    audio = response.audio
                    chunks.append((time.perf_counter(), len(audio.pcm) / 2 / audio.sample_rate_hz))
    stamps = [arrived for arrived, _ in chunks]
    gap = max((b - a) * 1000 for a, b in zip(stamps, stamps[1:], strict=False))
    return gap, harness.silence_heard(chunks) * 1000


@contextlib.asynccontextmanager
async def _image_senders(target: str, image: bytes, senders: int) -> AsyncIterator[None]:
    """`loadtests.image_senders` running (its first image answered) while inside; it stops
    when its stdin closes, and is waited for (so its CPU counts in this one's children)."""
    with tempfile.NamedTemporaryFile(suffix=".png") as file:
        file.write(image)
        file.flush()
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "loadtests.image_senders", target, KEY, file.name),
            str(senders),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            if (await process.stdout.readline()).strip() != b"sending":
                raise RuntimeError("the image senders did not start; see their output above")
            yield
        finally:
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


def big_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


async def session_latency(target: str, stop: asyncio.Event) -> list[float]:
    """GetSession round trips (ms) until `stop`: a blocked event loop shows here first."""
    samples = []
    async with AsyncDialogueClient(target, KEY) as client:
        reply = await client.chat("", uuid.uuid4().hex, text="hi", max_new_tokens=1)
        while not stop.is_set():
            started = time.perf_counter()
            await client.get_session(reply.session_id)
            samples.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.05)
    return samples


async def gap_with_probe(
    target: str, image: bytes | None
) -> tuple[tuple[float, float], list[float]]:
    stop = asyncio.Event()
    probe = asyncio.create_task(session_latency(target, stop))
    try:
        return await audio_gaps(target, image), await _stop(probe, stop)
    finally:
        stop.set()


async def _stop(probe: asyncio.Task, stop: asyncio.Event) -> list[float]:
    stop.set()
    return await probe


def _profile(used: dict[str, float], busy: float) -> dict:
    return {"cpu_s": {k: round(v, 2) for k, v in sorted(used.items())}, "busy": round(busy, 3)}


async def measure_gaps(target: str, meter: CpuMeter) -> dict:
    """The probe reply alone, then while images arrive, `GAP_PAIRS` times: the largest gap
    between chunks is a maximum over ~30 gaps, and on a shared VM one pair is not enough to
    tell a stall from a hiccup."""
    gaps: dict[str, list[float]] = {"alone": [], "while_images": []}
    silences = {"alone": 0.0, "while_images": 0.0}
    probes: dict[str, list[float]] = {"alone": [], "while_images": []}
    used_total: dict[str, float] = {}
    busy_total = 0.0
    image = big_png()
    for _ in range(GAP_PAIRS):
        for key, sent in (("alone", None), ("while_images", image)):
            ((gap, silent), probe), used, busy = await meter.during(gap_with_probe(target, sent))
            gaps[key].append(gap)
            silences[key] = max(silences[key], silent)
            probes[key] += probe
        for name, seconds in used.items():  # the CPU of the run while images arrive
            used_total[name] = used_total.get(name, 0.0) + seconds
        busy_total += busy / GAP_PAIRS
    extras = [b - a for a, b in zip(gaps["alone"], gaps["while_images"], strict=True)]
    return {
        "audio_gap_ms": {
            **gaps,
            "extra": extras,
            "extra_mean": statistics.mean(extras),
        },
        "silence_heard_ms": silences,  # the most over the pairs
        "get_session_ms": {
            key: {"p50": harness.percentile(samples, 0.5), "max": max(samples)}
            for key, samples in probes.items()
        },
        "images_profile": _profile(used_total, busy_total),
    }


async def side_by_side(client: AsyncDialogueClient, engine: TurnEngine, meter: CpuMeter) -> dict:
    """The same turns through the gateway and in process, alternated (so that a slower minute
    of a shared machine weighs on both sides), spoken and text only: medians of each mark, and
    the CPU a spoken turn through the gateway costs each process (this client included).
    Which side goes first alternates too."""
    turns: dict[str, tuple[list[dict], list[dict]]] = {"spoken": ([], []), "text_only": ([], [])}
    used: dict[str, float] = {}
    for i in range(SIDE_BY_SIDE):
        for kind, speech in (("spoken", True), ("text_only", False)):
            via_gateway, local = turns[kind]
            if i % 2:  # who goes first alternates: what one leaves running weighs on both
                local.append(await harness.inprocess_turn(engine, f"q{i}", TOKENS, speech))
            before = meter.read() if speech else {}
            via_gateway.append(await gateway_turn(client, f"q{i}", speech))
            if speech:
                for name, seconds in meter.read().items():
                    used[name] = used.get(name, 0.0) + seconds - before.get(name, 0.0)
            if not i % 2:
                local.append(await harness.inprocess_turn(engine, f"q{i}", TOKENS, speech))
    return {
        "side_by_side": {
            kind: {"gateway": _medians(gateway), "in_process": _medians(local)}
            for kind, (gateway, local) in turns.items()
        },
        "spoken_turn_cpu_ms": {k: 1000 * v / SIDE_BY_SIDE for k, v in sorted(used.items())},
    }


def _medians(turns: list[dict]) -> dict[str, float]:
    return {mark: statistics.median(t[mark] for t in turns) for mark in MARKS}


def _own_cpu_s() -> float:
    """This process's CPU and its finished children's (the image senders, once joined)."""
    cpu = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        cpu += usage.ru_utime + usage.ru_stime
    return cpu


async def measure(target: str, checkpoint: Path, meter: CpuMeter) -> dict:
    parts = InProcessParts(load_checkpoint(checkpoint))
    starting = parts.prepare_speech()  # as the runtime does at startup
    if starting is not None:
        await asyncio.to_thread(starting.join)
    engine = TurnEngine(parts, Processor.from_checkpoint(checkpoint))
    async with AsyncDialogueClient(target, KEY) as client:
        await gateway_ttfa(client, "warm up")
        await harness.inprocess_turn(engine, "warm up", TOKENS)
        results = await side_by_side(client, engine, meter)
    spoken = results["side_by_side"]["spoken"]
    results["ttfa_gateway_ms"] = spoken["gateway"]["first_audio_ms"]
    results["ttfa_in_process_ms"] = spoken["in_process"]["first_audio_ms"]
    results["ratio"] = results["ttfa_gateway_ms"] / results["ttfa_in_process_ms"]
    results["in_process_sessions"] = {
        str(sessions): await inprocess_concurrent(engine, sessions) for sessions in (1, 8)
    }
    for sessions in SESSIONS:
        replies_before, passes_before = meter.speech_passes()
        rounds = max(2, MIN_SAMPLES // sessions)
        samples, used, busy = await meter.during(concurrent(target, sessions, rounds))
        replies, passes = meter.speech_passes()
        replies, passes = replies - replies_before, passes - passes_before
        results[f"sessions_{sessions}"] = {
            "p50_ms": harness.percentile(samples, 0.5),
            "p95_ms": harness.percentile(samples, 0.95),
            "samples": len(samples),
            "profile": _profile(used, busy),
            "replies_per_speech_lm_pass": replies / passes if passes else 0.0,
        }
    results["p95_at_8_over_p50_at_1"] = (
        results["sessions_8"]["p95_ms"] / results["sessions_1"]["p50_ms"]
    )
    results["prompt_tokens"] = {"min": min(PROMPT_TOKENS), "max": max(PROMPT_TOKENS)}
    for label, sessions in (("alone", 1), ("under_load", 8)):
        cancels, stops = await cancel_latency(target, repeats=3, sessions=sessions)
        results[f"cancel_{label}"] = {
            "to_last_audio_p50_ms": harness.percentile(cancels, 0.5),
            "to_last_audio_p95_ms": harness.percentile(cancels, 0.95),
            "to_done_p50_ms": harness.percentile(stops, 0.5),
            "to_done_p95_ms": harness.percentile(stops, 0.95),
            "samples": len(stops),
        }
    results.update(await measure_gaps(target, meter))
    return results


# The speech decoder's audio-changing latency settings (off by default; docs/speech.md).
LATENCY_SETTINGS = {"IOMNI_SPEECH_FIRST_CHUNK_TOKENS": "10", "IOMNI_SPEECH_FLOW_STEPS": "5"}


async def measure_settings(target: str) -> dict:
    """TTFA at 1 and 8 sessions on a stack whose speech decoder has the latency settings on."""
    async with AsyncDialogueClient(target, KEY) as client:
        await gateway_ttfa(client, "warm up")
    alone = await concurrent(target, 1, rounds=MIN_SAMPLES)
    loaded = await concurrent(target, 8)
    result = {
        "p50_at_1_ms": harness.percentile(alone, 0.5),
        "p95_at_8_ms": harness.percentile(loaded, 0.95),
    }
    result["p50_at_8_ms"] = harness.percentile(loaded, 0.5)
    result["p95_at_8_over_p50_at_1"] = result["p95_at_8_ms"] / result["p50_at_1_ms"]
    return result


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "checkpoint": "small",
        "reply": f"{TOKENS} text tokens with speech",
    }
    (out / "gateway.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    gaps = results["audio_gap_ms"]
    lines = [
        "# Gateway vs in-process (CPU, `small` checkpoint, one run)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} CPU cores: Redis, Triton (CPU profile) "
        f"and the gateway as real local processes; {meta['reply']}. Time to first audio is "
        "measured by the client, from sending the turn; gateway and in-process are medians of "
        f"{SIDE_BY_SIDE} turns of each kind, alternated. Regenerate with `make bench`.",
        "",
        *_side_by_side_lines(results),
        "",
        "| concurrent sessions | turns | p50 TTFA (ms) | p95 TTFA (ms) "
        "| replies per speech-LM pass |",
        "|---|---|---|---|---|",
        *[
            f"| {n} | {results[f'sessions_{n}']['samples']} | "
            f"{results[f'sessions_{n}']['p50_ms']:.0f} | "
            f"{results[f'sessions_{n}']['p95_ms']:.0f} | "
            f"{results[f'sessions_{n}']['replies_per_speech_lm_pass']:.2f} |"
            for n in SESSIONS
        ],
        "",
        f"p95 at 8 sessions ÷ p50 at 1: **{results['p95_at_8_over_p50_at_1']:.2f}**. Prompts: "
        f"{results['prompt_tokens']['min']}-{results['prompt_tokens']['max']} tokens. Each row "
        "leaves out a first round at its concurrency (the connection opens, batch shapes are "
        "met); p50 and p95 are nearest-rank: of 8 turns p95 is the slowest, of 16 the second "
        "slowest, of 32 the third slowest.",
        "",
        _inprocess_line(results),
        "",
        _settings_line(results["with_latency_settings"]),
        "",
        f"| barge-in (cancel 0-{CANCEL_WITHIN_S * 1000:.0f} ms after the first audio) "
        "| to last audio byte p50 / p95 (ms) "
        "| to `done` p50 / p95 (ms) |",
        "|---|---|---|",
        *[
            f"| {label} | {r['to_last_audio_p50_ms']:.0f} / {r['to_last_audio_p95_ms']:.0f} | "
            f"{r['to_done_p50_ms']:.0f} / {r['to_done_p95_ms']:.0f} |"
            for label, r in (
                ("1 session", results["cancel_alone"]),
                ("8 sessions at once", results["cancel_under_load"]),
            )
        ],
        "",
        f"Largest gap between audio chunks of a spoken reply, {GAP_PAIRS} pairs in a row: "
        f"{_each(gaps['alone'])} ms alone, {_each(gaps['while_images'])} ms while 4 other "
        f"sessions send 2000x1500 images (different bytes each turn: decoded and encoded every "
        f"time); difference {_each(gaps['extra'], '+')} ms, "
        f"**{gaps['extra_mean']:+.0f} ms** on average. A client playing "
        f"the reply from its first chunk on would hear "
        f"{results['silence_heard_ms']['alone']:.0f} ms of silence alone and "
        f"{results['silence_heard_ms']['while_images']:.0f} ms while images arrive (chunks "
        f"are 1 s of audio; early ones come faster than real time). GetSession meanwhile "
        f"(the gateway's event loop): p50/max {_probe(results, 'alone')} ms alone, "
        f"{_probe(results, 'while_images')} ms while images arrive.",
        "",
        "## Where the CPU goes (CPU seconds per process during each row)",
        "",
        "| row | cores busy | " + " | ".join(STAGES) + " |",
        "|---|---|" + "---|" * len(STAGES),
        *[_profile_row(f"{n} session(s)", results[f"sessions_{n}"]["profile"]) for n in SESSIONS],
        _profile_row(f"audio gap while images ({GAP_PAIRS} runs)", results["images_profile"]),
        "",
        "A session row's CPU includes its left-out first round. "
        "`client` is this benchmark's own processes (its turns' gRPC streams; the image "
        "senders, `loadtests.image_senders`); Redis is not counted. "
        "`cores busy` is CPU seconds used by these processes ÷ (wall time × cores): near 100% the "
        "machine is saturated and time to first audio grows with the work queued ahead of it, "
        "whatever the scheduling.",
    ]
    harness.publish(out, "gateway", lines)


STAGES = (
    "gateway",
    "tritonserver",
    "vision_encoder",
    "audio_encoder",
    "llm",
    "speech_decoder",
    "client",
)


SIDE_BY_SIDE_ROWS = (
    ("spoken", "first_token_ms", "first text token"),
    ("spoken", "tenth_token_ms", "10th text token (a first chunk's text)"),
    ("spoken", "first_audio_ms", "**first audio**"),
    ("text_only", "first_token_ms", "text only: first token"),
    ("text_only", "last_token_ms", f"text only: last ({TOKENS}th) token"),
)


def _side_by_side_lines(results: dict) -> list[str]:
    pairs = results["side_by_side"]
    rows = []
    for kind, mark, label in SIDE_BY_SIDE_ROWS:
        gateway, local = pairs[kind]["gateway"][mark], pairs[kind]["in_process"][mark]
        rows.append(f"| {label} | {gateway:.0f} | {local:.0f} | {gateway / local:.2f} |")
    cpu = results["spoken_turn_cpu_ms"]
    platform = (("gateway", "the gateway"), ("tritonserver", "tritonserver"))
    return [
        "| one session, side by side (ms from sending) | through the gateway | in-process "
        "| ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        "CPU per spoken turn through the gateway: "
        + ", ".join(f"{label} {cpu.get(name, 0.0):.0f} ms" for name, label in platform)
        + f" and this benchmark's client {cpu.get('client', 0.0):.0f} ms, beside the llm's "
        f"{cpu.get('llm', 0.0):.0f} ms and the speech decoder's "
        f"{cpu.get('speech_decoder', 0.0):.0f} ms. Where the llm and the speech decoder keep "
        "every core busy (a spoken reply's first chunk renders while the text runs on), that "
        "CPU is added to their time; text only, a core is left for it (docs/engine.md, "
        '"What the platform costs").',
    ]


def _settings_line(r: dict) -> str:
    return (
        "With the speech decoder's audio-changing latency settings on (off by default: "
        + ", ".join(f"{k}={v}" for k, v in LATENCY_SETTINGS.items())
        + f"; a second stack, same run): p50 at 1 session {r['p50_at_1_ms']:.0f} ms, "
        f"p50/p95 at 8 {r['p50_at_8_ms']:.0f}/{r['p95_at_8_ms']:.0f} ms, p95 at 8 ÷ p50 at 1 "
        f"**{r['p95_at_8_over_p50_at_1']:.2f}** (what they change in the audio: engine.md)."
    )


def _inprocess_line(results: dict) -> str:
    alone, eight = results["in_process_sessions"]["1"], results["in_process_sessions"]["8"]
    gateway = results["sessions_8"]["p95_ms"]
    return (
        f"The embedded engine in this process, the same way ({alone['samples']} and "
        f"{eight['samples']} turns): p50 at 1 session {alone['p50_ms']:.0f} ms, p50/p95 at 8 "
        f"{eight['p50_ms']:.0f}/{eight['p95_ms']:.0f} ms, p95 at 8 ÷ p50 at 1 "
        f"**{eight['p95_ms'] / alone['p50_ms']:.2f}**; p95 at 8, gateway ÷ in-process "
        f"**{gateway / eight['p95_ms']:.2f}**."
    )


def _each(values: list[float], sign: str = "") -> str:
    return " / ".join(f"{v:{sign}.0f}" for v in values)


def _probe(results: dict, key: str) -> str:
    probe = results["get_session_ms"][key]
    return f"{probe['p50']:.0f}/{probe['max']:.0f}"


def _profile_row(label: str, profile: dict) -> str:
    cpu = profile["cpu_s"]
    cells = " | ".join(f"{cpu.get(stage, 0.0):.1f}" for stage in STAGES)
    return f"| {label} | {100 * profile['busy']:.0f}% | {cells} |"


@contextlib.contextmanager
def gateway_stack(
    checkpoint: Path, prefix: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, int, TritonServer]]:
    """Redis, Triton (`env` added to its environment) and a gateway on loopback for one
    benchmark: (target, gateway pid, Triton)."""
    with harness.work_dir(prefix) as work:
        redis = harness.start_redis(18479)
        triton = TritonServer(
            REPOSITORY, checkpoint, work / "triton", TritonPorts(18400, 18401, 18402), env=env or {}
        )
        gateway = None
        try:
            triton.start(timeout_s=300)
            gateway = start_gateway(checkpoint, triton, 18479, work)
            yield "127.0.0.1:18451", gateway.pid, triton
        finally:
            if gateway is not None:
                gateway.send_signal(signal.SIGTERM)
                gateway.wait(60)
            triton.stop()
            redis.terminate()
            redis.wait(30)  # the next stack's Redis binds the same port


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    checkpoint = harness.checkpoint(args)
    try:
        with gateway_stack(checkpoint, "iomni-bench-") as (target, pid, triton):
            results = asyncio.run(measure(target, checkpoint, CpuMeter(pid, triton)))
        with gateway_stack(checkpoint, "iomni-bench-settings-", LATENCY_SETTINGS) as stack:
            results["with_latency_settings"] = asyncio.run(measure_settings(stack[0]))
    except grpc.RpcError as exc:
        raise SystemExit(f"bench failed: {exc.code().name}: {exc.details()}") from exc
    write(results, args.out)


if __name__ == "__main__":
    main()
