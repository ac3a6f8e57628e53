"""`make soak DURATION=30m`: the real stack running turns back to back for a long time.

Redis, Triton and a gateway (tiny checkpoint) as real processes; SESSIONS clients each hold a
conversation of TURNS_PER_SESSION spoken turns, delete it and start another (so dialogue state
reaches a steady size instead of growing by design). Every minute it samples: errors, time to
first audio p50/p95, barge-in latencies, the RSS and open file descriptors of every process
(python-backend stubs included), Redis memory and key count.

Every BARGE_IN_EVERY-th turn of a conversation is a long spoken reply cut at its first audio
(a barge-in, through Converse), and the conversation goes on after it.

Passing: no errors, barge-ins' cancel -> done and cancel -> last audio byte p95 within
MAX_BARGE_IN_P95_MS, and no process whose memory trends upward: the least-squares slope of its
RSS over the last two thirds of the run (the first third is warm-up: caches fill, allocators
settle) must stay under MAX_SLOPE_MB_PER_MIN, and Redis memory's under
MAX_REDIS_SLOPE_MB_PER_MIN. Writes docs/benchmarks/soak.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from iomni.auth import write_dev_tenant
from iomni.client import AsyncDialogueClient, chat_request
from loadtests import harness
from loadtests.chaos import Proc, started

KEY = "soak-key"
SESSIONS = 4
TURNS_PER_SESSION = 10
BARGE_IN_EVERY = 5  # every 5th turn of a conversation is cut at its first audio
MAX_BARGE_IN_P95_MS = 50.0  # cancel -> done and cancel -> last audio byte, over the run
MAX_SLOPE_MB_PER_MIN = 2.0
MAX_REDIS_SLOPE_MB_PER_MIN = 0.5
MAX_FD_GROWTH = 16  # open descriptors at the end beyond the most seen once warmed up
PORTS = {"redis": 19579, "triton": 19500, "gateway": 19551}


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", text.strip())
    if match is None:
        raise SystemExit(f"DURATION must look like 30m, 600s or 1h, not {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


def processes(root_pids: list[int]) -> dict[int, str]:
    """Every process under the given ones (children, grandchildren), pid -> name."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        pid = int(stat.parent.name)
        parents[pid], names[pid] = int(fields[1]), name
    found = {}
    for pid in names:
        cursor, chain = pid, 0
        while cursor in parents and chain < 10:
            if cursor in root_pids:
                found[pid] = described(pid, names[pid])
                break
            cursor, chain = parents[cursor], chain + 1
    return found


def described(pid: int, name: str) -> str:
    """A python-backend stub is named by its model (its command line holds the model's path);
    a python process by its `iomni` command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    words = [a.decode(errors="replace") for a in argv]
    for word in words:
        if word.endswith("/1/model.py"):
            return f"stub {Path(word).parent.parent.name}"
    if "iomni.cli" in words and len(words) > words.index("iomni.cli") + 1:
        return f"iomni {words[words.index('iomni.cli') + 1]}"
    return name


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Soak:
    def __init__(self) -> None:
        self.ttfa: list[float] = []
        self.barge_ins: list[harness.BargeIn] = []
        self.errors: list[str] = []
        self.turns = 0
        self.stop = asyncio.Event()

    async def client(self, index: int) -> None:
        async with AsyncDialogueClient(f"127.0.0.1:{PORTS['gateway']}", KEY) as client:
            while not self.stop.is_set():
                session = ""
                for turn in range(TURNS_PER_SESSION):
                    if self.stop.is_set():
                        break
                    if session and turn % BARGE_IN_EVERY == BARGE_IN_EVERY - 1:
                        session = await self.barge_in(client, session, f"talk {turn} {index}")
                        continue
                    request = chat_request(
                        session, uuid.uuid4().hex, text=f"session turn {turn} from {index}",
                        speech=True, temperature=0.0, max_new_tokens=12,
                    )  # fmt: skip
                    started, first = time.perf_counter(), None
                    try:
                        async for response in client.chat_stream(request, timeout=60):
                            kind = response.WhichOneof("payload")
                            if kind == "audio" and first is None:
                                first = time.perf_counter() - started
                            elif kind == "done":
                                session = response.session_id
                        self.turns += 1
                        if first is not None:
                            self.ttfa.append(first * 1000)
                    except grpc.RpcError as exc:
                        self.errors.append(f"{exc.code().name}: {exc.details()}")
                if session:
                    try:
                        await client.delete_session(session)
                    except grpc.RpcError as exc:
                        self.errors.append(f"{exc.code().name}: {exc.details()}")

    async def barge_in(self, client: AsyncDialogueClient, session: str, text: str) -> str:
        """A long spoken reply of the conversation, cancelled at its first audio; the
        conversation goes on after it. Returns the session id."""
        try:
            cut = await harness.barge_in(client, session, text)
        except grpc.RpcError as exc:
            self.errors.append(f"barge-in: {exc.code().name}: {exc.details()}")
            return session
        except RuntimeError as exc:  # no audio to cut
            self.errors.append(f"barge-in: {exc}")
            return session
        self.turns += 1
        self.barge_ins.append(cut)
        return cut.session_id


async def sample(soak: Soak, procs: dict[str, Proc], since: float) -> dict:
    roots = [p.process.pid for p in procs.values() if p.process is not None]
    tree = processes(roots)
    by_name: dict[str, float] = {}
    fds: dict[str, int] = {}
    for pid, name in tree.items():
        key = f"{name}[{pid}]"
        by_name[key] = round(rss_mb(pid), 1)
        fds[key] = open_fds(pid)
    client = aioredis.Redis(port=PORTS["redis"])
    try:
        info = await client.info("memory")
        keys = await client.dbsize()
    finally:
        await client.aclose()
    ttfa, soak.ttfa = soak.ttfa, []
    cuts, soak.barge_ins = soak.barge_ins, []
    errors, soak.errors = soak.errors, []
    return {
        "minute": round((time.monotonic() - since) / 60, 2),
        "turns": soak.turns,
        "errors": errors,
        "ttfa_p50_ms": statistics.median(ttfa) if ttfa else None,
        "ttfa_p95_ms": sorted(ttfa)[int(0.95 * (len(ttfa) - 1))] if ttfa else None,
        "barge_in_to_done_ms": [round(c.to_done_ms, 1) for c in cuts],
        "barge_in_to_last_audio_ms": [round(c.to_last_audio_ms, 1) for c in cuts],
        "rss_mb": by_name,
        "open_fds": fds,
        "redis_used_mb": round(info["used_memory"] / 2**20, 2),
        "redis_keys": keys,
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per minute)."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def verdict(samples: list[dict]) -> dict:
    settled = samples[len(samples) // 3 :]
    slopes = {}
    for name in settled[-1]["rss_mb"]:
        points = [(s["minute"], s["rss_mb"][name]) for s in settled if name in s["rss_mb"]]
        slopes[name] = round(slope(points), 3)
    redis_slope = slope([(s["minute"], s["redis_used_mb"]) for s in settled])
    errors = sum(len(s["errors"]) for s in samples)
    growing = {n: v for n, v in slopes.items() if v > MAX_SLOPE_MB_PER_MIN}
    # Descriptors: a leak adds some every turn, so the count at the end would be far above
    # the most seen while warmed up; a few come and go with connections.
    fd_growth = {
        name: settled[-1]["open_fds"][name] - max(s["open_fds"].get(name, 0) for s in settled[:2])
        for name in settled[-1]["open_fds"]
    }
    leaking = {n: v for n, v in fd_growth.items() if v > MAX_FD_GROWTH}
    barge_in = {
        key: _spread([ms for s in samples for ms in s[f"barge_in_{key}_ms"]])
        for key in ("to_done", "to_last_audio")
    }
    slow_barge_in = any(b["p95"] > MAX_BARGE_IN_P95_MS for b in barge_in.values() if b["count"])
    return {
        "errors": errors,
        "barge_in_ms": barge_in,
        "rss_slope_mb_per_min": slopes,
        "redis_slope_mb_per_min": round(redis_slope, 3),
        "growing": growing,
        "fd_growth": fd_growth,
        "fds_leaking": leaking,
        "passed": errors == 0
        and not slow_barge_in
        and barge_in["to_done"]["count"] > 0
        and not growing
        and not leaking
        and redis_slope <= MAX_REDIS_SLOPE_MB_PER_MIN,
    }


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    return {
        "count": len(values),
        "p50": harness.percentile(values, 0.5),
        "p95": harness.percentile(values, 0.95),
        "max": max(values),
    }


def plot(samples: list[dict], path: Path) -> None:
    """RSS of the largest processes and Redis memory over time, drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height, margin = 900, 420, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    names = sorted(samples[-1]["rss_mb"], key=lambda n: -samples[-1]["rss_mb"][n])[:6]
    series = {n: [(s["minute"], s["rss_mb"].get(n)) for s in samples] for n in names}
    series["redis used memory"] = [(s["minute"], s["redis_used_mb"]) for s in samples]
    top = max(v for pts in series.values() for _, v in pts if v) * 1.1
    end = max(samples[-1]["minute"], 1)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#ff7f0e"]
    draw.rectangle((margin, margin, width - margin, height - margin), outline="black")
    for index, (name, points) in enumerate(series.items()):
        xy = [
            (
                margin + (m / end) * (width - 2 * margin),
                height - margin - (v / top) * (height - 2 * margin),
            )
            for m, v in points
            if v is not None
        ]
        if len(xy) > 1:
            draw.line(xy, fill=colours[index % len(colours)], width=2)
        draw.text((margin + 5, margin + 5 + 14 * index), name, fill=colours[index % len(colours)])
    draw.text((margin, height - margin + 8), f"0 .. {end:.0f} min", fill="black")
    draw.text((5, margin - 20), f"MB (top {top:.0f})", fill="black")
    image.save(path)


async def run(procs: dict[str, Proc], seconds: float) -> list[dict]:
    soak = Soak()
    clients = [asyncio.create_task(soak.client(i)) for i in range(SESSIONS)]
    since = time.monotonic()
    samples = []
    while time.monotonic() - since < seconds:
        await asyncio.sleep(min(60, seconds - (time.monotonic() - since)))
        samples.append(await sample(soak, procs, since))
        last = samples[-1]
        print(
            f"minute {last['minute']:5.1f}: {last['turns']} turns, {len(last['errors'])} errors, "
            f"TTFA p50 {last['ttfa_p50_ms']} ms, redis {last['redis_used_mb']} MB",
            flush=True,
        )
    soak.stop.set()
    await asyncio.gather(*clients, return_exceptions=True)
    return samples


def write(samples: list[dict], result: dict, seconds: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"verdict": result, "samples": samples}, indent=2))
    plot(samples, out / "soak.png")
    ttfa = [s["ttfa_p50_ms"] for s in samples if s["ttfa_p50_ms"]]
    lines = [
        f"# Soak: {seconds / 60:.0f} minutes of turns back to back (CPU, `tiny`, one run)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores: Redis, Triton and "
        f"a gateway as real processes; {SESSIONS} clients, each a conversation of "
        f"{TURNS_PER_SESSION} spoken turns then deleted and begun again. Regenerate with "
        "`make soak DURATION=…`.",
        "",
        f"**{'PASSED' if result['passed'] else 'FAILED'}**: {result['errors']} errors; "
        f"{samples[-1]['turns']} turns; TTFA p50 per minute from {min(ttfa):.0f} to "
        f"{max(ttfa):.0f} ms. Memory trend (least-squares slope over the last two thirds, limit "
        f"{MAX_SLOPE_MB_PER_MIN} MB/min per process, {MAX_REDIS_SLOPE_MB_PER_MIN} MB/min for "
        f"Redis): Redis {result['redis_slope_mb_per_min']} MB/min. Open descriptors may end at "
        f"most {MAX_FD_GROWTH} above the most seen once warmed up; growth beyond: "
        f"{result['fds_leaking'] or 'none'}.",
        "",
        _barge_in_line(result["barge_in_ms"]),
        "",
        "| process | RSS first / last sample (MB) | slope (MB/min) | open fds first / last |",
        "|---|---|---|---|",
    ]
    first, last = samples[0], samples[-1]
    for name, value in sorted(result["rss_slope_mb_per_min"].items(), key=lambda kv: -kv[1]):
        lines.append(
            f"| {name} | {first['rss_mb'].get(name, '-')} / {last['rss_mb'].get(name)} | {value} | "
            f"{first['open_fds'].get(name, '-')} / {last['open_fds'].get(name)} |"
        )
    lines += [
        "",
        f"Redis: {first['redis_used_mb']} → {last['redis_used_mb']} MB, keys {first['redis_keys']}"
        f" → {last['redis_keys']}.",
        "",
        "![memory over the run](soak.png)",
    ]
    harness.publish(out, "soak", lines)


def _barge_in_line(barge_in: dict[str, dict[str, float]]) -> str:
    done, audio = barge_in["to_done"], barge_in["to_last_audio"]
    return (
        f"Barge-ins (every {BARGE_IN_EVERY}th turn of a conversation is a long spoken reply cut "
        f"at its first audio; the conversation goes on): {done['count']} over the run, while "
        f"the other sessions talk. Cancel → `done` p50 / p95 / max {done['p50']:.0f} / "
        f"{done['p95']:.0f} / {done['max']:.0f} ms; cancel → last audio byte "
        f"{audio['p50']:.0f} / {audio['p95']:.0f} / {audio['max']:.0f} ms (limit: p95 "
        f"{MAX_BARGE_IN_P95_MS:.0f} ms each)."
    )


def stack(work: Path, checkpoint: Path) -> dict[str, Proc]:
    """Redis, Triton and a gateway for the soak, logging into `work` (not started)."""
    write_dev_tenant(work / "tenants.json", "soak", KEY)
    iomni = [sys.executable, "-m", "iomni.cli"]
    return {
        "redis": Proc(
            "redis",
            harness.redis_command(PORTS["redis"], "--appendonly", "yes", "--dir", str(work)),
            work / "redis.log", "Ready to accept connections",
        ),
        "triton": Proc(
            "triton",
            [*iomni, "triton", "serve", "--model", str(checkpoint), "--work", str(work / "triton"),
             "--http-port", str(PORTS["triton"]), "--grpc-port", str(PORTS["triton"] + 1),
             "--metrics-port", str(PORTS["triton"] + 2)],
            work / "triton.log", "triton ready",
        ),
        "gateway": Proc(
            "gateway",
            [*iomni, "gateway", "--model", str(checkpoint), "--tenants", str(work / "tenants.json"),
             "--triton", f"127.0.0.1:{PORTS['triton'] + 1}", "--redis",
             f"redis://127.0.0.1:{PORTS['redis']}/0", "--port", str(PORTS["gateway"]),
             "--metrics-port", str(PORTS["gateway"] + 1), "--realtime-port",
             str(PORTS["gateway"] + 2)],
            work / "gateway.log", "gateway ready",
        ),
    }  # fmt: skip


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--duration", default=os.environ.get("DURATION", "30m"))
    args = parser.parse_args()
    seconds = duration_s(args.duration)
    checkpoint = harness.checkpoint(args, "tiny")
    with harness.work_dir("iomni-soak-") as work:  # its logs kept if the soak fails
        with started(stack(work, checkpoint)) as procs:
            samples = asyncio.run(run(procs, seconds))
        result = verdict(samples)
        write(samples, result, seconds, args.out)
        if not result["passed"]:
            raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
