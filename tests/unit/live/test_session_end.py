"""How a live session's replies end when something goes wrong or the client stops sending:
a turn that fails on a bug is a warning, a reply in progress when the request stream ends is
finished and committed. Typed text starts the turns: no speech needed."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from iomni.errors import ErrorCode
from iomni.live.session import LiveSession, LiveSettings, LiveWarning
from iomni.model.sampling import SamplingParams
from iomni.runtime.build import Runtime
from iomni.turns.runner import RunnerLimits, RunningTurn, TurnFinished, TurnInput

PARAMS = SamplingParams(temperature=0.0, max_new_tokens=24)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    async def __call__(self, turn_id: str, event: object) -> None:
        self.events.append((turn_id, event))

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for _, e in self.events if isinstance(e, kind)]

    async def wait_for(self, kind: type, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.of(kind):
            assert time.monotonic() < deadline, f"no {kind.__name__}: {self.events}"
            await asyncio.sleep(0.02)


class StubRunner:
    """A turn core whose turns fail on a bug, or run until cancelled."""

    limits = RunnerLimits()

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.cancelled = False

    async def run(self, turn: TurnInput, emit, running: RunningTurn) -> None:  # type: ignore[no-untyped-def]
        if self.fail:
            raise KeyError("a bug")
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled = True


def stub_session(runner: StubRunner) -> tuple[LiveSession, Recorder]:
    events = Recorder()
    session = LiveSession(runner, "acme", "s1", PARAMS, None, LiveSettings(), events)  # type: ignore[arg-type]
    return session, events


async def test_a_turn_failing_on_a_bug_is_a_warning_and_a_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session, events = stub_session(StubRunner(fail=True))
    session.add_text("hello")
    with caplog.at_level(logging.ERROR):
        assert await session.commit()
        await events.wait_for(LiveWarning)
    (warning,) = events.of(LiveWarning)
    assert warning.code is ErrorCode.INTERNAL
    assert warning.message == f"turn {session.reply.turn_id} failed: KeyError"  # type: ignore[union-attr]
    assert any(r.exc_info for r in caplog.records), "no traceback logged"
    assert session.reply is not None and session.reply.finished
    await session.close()


async def test_finishing_waits_for_the_reply_only_so_long() -> None:
    runner = StubRunner(fail=False)
    session, _ = stub_session(runner)
    session.add_text("hello")
    await session.commit()
    await asyncio.wait_for(session.finish(timeout_s=0.2), 10)
    assert runner.cancelled


async def test_a_reply_in_progress_when_the_client_stops_sending_is_finished(
    runtime: Runtime,
) -> None:
    """The request stream ends (the client has said all it will) while a reply runs: the
    reply still ends with its done and is committed, as a queued manual turn is."""
    session_id = (await runtime.store.create_session("acme")).session_id
    events = Recorder()
    session = LiveSession(runtime.runner, "acme", session_id, PARAMS, None, LiveSettings(), events)
    session.add_text("Tell me about the sea")
    assert await session.commit()
    await asyncio.wait_for(session.finish(), 60)
    assert len(events.of(TurnFinished)) == 1, f"the reply never finished: {events.events}"
    (finished,) = events.of(TurnFinished)
    assert finished.stop_reason in ("eos", "length")
    history = await runtime.store.history("acme", session_id)
    assert [m.role for m in history] == ["user", "assistant"]
    assert history[1].text == finished.text


class CountingRunner(StubRunner):
    """Turns that run until cancelled, counted as they start."""

    def __init__(self) -> None:
        super().__init__(fail=False)
        self.started: list[str] = []

    async def run(self, turn: TurnInput, emit, running: RunningTurn) -> None:  # type: ignore[no-untyped-def]
        self.started.append(turn.turn_id)
        await super().run(turn, emit, running)


async def test_turns_waiting_for_the_one_before_never_start_once_the_client_is_gone() -> None:
    """Three replies asked for, one after another: the first runs, two wait behind it. The
    client goes: the first is cancelled and the other two never run (a waiting turn used to
    swallow the cancel, start with nobody listening and commit an empty reply)."""
    runner = CountingRunner()
    session, _ = stub_session(runner)
    for text in ("one", "two", "three"):
        session.add_text(text)
        assert await session.commit()
    await asyncio.sleep(0.1)
    assert len(runner.started) == 1
    closing = asyncio.ensure_future(session.close())
    done, _ = await asyncio.wait([closing], timeout=5)  # wait_for would hang on a stuck close
    assert len(runner.started) == 1, f"{len(runner.started)} turns ran after close"
    assert done, "close() did not return: a turn that waited is running with nobody listening"
    assert runner.cancelled
    assert all(reply.finished for reply in session.replies)
