"""`iomni worker`: turns requested on Kafka, run with the same engine and Redis state as the
gateway, their events published in order, offsets committed only after the final event is
acknowledged.

Exactly-once effect per turn id: the Redis turn record makes a redelivered request (crash,
rebalance) skip the work, and a `published` mark makes it skip publishing twice. Ordering: a
partition's records are handled one after another (a session's turns share a partition).
Backpressure: partitions are paused while `max_in_flight` turns run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from iomni import background, wire
from iomni.errors import IomniError, LeaseLost, NotFound, Unavailable
from iomni.streams.publisher import TurnPublisher, make_producer
from iomni.streams.topics import StreamSettings, ensure_topics
from iomni.telemetry.metrics import TurnMetrics
from iomni.turns.runner import TurnInput, TurnOutput, TurnRunner
from iomni.v1 import events_pb2

log = logging.getLogger(__name__)


class WorkerMetrics(TurnMetrics):
    """The turn core's metrics as `iomni_worker_*` (the same series the gateway has), plus the
    consumer's own: requests by outcome, end-to-end latency, in flight, DLQ, lag."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("iomni_worker", registry)
        r = self.registry
        self.requests = Counter(
            "iomni_worker_requests_total",
            "Turn requests consumed, by outcome (ok, duplicate, dead_letter)",
            ["outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "iomni_worker_processing_seconds",
            "From the request's requested_at to its last event acknowledged",
            buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.in_flight = Gauge("iomni_worker_in_flight_turns", "Turns being processed", registry=r)
        self.dlq = Counter(
            "iomni_worker_dead_letters_total", "Requests sent to the DLQ", registry=r
        )
        self.lag = Gauge(
            "iomni_worker_consumer_lag",
            "Records not yet consumed, per partition",
            ["partition"],
            registry=r,
        )


@dataclass
class _Partition:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None


class TurnWorker:
    def __init__(
        self,
        runner: TurnRunner,
        state,  # type: ignore[no-untyped-def]  # DialogueState: the store plus published marks
        settings: StreamSettings,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.runner = runner
        self.state = state
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.name = f"worker-{uuid.uuid4().hex[:8]}"
        self.partitions: dict[TopicPartition, _Partition] = {}
        self.in_flight = 0
        self.paused = False
        self.stopping = asyncio.Event()
        self._consumer_lock = asyncio.Lock()
        # Partitions drain in parallel; this keeps them within the runner's turn limit.
        self._slots = asyncio.Semaphore(runner.limits.max_concurrent_turns)

    async def run(self) -> None:
        await asyncio.to_thread(ensure_topics, self.settings)
        self.producer = make_producer(self.settings.bootstrap, self.name)
        self.consumer = KafkaConsumer(
            self.settings.requests_topic,
            bootstrap_servers=self.settings.bootstrap,
            group_id=self.settings.group_id,
            client_id=self.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.settings.session_timeout_ms // 5),
            max_poll_records=16,
        )
        log.info("%s consuming %s", self.name, self.settings.requests_topic)
        print(f"worker ready: {self.name} on {self.settings.bootstrap}", flush=True)
        try:
            while not self.stopping.is_set():
                batches = await self._consumer_call(self.consumer.poll, 200)
                for tp, records in batches.items():
                    for record in records:
                        self._enqueue(tp, record)
                await self._apply_backpressure()
                await self._report_lag()
        finally:
            await self._shutdown()

    async def _consumer_call(self, fn, *args):  # type: ignore[no-untyped-def]
        # kafka-python's consumer is not thread-safe: one call at a time, off the event loop.
        async with self._consumer_lock:
            return await asyncio.to_thread(fn, *args)

    def _enqueue(self, tp: TopicPartition, record) -> None:  # type: ignore[no-untyped-def]
        partition = self.partitions.setdefault(tp, _Partition())
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        partition.queue.put_nowait(record)
        if partition.task is None or partition.task.done():
            partition.task = asyncio.create_task(self._drain(tp, partition))

    async def _drain(self, tp: TopicPartition, partition: _Partition) -> None:
        while not partition.queue.empty():
            if self.stopping.is_set():
                # Shutting down: what was queued behind the turn that ran is not started (a
                # poll can queue 16, more than a grace period runs). Never committed, it goes
                # to the partition's next owner, in order.
                self._drop_queued(partition)
                return
            record = partition.queue.get_nowait()
            try:
                await self._handle(record)
                await self._consumer_call(
                    self.consumer.commit, {tp: OffsetAndMetadata(record.offset + 1, "", -1)}
                )
            except Exception as exc:
                if isinstance(exc, Unavailable):  # a dependency is down: expected, no traceback
                    log.warning("record %s@%d not handled (%s); retrying", tp, record.offset, exc)
                else:
                    log.exception("record %s@%d not handled; retrying it", tp, record.offset)
                await self._rewind(tp, partition, record.offset)
                return
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)

    def _drop_queued(self, partition: _Partition) -> None:
        """Forget the partition's queued records (uncommitted: they are fetched again)."""
        left = partition.queue.qsize()
        while not partition.queue.empty():
            partition.queue.get_nowait()
        self.in_flight -= left
        self.metrics.in_flight.set(self.in_flight)

    async def _rewind(self, tp: TopicPartition, partition: _Partition, offset: int) -> None:
        """Never commit past a record that failed: seek back and drop what was queued after
        it (poll fetches it all again), so the session's turns keep their order."""
        await asyncio.sleep(1.0)
        with contextlib.suppress(Exception):
            await self._consumer_call(self.consumer.seek, tp, offset)
        self._drop_queued(partition)

    async def _apply_backpressure(self) -> None:
        full = self.in_flight >= self.settings.max_in_flight
        if full and not self.paused:
            assigned = await self._consumer_call(self.consumer.assignment)
            await self._consumer_call(self.consumer.pause, *assigned)
            self.paused = True
        elif not full and self.paused:
            await self._consumer_call(
                self.consumer.resume, *await self._consumer_call(self.consumer.paused)
            )
            self.paused = False

    async def _report_lag(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_lag_at", 0.0) < 5:
            return
        self._lag_at = now

        def lags() -> dict[int, int]:
            out = {}
            for tp in self.consumer.assignment():
                high = self.consumer.highwater(tp)
                position = self.consumer.position(tp) if high is not None else None
                if high is not None and position is not None:
                    out[tp.partition] = max(0, high - position)
            return out

        with contextlib.suppress(Exception):  # a rebalance mid-way is fine: next time
            for partition, lag in (await self._consumer_call(lags)).items():
                self.metrics.lag.labels(str(partition)).set(lag)

    # -- one request ------------------------------------------------------------------------

    async def _handle(self, record) -> None:  # type: ignore[no-untyped-def]
        try:
            request = events_pb2.TurnRequested.FromString(record.value)
            _validate(request, record.key)
        except Exception as exc:
            await self._dead_letter(record, f"undecodable or invalid request: {exc}")
            return
        publisher = TurnPublisher(
            self.producer, self.settings.events_topic, request.session_id, request.turn_id, "worker"
        )
        try:
            if await self._already_published(request):
                self.metrics.requests.labels("duplicate").inc()
                return
            # A redelivered request whose earlier attempt died mid-turn: this is the next one.
            publisher.attempt = await self.state.next_attempt(request.session_id, request.turn_id)
            async with self._slots:
                await self._run(request, publisher)
            await publisher.flush()
            await self.state.mark_published(request.session_id, request.turn_id)
            self.metrics.requests.labels("ok").inc()
            if request.requested_at:
                self.metrics.latency.observe(max(0.0, time.time() - request.requested_at))
        except Unavailable:
            raise  # Redis or Triton down: leave the offset, the record is retried
        except IomniError as exc:
            publisher.fail(exc.code, exc.detail)
            await publisher.flush()
            await self._dead_letter(record, f"{exc.code.grpc_status}: {exc.detail}")

    async def _already_published(self, request: events_pb2.TurnRequested) -> bool:
        try:
            return await self.state.was_published(request.session_id, request.turn_id)
        except NotFound:
            return False

    async def _run(self, request: events_pb2.TurnRequested, publisher: TurnPublisher) -> None:
        await self._ensure_session(request)
        turn = TurnInput(
            request.tenant,
            request.session_id,
            request.turn_id,
            await background.run_if_large(
                request.ByteSize(), wire.chat_message, list(request.parts)
            ),
            wire.sampling_params(request.sampling),
            wire.speech_options(request.output),
        )

        async def emit(output: TurnOutput) -> None:
            await publisher.emit(wire.response(turn.session_id, turn.turn_id, output))

        deadline = time.monotonic() + self.settings.busy_retry_s
        while True:
            try:
                # Another worker (perhaps a dead one whose lease has not expired) may hold the
                # session: the runner waits for it, and counts the request's turn once.
                await self.runner.run(turn, emit, busy_wait_s=deadline - time.monotonic())
                return
            except LeaseLost:
                # Taken over before this turn said anything: it is run again.
                if time.monotonic() > deadline or publisher.sequence:
                    raise
                await asyncio.sleep(0.5)

    async def _ensure_session(self, request: events_pb2.TurnRequested) -> None:
        try:
            await self.state.get_session(request.tenant, request.session_id)
        except NotFound:
            await self.state.create_session(request.tenant, request.session_id)

    async def _dead_letter(self, record, reason: str) -> None:  # type: ignore[no-untyped-def]
        letter = events_pb2.DeadLetter(
            original=record.value or b"",
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=(record.key or b"").decode(errors="replace"),
        )
        # send() may block on metadata: keep it off the event loop.
        await asyncio.to_thread(
            lambda: self.producer.send(
                self.settings.dlq_topic, key=record.key, value=letter.SerializeToString()
            ).get(30)
        )
        self.metrics.dlq.inc()
        self.metrics.requests.labels("dead_letter").inc()
        log.warning(
            "request at %s[%d]@%d sent to the DLQ: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
        )

    async def _shutdown(self) -> None:
        """Finish the turns running, commit, leave the group (what was queued behind them
        is left to the partition's next owner)."""
        tasks = [p.task for p in self.partitions.values() if p.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.producer.flush, 30)
        await asyncio.to_thread(self.consumer.close)
        await asyncio.to_thread(self.producer.close, 10)


def _validate(request: events_pb2.TurnRequested, key: bytes | None) -> None:
    for name in ("tenant", "session_id", "turn_id"):
        if not getattr(request, name):
            raise ValueError(f"{name} is required")
    if key is not None and key.decode(errors="replace") != request.session_id:
        raise ValueError("the record key must be the session id")
    if not request.parts:
        raise ValueError("the turn has no parts")
