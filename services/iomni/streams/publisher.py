"""Publishing a turn's events in order (idempotent producer, key = session id)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kafka import KafkaProducer
from kafka.errors import KafkaError

from iomni.errors import ErrorCode
from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import events_pb2

log = logging.getLogger(__name__)


class EventProducer:
    """An idempotent KafkaProducer that can be replaced. A broker that restarted without its
    data (or a lost producer id) leaves an idempotent producer failing every send for good;
    `renew()` starts a fresh one, which a failed flush does."""

    def __init__(self, bootstrap: str, client_id: str) -> None:
        self.bootstrap, self.client_id = bootstrap, client_id
        self.producer = self._new()

    def _new(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            max_request_size=16 << 20,
            max_block_ms=5000,  # a broker outage fails sends in seconds, not a minute
        )

    def send(self, topic: str, key: bytes, value: bytes):  # type: ignore[no-untyped-def]
        return self.producer.send(topic, key=key, value=value)

    def renew(self) -> None:
        old, self.producer = self.producer, self._new()
        log.warning("Kafka producer %s replaced after a failed flush", self.client_id)
        old.close(timeout=0)

    def flush(self, timeout_s: float) -> None:
        self.producer.flush(timeout_s)

    def close(self, timeout_s: float) -> None:
        self.producer.close(timeout_s)


def make_producer(bootstrap: str, client_id: str) -> EventProducer:
    return EventProducer(bootstrap, client_id)


class TurnPublisher:
    """One turn's event stream. `emit` takes the API's ConverseResponse (what the turn runner
    produces) and publishes it as a TurnEvent; `flush()` waits until all are acknowledged."""

    def __init__(
        self,
        producer: EventProducer,
        topic: str,
        session_id: str,
        turn_id: str,
        source: str,
        on_event: Callable[[events_pb2.TurnEvent], None] | None = None,
        attempt: int = 1,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.session_id = session_id
        self.turn_id = turn_id
        self.source = source
        self.attempt = attempt
        self.sequence = 0
        self.futures: list = []
        self.on_event = on_event or (lambda event: None)
        self.published_done = False

    async def emit(self, response: pb.ConverseResponse) -> None:
        kind = response.WhichOneof("payload")
        if kind not in ("text", "audio", "done"):
            return
        event = events_pb2.TurnEvent(
            session_id=self.session_id,
            turn_id=self.turn_id,
            sequence=self.sequence,
            source=self.source,
            attempt=self.attempt,
        )
        getattr(event, kind).CopyFrom(getattr(response, kind))
        # send() can block on metadata or a full buffer: never on the event loop. Awaiting it
        # here keeps the turn's events in order.
        await asyncio.to_thread(self._send, event)
        self.published_done = self.published_done or kind == "done"

    def fail(self, code: ErrorCode, message: str) -> None:
        event = events_pb2.TurnEvent(
            session_id=self.session_id,
            turn_id=self.turn_id,
            sequence=self.sequence,
            source=self.source,
            attempt=self.attempt,
            failed=events_pb2.TurnFailed(code=code.grpc_status, message=message, reason=code.name),
        )
        self._send(event)

    def _send(self, event: events_pb2.TurnEvent) -> None:
        self.sequence += 1
        self.on_event(event)
        self.futures.append(
            self.producer.send(self.topic, self.session_id.encode(), event.SerializeToString())
        )

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Every event of the turn acknowledged by the broker (raises on failure)."""
        futures, self.futures = self.futures, []
        try:
            await asyncio.to_thread(lambda: [f.get(timeout=timeout_s) for f in futures])
        except KafkaError:
            await asyncio.to_thread(self.producer.renew)
            raise


class EventLogTap:
    """A front door's copy of one turn's responses into the event log, published behind the
    turn rather than in its path: the client's reply never waits for the broker (a full
    buffer, or metadata the producer lacks, blocks a send for up to 5 s).

    One task publishes the turn's events in order, after the session's previous turn's (the
    log keeps a session's order). When a send fails (the broker is down) or more than
    `MAX_BEHIND` events wait, the rest of the turn is dropped, logged with its count. A turn
    that ends without `done` after it said something gets a `failed` event, so every turn in
    the log has an end; one that said nothing (refused: busy, invalid) leaves no trace, as a
    retry of it may be running under the same turn id."""

    MAX_BEHIND = 1024

    def __init__(self, publisher: TurnPublisher, after: asyncio.Task | None = None) -> None:
        self.publisher = publisher
        self.queue: asyncio.Queue[pb.ConverseResponse | tuple[ErrorCode, str] | None]
        self.queue = asyncio.Queue()
        self.ended = False
        self.said = False  # a response was put
        self.dropped = 0
        self.task = asyncio.get_running_loop().create_task(self._publish(after))

    def put(self, response: pb.ConverseResponse) -> None:
        """Queue a response of the turn (what is not an event of the log is skipped)."""
        if self.ended:
            return
        self.said = True
        if response.WhichOneof("payload") == "done":  # always: it is the turn's end
            self.queue.put_nowait(response)
            self._close()
        elif self.queue.qsize() < self.MAX_BEHIND:
            self.queue.put_nowait(response)
        else:
            self.dropped += 1

    def end(self, code: ErrorCode = ErrorCode.CANCELLED, message: str = "") -> None:
        """The turn is over; without a `done` it failed (`code`, `message`: why)."""
        if self.ended:
            return
        if self.said:
            why = message or "the turn ended without finishing (its stream closed)"
            self.queue.put_nowait((code, why))
        self._close()

    def _close(self) -> None:
        self.ended = True
        self.queue.put_nowait(None)

    async def _publish(self, after: asyncio.Task | None) -> None:
        if after is not None:
            await asyncio.wait([after])
        broken = False
        while (item := await self.queue.get()) is not None:
            if broken:
                self.dropped += 1
                continue
            try:
                if isinstance(item, tuple):
                    await asyncio.to_thread(self.publisher.fail, *item)
                else:
                    await self.publisher.emit(item)
            except Exception:
                log.exception("event log: turn %s could not be published", self.publisher.turn_id)
                broken = True
        if self.dropped:
            log.warning(
                "event log: %d events of turn %s were dropped (broker down or too slow)",
                self.dropped,
                self.publisher.turn_id,
            )


class FrontDoorEventLog:
    """The event log of a front door (the gateway): a tap per turn, each session's in order."""

    def __init__(self, producer: EventProducer, topic: str, source: str) -> None:
        self.producer, self.topic, self.source = producer, topic, source
        self._last: dict[str, asyncio.Task] = {}  # each session's latest tap, while publishing

    def turn(self, session_id: str, turn_id: str) -> EventLogTap:
        after = self._last.get(session_id)
        publisher = TurnPublisher(self.producer, self.topic, session_id, turn_id, self.source)
        tap = EventLogTap(publisher, after if after is not None and not after.done() else None)
        self._last[session_id] = tap.task
        tap.task.add_done_callback(lambda task: self._forget(session_id, task))
        return tap

    def _forget(self, session_id: str, task: asyncio.Task) -> None:
        if self._last.get(session_id) is task:
            del self._last[session_id]
