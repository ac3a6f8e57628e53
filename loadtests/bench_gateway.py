"""The gateway vs in-process, one run on the `small` checkpoint (Redis, Triton, gateway real).

- time to first audio through the gateway (client side, over gRPC) vs in-process (ratio);
- p50 / p95 time to first audio with 1, 4 and 8 concurrent sessions;
- cancel latency: cancel sent -> last audio byte received (barge-in).

Writes docs/benchmarks/gateway.{md,json}. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from iomni.client import AsyncDialogueClient, chat_request
from iomni.engine.events import AudioChunk
from iomni.engine.parts import InProcessParts, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.gateway.auth import write_dev_tenant
from iomni.model.checkpoint import load_checkpoint
from iomni.model.conversation import Message, TextPart
from iomni.model.generate import make_checkpoint
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.triton.server import TritonPorts, TritonServer
from iomni.v1 import dialogue_pb2 as pb

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
KEY = "bench-key"
TOKENS = 24


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def gateway_ttfa(client: AsyncDialogueClient, text: str) -> float:
    request = chat_request(
        "", uuid.uuid4().hex, text=text, speech=True, temperature=0.0, max_new_tokens=TOKENS
    )
    started = time.perf_counter()
    first = None
    async for response in client.chat_stream(request):
        if first is None and response.WhichOneof("payload") == "audio":
            first = time.perf_counter() - started
    return (first or float("nan")) * 1000


async def inprocess_ttfa(engine: TurnEngine, text: str) -> float:
    request = TurnRequest(
        user=Message("user", (TextPart(text),)),
        speech=SpeechOptions(),
        params=SamplingParams(temperature=0.0, max_new_tokens=TOKENS),
    )
    started = time.perf_counter()
    async for event in engine.start(request).events():
        if isinstance(event, AudioChunk):
            return (time.perf_counter() - started) * 1000
    return float("nan")


async def concurrent(target: str, sessions: int, rounds: int = 2) -> list[float]:
    async with AsyncDialogueClient(target, KEY) as client:
        samples: list[float] = []
        for _ in range(rounds):
            samples += await asyncio.gather(
                *(gateway_ttfa(client, f"user {i}") for i in range(sessions))
            )
        return samples


async def cancel_latency(target: str, repeats: int = 3) -> tuple[list[float], list[float]]:
    """Converse with speech; cancel on the first audio chunk. Returns (cancel -> last audio
    byte received, cancel -> turn done received) in ms."""
    out, done_after = [], []
    async with AsyncDialogueClient(target, KEY) as client:
        for _ in range(repeats):
            queue: asyncio.Queue = asyncio.Queue()
            config = pb.SessionConfig(
                output=pb.OutputOptions(speech=True),
                sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=200),
            )
            for request in (
                pb.ConverseRequest(config=config),
                pb.ConverseRequest(text=pb.UserText(text="talk")),
                pb.ConverseRequest(end_of_turn=pb.EndOfTurn()),
            ):
                queue.put_nowait(request)

            async def requests(queue=queue):  # type: ignore[no-untyped-def]
                while (item := await queue.get()) is not None:
                    yield item

            cancelled_at = last_audio = None
            async for response in client.converse(requests()):
                kind = response.WhichOneof("payload")
                if kind == "audio":
                    last_audio = time.perf_counter()
                    if cancelled_at is None:
                        cancelled_at = time.perf_counter()
                        queue.put_nowait(pb.ConverseRequest(cancel=pb.Cancel()))
                elif kind == "done":
                    done_after.append((time.perf_counter() - cancelled_at) * 1000)
                    queue.put_nowait(None)
            out.append(max(0.0, (last_audio - cancelled_at)) * 1000)
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


async def measure(target: str, checkpoint: Path) -> dict:
    async with AsyncDialogueClient(target, KEY) as client:
        await gateway_ttfa(client, "warm up")
        via_gateway = [await gateway_ttfa(client, f"q{i}") for i in range(3)]
    engine = TurnEngine(
        InProcessParts(load_checkpoint(checkpoint)), Processor.from_checkpoint(checkpoint)
    )
    await inprocess_ttfa(engine, "warm up")
    local = [await inprocess_ttfa(engine, f"q{i}") for i in range(3)]
    results = {
        "ttfa_gateway_ms": statistics.median(via_gateway),
        "ttfa_in_process_ms": statistics.median(local),
    }
    results["ratio"] = results["ttfa_gateway_ms"] / results["ttfa_in_process_ms"]
    for sessions in (1, 4, 8):
        samples = await concurrent(target, sessions)
        results[f"sessions_{sessions}"] = {
            "p50_ms": percentile(samples, 0.5),
            "p95_ms": percentile(samples, 0.95),
            "samples": len(samples),
        }
    cancels, stops = await cancel_latency(target)
    results["cancel_to_last_audio_ms"] = {"median": statistics.median(cancels), "max": max(cancels)}
    results["cancel_to_turn_done_ms"] = {"median": statistics.median(stops), "max": max(stops)}
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "checkpoint": "small",
        "reply": f"{TOKENS} text tokens with speech",
    }
    (out / "gateway.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        "# Gateway vs in-process (CPU, `small` checkpoint, one run)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} CPU cores: Redis, Triton (CPU profile) "
        f"and the gateway as real local processes; {meta['reply']}. Time to first audio is "
        "measured by the client, from sending the turn. Regenerate with `make bench`.",
        "",
        "| | time to first audio (ms) |",
        "|---|---|",
        f"| through the gateway (gRPC) | {results['ttfa_gateway_ms']:.0f} |",
        f"| in-process | {results['ttfa_in_process_ms']:.0f} |",
        f"| ratio | {results['ratio']:.2f} |",
        "",
        "| concurrent sessions | p50 TTFA (ms) | p95 TTFA (ms) |",
        "|---|---|---|",
        *[
            f"| {n} | {results[f'sessions_{n}']['p50_ms']:.0f} | "
            f"{results[f'sessions_{n}']['p95_ms']:.0f} |"
            for n in (1, 4, 8)
        ],
        "",
        f"Cancel (barge-in) to last audio byte received: median "
        f"{results['cancel_to_last_audio_ms']['median']:.0f} ms, max "
        f"{results['cancel_to_last_audio_ms']['max']:.0f} ms (no audio arrives after the "
        f"cancel); cancel to the turn's `done`: median "
        f"{results['cancel_to_turn_done_ms']['median']:.0f} ms, max "
        f"{results['cancel_to_turn_done_ms']['max']:.0f} ms.",
    ]
    (out / "gateway.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--checkpoints", type=Path, default=Path(".cache/checkpoints"))
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    checkpoint = args.checkpoints / "small"
    if not (checkpoint / "config.json").exists():
        make_checkpoint("small", checkpoint)
    work = Path(tempfile.mkdtemp(prefix="iomni-bench-"))
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "18479",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    triton = TritonServer(REPOSITORY, checkpoint, work / "triton", TritonPorts(18400, 18401, 18402))
    gateway = None
    try:
        triton.start(timeout_s=300)
        gateway = start_gateway(checkpoint, triton, 18479, work)
        results = asyncio.run(measure("127.0.0.1:18451", checkpoint))
    except grpc.RpcError as exc:
        raise SystemExit(f"bench failed: {exc.code().name}: {exc.details()}") from exc
    finally:
        if gateway is not None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(60)
        triton.stop()
        redis.terminate()
    write(results, args.out)


if __name__ == "__main__":
    main()
