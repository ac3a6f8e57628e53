"""TritonServer.start against a stand-in process: a launch that dies on a signal is tried once
more; one that exits with a status is not (a second launch would fail the same way)."""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from iomni.errors import Unavailable
from iomni.triton.server import START_ATTEMPTS, TritonPorts, TritonServer

# Appends a line to `launches`; then, by `plan` (one word per launch, the last repeats):
# `abort` dies on SIGABRT as 2.51 does, `exit` exits with 1, `serve` answers like a ready server.
STAND_IN = textwrap.dedent(
    """
    import http.server, os, sys
    launches, plan, port = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    with open(launches, "a") as f:
        f.write("launch\\n")
    n = sum(1 for _ in open(launches))
    what = plan[min(n, len(plan)) - 1]
    if what == "abort":
        os.abort()
    if what == "exit":
        sys.exit(1)

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def do_POST(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
    """
)


class StandInServer(TritonServer):
    plan: str = "serve"

    def command(self) -> list[str]:
        script = self.work / "stand_in.py"
        script.write_text(STAND_IN)
        launches = self.work / "launches"
        return [sys.executable, str(script), str(launches), self.plan, str(self.ports.http)]

    @property
    def launches(self) -> int:
        path = self.work / "launches"
        return len(path.read_text().splitlines()) if path.exists() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(tmp_path: Path, plan: str) -> StandInServer:
    stand_in = StandInServer(tmp_path, tmp_path, tmp_path / "work", TritonPorts(http=free_port()))
    stand_in.plan = plan
    return stand_in


def test_a_start_that_dies_on_a_signal_is_tried_once_more(tmp_path: Path) -> None:
    stand_in = server(tmp_path, "abort,serve")
    stand_in.start(timeout_s=20)
    try:
        assert stand_in.launches == 2
        assert stand_in.process is not None and stand_in.process.poll() is None
    finally:
        stand_in.stop(grace_s=0)


def test_a_start_that_keeps_dying_on_a_signal_is_unavailable(tmp_path: Path) -> None:
    stand_in = server(tmp_path, "abort")
    with pytest.raises(Unavailable, match=f"exited with -{int(signal.SIGABRT)}"):
        stand_in.start(timeout_s=20)
    assert stand_in.launches == START_ATTEMPTS


def test_a_start_that_exits_with_a_status_is_not_tried_again(tmp_path: Path) -> None:
    stand_in = server(tmp_path, "exit,serve")
    with pytest.raises(Unavailable, match="exited with 1"):
        stand_in.start(timeout_s=20)
    assert stand_in.launches == 1
