"""The Kafka worker's partition queue, its consumer and turns faked. At shutdown the turn
running finishes and is committed; records queued behind it are not started (they go to the
partition's next owner). A record that fails is sought back to and what was queued behind it
dropped (fetched again), so a session's turns keep their order."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from iomni.errors import Unavailable
from iomni.streams.topics import StreamSettings
from iomni.streams.worker import TurnWorker, WorkerMetrics
from iomni.turns.runner import RunnerLimits


async def test_records_queued_behind_the_running_turn_are_left_at_shutdown() -> None:
    runner = SimpleNamespace(limits=RunnerLimits())
    worker = TurnWorker(runner, None, StreamSettings(), WorkerMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    handled: list[int] = []
    committed: list[int] = []

    async def handle(record) -> None:  # type: ignore[no-untyped-def]
        handled.append(record.offset)
        worker.stopping.set()  # SIGTERM while the first turn runs
        await asyncio.sleep(0.05)

    async def consumer_call(fn, offsets):  # type: ignore[no-untyped-def]
        committed.extend(o.offset for o in offsets.values())

    worker._handle = handle  # type: ignore[method-assign]
    worker._consumer_call = consumer_call  # type: ignore[method-assign]
    worker.consumer = SimpleNamespace(commit=None)
    tp = TopicPartition("requests", 0)
    for offset in range(3):
        worker._enqueue(tp, SimpleNamespace(offset=offset))
    task = worker.partitions[tp].task
    assert task is not None
    await asyncio.wait_for(task, 5)
    assert handled == [0], "records queued behind the running turn were started at shutdown"
    assert committed == [1]  # the turn that ran, and nothing past it
    assert worker.in_flight == 0


async def test_a_failed_record_is_sought_back_to_and_the_queue_behind_it_dropped() -> None:
    runner = SimpleNamespace(limits=RunnerLimits())
    worker = TurnWorker(runner, None, StreamSettings(), WorkerMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    handled: list[int] = []
    calls: list[tuple[str, object]] = []

    async def handle(record) -> None:  # type: ignore[no-untyped-def]
        handled.append(record.offset)
        raise Unavailable("Redis is down")

    async def consumer_call(fn, *args):  # type: ignore[no-untyped-def]
        calls.append((fn, args[-1]))

    worker._handle = handle  # type: ignore[method-assign]
    worker._consumer_call = consumer_call  # type: ignore[method-assign]
    worker.consumer = SimpleNamespace(commit="commit", seek="seek")
    tp = TopicPartition("requests", 0)
    for offset in range(3):
        worker._enqueue(tp, SimpleNamespace(offset=offset))
    task = worker.partitions[tp].task
    assert task is not None
    await asyncio.wait_for(task, 5)
    assert handled == [0]
    assert calls == [("seek", 0)]  # back to the failed record, nothing committed
    assert worker.partitions[tp].queue.empty() and worker.in_flight == 0
