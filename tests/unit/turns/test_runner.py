"""The turn core (`TurnRunner`) on the in-memory store and the real tiny model, in-process:
lease renewal, idempotency, concurrent duplicates, limits, cancellation, outcomes, waiting for
a busy session (as the Kafka worker does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from iomni.engine.events import AudioChunk, TextDelta
from iomni.engine.parts import GenerationRequest, InProcessParts, LLMStep
from iomni.engine.turn import TurnEngine
from iomni.errors import (
    DeadlineExceeded,
    ErrorCode,
    InvalidInput,
    LeaseLost,
    ResourceExhausted,
    SessionBusy,
)
from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.conversation import Message, TextPart
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.streams.topics import StreamSettings
from iomni.streams.worker import TurnWorker
from iomni.turns.observer import NullObserver, TurnReport
from iomni.turns.runner import RunnerLimits, RunningTurn, TurnFinished, TurnInput, TurnRunner
from iomni.turns.store import MemoryDialogueStore
from iomni.v1 import events_pb2

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


class SlowParts(InProcessParts):
    """The real parts, each decode step delayed, so a turn outlives a short lease."""

    def __init__(self, checkpoint: LoadedCheckpoint, step_s: float) -> None:
        super().__init__(checkpoint)
        self.step_s = step_s
        self.steps = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]:
        async for step in super().generate(request):
            self.steps += 1
            await asyncio.sleep(self.step_s)
            yield step


class Outcomes(NullObserver):
    """A TurnObserver that remembers outcomes, active turns and reports."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.active = 0
        self.done: list[TurnReport] = []
        self.first_tokens: list[float] = []

    def turn_started(self) -> None:
        self.active += 1

    def turn_stopped(self) -> None:
        self.active -= 1

    def outcome(self, label: str) -> None:
        self.labels.append(label)

    def turn_done(self, report: TurnReport) -> None:
        self.done.append(report)

    def first_token(self, seconds: float) -> None:
        self.first_tokens.append(seconds)


def runner_for(
    tiny: LoadedCheckpoint,
    processor: Processor,
    store: MemoryDialogueStore,
    step_s: float = 0.0,
    limits: RunnerLimits | None = None,
) -> tuple[TurnRunner, Outcomes]:
    observer = Outcomes()
    engine = TurnEngine(SlowParts(tiny, step_s), processor)
    return TurnRunner(engine, store, "gw-test", limits, observer), observer


async def one_session(
    tiny: LoadedCheckpoint, processor: Processor, step_s: float = 0.0, **options: Any
) -> tuple[MemoryDialogueStore, TurnRunner, Outcomes]:
    """A store holding session s1 of tenant acme, and a runner (and its observer) on it."""
    store = MemoryDialogueStore()
    await store.create_session("acme", "s1")
    return (store, *runner_for(tiny, processor, store, step_s, **options))


def text_turn(turn_id: str, text: str = "Hello there", session: str = "s1") -> TurnInput:
    return TurnInput("acme", session, turn_id, Message("user", (TextPart(text),)), GREEDY)


async def run(runner: TurnRunner, turn: TurnInput, running: RunningTurn | None = None) -> list:
    outputs: list = []

    async def emit(output) -> None:  # type: ignore[no-untyped-def]
        outputs.append(output)

    await runner.run(turn, emit, running)
    return outputs


async def test_a_turn_longer_than_the_lease_commits_because_the_lease_is_renewed(
    tiny: LoadedCheckpoint, processor: Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryDialogueStore(lease_ttl_ms=300)
    await store.create_session("acme", "s1")
    runner, observer = runner_for(tiny, processor, store, step_s=0.1)  # 8 steps: 0.8 s > 0.3 s
    renewals = 0
    renew = store.renew_lease

    async def counting(lease):  # type: ignore[no-untyped-def]
        nonlocal renewals
        renewals += 1
        await renew(lease)

    monkeypatch.setattr(store, "renew_lease", counting)
    outputs = await run(runner, text_turn("t1"))
    assert isinstance(outputs[-1], TurnFinished) and outputs[-1].stop_reason == "length"
    assert renewals >= 3  # every 100 ms through a 0.8 s turn
    assert observer.labels == ["ok"]
    assert len(await store.history("acme", "s1")) == 2


async def test_without_renewal_the_lease_lapses_and_nothing_is_written(
    tiny: LoadedCheckpoint, processor: Processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contrast to the test above: break renewal and the same turn is fenced out."""
    store = MemoryDialogueStore(lease_ttl_ms=300)
    await store.create_session("acme", "s1")
    runner, observer = runner_for(tiny, processor, store, step_s=0.1)

    async def no_renewal(lease) -> None:  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(store, "renew_lease", no_renewal)
    with pytest.raises(LeaseLost):
        await run(runner, text_turn("t1"))
    assert observer.labels == ["lease_lost"]
    assert await store.history("acme", "s1") == []


async def test_a_lease_taken_over_mid_turn_stops_the_turn(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    store = MemoryDialogueStore(lease_ttl_ms=300)
    await store.create_session("acme", "s1")
    runner, _ = runner_for(tiny, processor, store, step_s=0.1)
    task = asyncio.create_task(run(runner, text_turn("t1")))
    await asyncio.sleep(0.15)
    # Another holder takes the session (as after a partition): renewal fails with LeaseLost.
    store._sessions["s1"].lease.token += 1  # type: ignore[union-attr]
    with pytest.raises(LeaseLost):
        await task
    parts = runner.engine.parts
    assert isinstance(parts, SlowParts) and parts.steps < 8  # cancelled, not run to the end
    assert await store.history("acme", "s1") == []


async def test_a_done_turn_id_is_replayed_not_run_again(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    store, runner, observer = await one_session(tiny, processor)
    first = await run(runner, text_turn("t1"))
    again = await run(runner, text_turn("t1"))
    assert [type(o) for o in again] == [TextDelta, TurnFinished]
    assert again[-1].replayed and again[-1].text == first[-1].text
    assert again[-1].usage.completion_tokens == first[-1].usage.completion_tokens
    assert observer.labels == ["ok", "replayed"]
    assert len(await store.history("acme", "s1")) == 2


async def test_two_calls_with_one_turn_id_run_it_once(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    """A client that retries before the first call ended: the second waits, then replays."""
    store, runner, observer = await one_session(tiny, processor, step_s=0.02)
    a, b = await asyncio.gather(run(runner, text_turn("t1")), run(runner, text_turn("t1")))
    assert sorted(observer.labels) == ["ok", "replayed"]
    assert a[-1].text == b[-1].text
    assert len(await store.history("acme", "s1")) == 2
    parts = runner.engine.parts
    assert isinstance(parts, SlowParts) and parts.steps == 8  # the model ran one turn


async def test_another_turn_of_a_busy_session_is_refused(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    store, runner, observer = await one_session(tiny, processor, step_s=0.05)
    first = asyncio.create_task(run(runner, text_turn("t1")))
    await asyncio.sleep(0.1)
    with pytest.raises(SessionBusy) as busy:
        await run(runner, text_turn("t2"))
    assert busy.value.code is ErrorCode.SESSION_BUSY
    await first
    assert sorted(observer.labels) == ["busy", "ok"]


async def test_limits_refuse_before_any_work(tiny: LoadedCheckpoint, processor: Processor) -> None:
    store = MemoryDialogueStore()
    await store.create_session("acme", "s1")
    await store.create_session("acme", "s2")
    limits = RunnerLimits(max_concurrent_turns=1, max_turn_bytes=1000)
    runner, observer = runner_for(tiny, processor, store, step_s=0.05, limits=limits)
    with pytest.raises(InvalidInput, match="limit"):
        await run(runner, text_turn("big", "x" * 1001))  # text counts toward the size too
    first = asyncio.create_task(run(runner, text_turn("t1")))
    await asyncio.sleep(0.05)
    with pytest.raises(ResourceExhausted):
        await run(runner, text_turn("t2", session="s2"))
    await first
    assert observer.labels == ["invalid", "rejected", "ok"]
    assert observer.active == 0


async def test_cancel_stops_the_turn_and_commits_what_was_said(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    store, runner, observer = await one_session(tiny, processor, step_s=0.05)
    running = RunningTurn()
    task = asyncio.create_task(run(runner, text_turn("t1"), running))
    await asyncio.sleep(0.15)
    running.request_cancel()
    outputs = await task
    assert outputs[-1].stop_reason == "cancelled"
    assert not any(isinstance(o, AudioChunk) for o in outputs)
    assert observer.labels == ["cancelled"]
    history = await store.history("acme", "s1")
    assert history[1].text == outputs[-1].text


async def test_a_missing_session_is_not_found(tiny: LoadedCheckpoint, processor: Processor) -> None:
    runner, observer = runner_for(tiny, processor, MemoryDialogueStore())
    with pytest.raises(Exception) as info:
        await run(runner, text_turn("t1", session="nope"))
    assert getattr(info.value, "code", None) is ErrorCode.NOT_FOUND
    assert observer.labels == ["not_found"]


async def test_the_report_carries_the_time_between_text_tokens(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    """Each decode step is held 50 ms: the mean time per token after the first is that; a
    one-token reply has no such time."""
    store, runner, observer = await one_session(tiny, processor, step_s=0.05)
    await run(runner, text_turn("t1"))  # 8 tokens
    one_token = SamplingParams(temperature=0.0, max_new_tokens=1)
    turn = TurnInput("acme", "s1", "t2", Message("user", (TextPart("Hi"),)), one_token)
    await run(runner, turn)
    eight, one = observer.done
    assert eight.time_per_output_token_s is not None
    assert 0.05 <= eight.time_per_output_token_s < 0.1
    assert one.time_per_output_token_s is None


async def test_a_client_gone_mid_turn_counts_as_cancelled(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    store, runner, observer = await one_session(tiny, processor, step_s=0.05)
    task = asyncio.create_task(run(runner, text_turn("t1")))
    await asyncio.sleep(0.15)
    task.cancel()  # the front door's task ends with its client
    with pytest.raises(asyncio.CancelledError):
        await task
    assert observer.labels == ["cancelled"] and observer.active == 0
    assert await store.history("acme", "s1") == []


async def test_a_busy_session_is_waited_for_and_the_turn_counted_once(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    store, runner, observer = await one_session(tiny, processor, step_s=0.05)
    first = asyncio.create_task(run(runner, text_turn("t1")))
    await asyncio.sleep(0.1)
    outputs: list = []

    async def emit(output) -> None:  # type: ignore[no-untyped-def]
        outputs.append(output)

    await runner.run(text_turn("t2"), emit, busy_wait_s=30)
    await first
    assert outputs[-1].stop_reason == "length"
    assert sorted(observer.labels) == ["ok", "ok"]
    assert len(await store.history("acme", "s1")) == 4


async def test_a_session_busy_past_the_wait_fails_counted_once(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    store = MemoryDialogueStore()
    await store.create_session("acme", "s1")
    await store.acquire_lease("s1", "another-worker", "t0")  # held past the wait
    runner, observer = runner_for(tiny, processor, store)

    async def emit(output) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError(f"nothing is emitted: {output}")

    with pytest.raises(SessionBusy):
        await runner.run(text_turn("t1"), emit, busy_wait_s=1.2)
    assert observer.labels == ["busy"] and observer.active == 0


class Publisher:
    """What the Kafka worker's turn loop reads of its publisher: how much went out."""

    sequence = 0

    async def emit(self, response: object) -> None:
        self.sequence += 1


async def test_a_kafka_request_for_a_busy_session_counts_one_busy_turn(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    """The worker waits for a busy session (a dead worker's lease), through the runner: the
    request is one turn in the metrics however long it waited, not one per attempt."""
    store = MemoryDialogueStore()
    await store.create_session("acme", "s1")
    await store.acquire_lease("s1", "a-dead-worker", "t0")  # held past the wait
    runner, observer = runner_for(tiny, processor, store)
    worker = TurnWorker(runner, store, StreamSettings(busy_retry_s=1.6))
    request = events_pb2.TurnRequested(tenant="acme", session_id="s1", turn_id="t1")
    request.parts.add(text="Hello there")
    publisher = Publisher()
    with pytest.raises(SessionBusy):
        await worker._run(request, publisher)  # type: ignore[arg-type]
    assert observer.labels == ["busy"] and observer.active == 0
    assert publisher.sequence == 0


@pytest.mark.parametrize("heard", [True, False], ids=["confirmed", "discarded"])
async def test_a_speculative_turn_counts_in_the_latencies_only_if_it_was_heard(
    tiny: LoadedCheckpoint, processor: Processor, heard: bool
) -> None:
    """A live reply started before the user's turn was confirmed over: its time to first
    token and its report count once it is confirmed; discarded, nobody heard it."""
    store, runner, observer = await one_session(tiny, processor)
    running = RunningTurn(speculative=True)
    task = asyncio.create_task(run(runner, text_turn("t1"), running))
    parts = runner.engine.parts
    assert isinstance(parts, SlowParts)
    while parts.steps < GREEDY.max_new_tokens:  # the engine is done; the verdict is pending
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert observer.first_tokens == [] and observer.done == []
    if heard:
        running.confirm()
    else:
        running.discard()
    outputs = await asyncio.wait_for(task, 30)
    assert bool(outputs) is heard
    assert len(observer.first_tokens) == len(observer.done) == int(heard)
    assert observer.labels == ["ok" if heard else "discarded"]


async def test_a_speculative_turn_has_one_deadline_for_its_reply_and_its_verdict(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    """The reply takes 1.6 s of a 2 s limit and no verdict comes: the turn ends at the limit
    (DeadlineExceeded), not at 1.6 s plus another whole limit for the verdict."""
    limits = RunnerLimits(turn_timeout_s=2.0)
    _, runner, observer = await one_session(tiny, processor, step_s=0.2, limits=limits)
    task = asyncio.create_task(run(runner, text_turn("t1"), RunningTurn(speculative=True)))
    with pytest.raises(DeadlineExceeded, match="exceeded 2 s"):
        await asyncio.wait_for(task, 3.0)  # two separate limits would end it at 3.6 s
    assert observer.labels == ["timeout"] and observer.active == 0
