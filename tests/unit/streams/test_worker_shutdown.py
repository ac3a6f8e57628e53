"""The Kafka worker's partition queue, its consumer and turns faked. At shutdown the turn
running finishes and is committed; records queued behind it are not started (they go to the
partition's next owner). A record that fails is sought back to and what was queued behind it
dropped (fetched again), so a session's turns keep their order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from iomni.errors import Unavailable
from iomni.streams.topics import StreamSettings
from iomni.streams.worker import TurnWorker, WorkerMetrics
from iomni.turns.runner import RunnerLimits


def fake_worker() -> TurnWorker:
    runner = SimpleNamespace(limits=RunnerLimits())
    worker = TurnWorker(runner, None, StreamSettings(), WorkerMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    worker.consumer = SimpleNamespace(commit="commit", seek="seek")
    return worker


async def drain_three(
    worker: TurnWorker, handle: Callable[[Any], Awaitable[None]]
) -> tuple[list[int], list[tuple[str, int]]]:
    """Queue records 0, 1, 2 on one partition and let it drain with `handle` as the turn:
    the offsets handled, and the consumer calls made as (commit or seek, offset)."""
    handled: list[int] = []
    calls: list[tuple[str, int]] = []

    async def handled_by(record) -> None:  # type: ignore[no-untyped-def]
        handled.append(record.offset)
        await handle(record)

    async def consumer_call(fn, *args):  # type: ignore[no-untyped-def]
        last = args[-1]  # seek: the offset; commit: {partition: OffsetAndMetadata}
        calls.append((fn, last if isinstance(last, int) else next(iter(last.values())).offset))

    worker._handle = handled_by  # type: ignore[method-assign]
    worker._consumer_call = consumer_call  # type: ignore[method-assign]
    tp = TopicPartition("requests", 0)
    for offset in range(3):
        worker._enqueue(tp, SimpleNamespace(offset=offset))
    task = worker.partitions[tp].task
    assert task is not None
    await asyncio.wait_for(task, 5)
    assert worker.partitions[tp].queue.empty() and worker.in_flight == 0
    return handled, calls


async def test_records_queued_behind_the_running_turn_are_left_at_shutdown() -> None:
    worker = fake_worker()

    async def handle(record) -> None:  # type: ignore[no-untyped-def]
        worker.stopping.set()  # SIGTERM while the first turn runs
        await asyncio.sleep(0.05)

    handled, calls = await drain_three(worker, handle)
    assert handled == [0], "records queued behind the running turn were started at shutdown"
    assert calls == [("commit", 1)]  # the turn that ran, and nothing past it


async def test_a_failed_record_is_sought_back_to_and_the_queue_behind_it_dropped() -> None:
    async def handle(record) -> None:  # type: ignore[no-untyped-def]
        raise Unavailable("Redis is down")

    handled, calls = await drain_three(fake_worker(), handle)
    assert handled == [0]
    assert calls == [("seek", 0)]  # back to the failed record, nothing committed
