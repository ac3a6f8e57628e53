"""Submitting a turn to Kafka and following its events (for `iomni submit` and callers)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from iomni.streams.topics import StreamSettings, ensure_topics
from iomni.v1 import events_pb2


def turn_request(
    tenant: str,
    session_id: str,
    parts: list,
    turn_id: str = "",  # type: ignore[type-arg]
    **options,
) -> events_pb2.TurnRequested:  # type: ignore[no-untyped-def]
    request = events_pb2.TurnRequested(
        tenant=tenant,
        session_id=session_id,
        turn_id=turn_id or uuid.uuid4().hex,
        parts=parts,
        requested_at=time.time(),
    )
    for name, value in options.items():
        getattr(request, name).CopyFrom(value)
    return request


class TurnFollower:
    """Reads `iomni.turns.events` from (about) now on, before the request is sent, so no event
    of the turn is missed."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        partitions = self.consumer.partitions_for_topic(settings.events_topic)
        if not partitions:  # a new (or restarted, memory-backed) broker: create, then look again
            ensure_topics(settings)
            self.consumer.topics()  # refreshes the metadata
            partitions = self.consumer.partitions_for_topic(settings.events_topic)
        if not partitions:
            self.consumer.close()
            raise ConnectionError(
                f"Kafka at {settings.bootstrap} has no topic {settings.events_topic!r}; "
                "is the broker up, and are topics created (create_topics)?"
            )
        self.assigned = [TopicPartition(settings.events_topic, p) for p in sorted(partitions)]
        self.consumer.assign(self.assigned)
        # The turn id filters events, so starting a little early is harmless.
        self.consumer.seek_to_end(*self.assigned)
        for tp in self.assigned:
            self.consumer.position(tp)
        self.restarted = False  # the last event began a newer attempt of the turn
        self._attempts: dict[str, int] = {}  # turn id -> newest attempt seen, across calls

    def events(self, turn_id: str, timeout_s: float = 120.0) -> Iterator[events_pb2.TurnEvent]:
        """The turn's events as they come. Events of a superseded attempt (a worker that died
        mid-turn) are dropped; when a newer attempt starts, its first event comes with
        `self.restarted` true: what was shown of the earlier attempt should be discarded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in self.consumer.poll(timeout_ms=200).values():
                for record in records:
                    event = events_pb2.TurnEvent.FromString(record.value)
                    attempt = self._attempts.get(turn_id, 0)
                    if event.turn_id != turn_id or event.attempt < attempt:
                        continue
                    self.restarted = bool(attempt) and event.attempt > attempt
                    self._attempts[turn_id] = event.attempt
                    yield event
                    if event.WhichOneof("payload") in ("done", "failed"):
                        return
        raise TimeoutError(f"no done event for turn {turn_id} within {timeout_s:.0f} s")

    def close(self) -> None:
        self.consumer.close()


def submit(settings: StreamSettings, request: events_pb2.TurnRequested) -> None:
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap,
        acks="all",
        enable_idempotence=True,
        max_request_size=16 << 20,
    )
    try:
        producer.send(
            settings.requests_topic,
            key=request.session_id.encode(),
            value=request.SerializeToString(),
        ).get(timeout=30)
    finally:
        producer.close(10)
