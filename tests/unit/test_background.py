"""The media pool runs its work off the event loop at a lower CPU priority."""

from __future__ import annotations

import asyncio
import os
import threading

from iomni import background


def _where() -> tuple[int, int]:
    tid = threading.get_native_id()
    return tid, os.getpriority(os.PRIO_PROCESS, tid)


def test_work_runs_on_another_thread_at_lower_priority() -> None:
    caller_tid, caller_nice = _where()
    tid, nice = asyncio.run(background.run(_where))
    assert tid != caller_tid
    assert nice == min(19, caller_nice + background.NICENESS)


def test_errors_reach_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad image")

    try:
        asyncio.run(background.run(fail))
    except ValueError as exc:
        assert str(exc) == "bad image"
    else:
        raise AssertionError("the error was lost")


def test_only_a_large_message_leaves_the_event_loop() -> None:
    """Hashing a small message costs less than the hop; a large one would stall the loop."""

    async def both() -> tuple[int, int]:
        small = await background.run_if_large(background.LOOP_BYTES, threading.get_native_id)
        large = await background.run_if_large(background.LOOP_BYTES + 1, threading.get_native_id)
        return small, large

    small, large = asyncio.run(both())
    assert small == threading.get_native_id() != large
