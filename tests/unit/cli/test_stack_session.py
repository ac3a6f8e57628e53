"""`iomni stack up` starts the servers from one new session: detached from the terminal, and
one scheduling group (Linux autogroup), so a part's `nice` weighs against the others."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from iomni.cli import stack


def test_the_work_runs_as_leader_of_a_new_session(tmp_path: Path) -> None:
    seen = tmp_path / "session"
    stack._in_new_session(lambda: seen.write_text(f"{os.getsid(0)} {os.getpid()}"))
    session, pid = map(int, seen.read_text().split())
    assert session == pid != os.getpid()
    assert session != os.getsid(0)


def test_a_failure_in_the_session_is_the_callers_exit_status(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stopped:
        stack._in_new_session(lambda: sys.exit("triton not ready after 600 s"))
    assert stopped.value.code == 1
    assert "triton not ready after 600 s" in capfd.readouterr().err


def test_a_plain_exit_in_the_session_is_success() -> None:
    stack._in_new_session(lambda: sys.exit())
