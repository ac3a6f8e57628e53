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
