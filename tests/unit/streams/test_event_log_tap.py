"""A front door's event-log tap against a fake producer (no broker): off the turn's path, in
order, and every turn ends in the log."""

from __future__ import annotations

import asyncio
import threading

import pytest

from iomni.errors import ErrorCode
from iomni.streams.publisher import EventLogTap, FrontDoorEventLog, TurnPublisher
from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import events_pb2


class Producer:
    """Records what is sent; `gate` (when given) holds every send until it is set, as a full
    buffer or missing metadata does; `broken` makes sends fail, as a broker that is down."""

    def __init__(self, gate: threading.Event | None = None, broken: bool = False) -> None:
        self.gate, self.broken = gate, broken
        self.events: list[events_pb2.TurnEvent] = []

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.broken:
            raise RuntimeError("KafkaTimeoutError: failed to update metadata after 5.0 secs")
        self.events.append(events_pb2.TurnEvent.FromString(value))


def text(delta: str) -> pb.ConverseResponse:
    return pb.ConverseResponse(text=pb.TextDelta(text=delta))


def done() -> pb.ConverseResponse:
    return pb.ConverseResponse(done=pb.TurnDone(text="ab"))


def tap_for(producer: Producer, turn_id: str = "t1") -> EventLogTap:
    return EventLogTap(TurnPublisher(producer, "events", "s1", turn_id, "gateway"))  # type: ignore[arg-type]


def test_the_turn_never_waits_for_the_broker_and_the_log_keeps_its_order() -> None:
    async def scenario() -> list[events_pb2.TurnEvent]:
        gate = threading.Event()
        producer = Producer(gate)
        tap = tap_for(producer)
        for response in (text("a"), text("b"), done()):
            tap.put(response)  # returns at once while the first send is held
        await asyncio.sleep(0.05)
        assert not producer.events and not tap.task.done()
        gate.set()
        await asyncio.wait_for(tap.task, 10)
        return producer.events

    events = asyncio.run(scenario())
    assert [e.WhichOneof("payload") for e in events] == ["text", "text", "done"]
    assert [e.sequence for e in events] == [0, 1, 2]


def test_a_turn_that_ends_without_done_is_failed_in_the_log() -> None:
    async def scenario() -> list[events_pb2.TurnEvent]:
        producer = Producer()
        tap = tap_for(producer)
        tap.put(text("a"))
        tap.end(ErrorCode.DEADLINE_EXCEEDED, "turn t1 exceeded 120 s")
        tap.put(text("late"))  # after its end: not in the log
        await asyncio.wait_for(tap.task, 10)
        return producer.events

    events = asyncio.run(scenario())
    assert [e.WhichOneof("payload") for e in events] == ["text", "failed"]
    assert events[1].failed.reason == "DEADLINE_EXCEEDED"
    assert events[1].failed.message == "turn t1 exceeded 120 s"


def test_a_turn_refused_before_it_said_anything_leaves_no_trace() -> None:
    """Refused as busy, its turn id may be running in a retry: a `failed` would end that."""

    async def scenario() -> list[events_pb2.TurnEvent]:
        producer = Producer()
        tap = tap_for(producer)
        tap.end(ErrorCode.SESSION_BUSY, "session s1 is busy with turn t1")
        await asyncio.wait_for(tap.task, 10)
        return producer.events

    assert asyncio.run(scenario()) == []


def test_a_broker_that_is_down_drops_the_rest_of_the_turn() -> None:
    async def scenario() -> EventLogTap:
        tap = tap_for(Producer(broken=True))
        for response in (text("a"), text("b"), done()):
            tap.put(response)
        await asyncio.wait_for(tap.task, 10)  # ends: nothing waits on a dead broker
        return tap

    assert asyncio.run(scenario()).dropped == 2


def test_a_sessions_turns_reach_the_log_in_turn_order() -> None:
    async def scenario() -> list[str]:
        gate = threading.Event()
        producer = Producer(gate)
        event_log = FrontDoorEventLog(producer, "events", "gateway")  # type: ignore[arg-type]
        first, second = event_log.turn("s1", "t1"), event_log.turn("s1", "t2")
        first.put(text("a"))
        second.put(done())  # the second turn's events wait for the first's
        first.put(done())
        gate.set()
        await asyncio.wait_for(asyncio.gather(first.task, second.task), 10)
        return [f"{e.turn_id}:{e.WhichOneof('payload')}" for e in producer.events]

    assert asyncio.run(scenario()) == ["t1:text", "t1:done", "t2:done"]


def test_a_turn_far_behind_the_broker_drops_its_middle_and_keeps_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(EventLogTap, "MAX_BEHIND", 2)

    async def scenario() -> tuple[list[events_pb2.TurnEvent], int]:
        gate = threading.Event()
        producer = Producer(gate)
        tap = tap_for(producer)
        for response in (text("a"), text("b"), text("c"), text("d"), done()):
            tap.put(response)
        gate.set()
        await asyncio.wait_for(tap.task, 10)
        return producer.events, tap.dropped

    events, dropped = asyncio.run(scenario())
    assert [e.WhichOneof("payload") for e in events] == ["text", "text", "done"]
    assert dropped == 2
