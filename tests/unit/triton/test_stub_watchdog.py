"""A stub whose Python cannot run (a thread blocked inside a call that keeps the GIL, as a
custom-metric call into a dead tritonserver does) still exits: faulthandler's timer needs no
GIL."""

from __future__ import annotations

import subprocess
import sys
import time

WEDGED = """
import ctypes
from iomni.triton import backend
backend.watch_parent(interval_s=0.1, wedged_s=1.0)
ctypes.PyDLL(None).sleep(30)  # PyDLL keeps the GIL for the whole call
"""


def test_a_stub_wedged_holding_the_gil_exits() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", WEDGED], capture_output=True, text=True, timeout=25
    )
    assert done.returncode == 1, done.stderr
    assert "Timeout" in done.stderr and "sleep" not in done.stdout
    assert time.monotonic() - started < 20
