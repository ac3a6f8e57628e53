"""Kafka streams on a real broker (tansu, 6 s consumer session timeout), real workers."""

from __future__ import annotations

import signal
import time
import uuid

from confluent_kafka import Consumer as ConfluentConsumer
from kafka import KafkaProducer

from iomni.streams.client import TurnFollower, submit, turn_request
from iomni.streams.topics import StreamSettings
from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import events_pb2
from tests.integration.prom import delta

TENANT = "acme"


def request(
    session: str, text: str, tokens: int = 8, turn_id: str = ""
) -> events_pb2.TurnRequested:
    return turn_request(
        TENANT,
        session,
        [pb.Part(text=text)],
        turn_id,
        sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=tokens),
        output=pb.OutputOptions(speech=True),
    )


def follow(
    broker: str, req: events_pb2.TurnRequested, timeout: float = 90
) -> list[events_pb2.TurnEvent]:
    settings = StreamSettings(bootstrap=broker)
    follower = TurnFollower(settings)
    try:
        submit(settings, req)
        return list(follower.events(req.turn_id, timeout))
    finally:
        follower.close()


def test_a_request_produces_the_full_ordered_event_sequence(broker: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    req = request(f"s-{uuid.uuid4().hex[:8]}", "hello over kafka", tokens=12)
    events = follow(broker, req)
    kinds = [e.WhichOneof("payload") for e in events]
    assert [e.sequence for e in events] == list(range(len(events)))
    assert kinds[-1] == "done" and kinds.count("done") == 1
    assert "text" in kinds and "audio" in kinds
    done = events[-1].done
    assert done.usage.completion_tokens == 12
    assert done.text == "".join(e.text.text for e in events if e.HasField("text"))
    assert all(e.session_id == req.session_id and e.source == "worker" for e in events)
    assert {e.attempt for e in events} == {1}
    # A different client library reads the same records: plain Kafka + protobuf.
    consumer = ConfluentConsumer(
        {
            "bootstrap.servers": broker,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe(["iomni.turns.events"])
    seen: list[events_pb2.TurnEvent] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e.HasField("done") for e in seen):
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        event = events_pb2.TurnEvent.FromString(message.value())
        if event.turn_id == req.turn_id:
            assert message.key() == req.session_id.encode()
            seen.append(event)
    consumer.close()
    assert [e.sequence for e in seen] == [e.sequence for e in events]


def test_sessions_interleave_without_mixing(broker: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker()
    settings = StreamSettings(bootstrap=broker)
    follower = TurnFollower(settings)
    sessions = [f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"]
    turns = [request(s, f"turn {n} of {s}") for n in range(2) for s in sessions]
    for req in turns:
        submit(settings, req)
    events: dict[str, list[events_pb2.TurnEvent]] = {r.turn_id: [] for r in turns}
    order: dict[str, list[str]] = {s: [] for s in sessions}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(
        any(e.HasField("done") for e in v) for v in events.values()
    ) < len(turns):
        for records in follower.consumer.poll(timeout_ms=200).values():
            for record in records:
                event = events_pb2.TurnEvent.FromString(record.value)
                if event.turn_id in events:
                    events[event.turn_id].append(event)
                    if event.HasField("done"):
                        order[event.session_id].append(event.turn_id)
    follower.close()
    for req in turns:
        got = events[req.turn_id]
        assert [e.sequence for e in got] == list(range(len(got)))
        assert {e.session_id for e in got} == {req.session_id}
    for session in sessions:
        assert order[session] == [r.turn_id for r in turns if r.session_id == session]


def test_poison_message_goes_to_the_dlq_and_the_next_is_processed(
    broker: str, start_worker
) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker()
    session = f"p-{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=broker)
    producer.send("iomni.turns.requests", key=session.encode(), value=b"\xffnot protobuf")
    producer.flush()
    producer.close()
    events = follow(broker, request(session, "after the poison"))
    assert events[-1].HasField("done")
    assert worker.metric("iomni_worker_dead_letters_total") >= 1
    letters = _read_all(broker, "iomni.turns.dlq")
    poison = [letter for letter in letters if letter.key == session]
    assert poison and poison[0].original == b"\xffnot protobuf"
    assert "undecodable" in poison[0].reason


def test_invalid_request_fails_with_an_event_and_a_dead_letter(broker: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker()
    before = worker.scrape()
    req = turn_request(
        TENANT,
        f"i-{uuid.uuid4().hex[:6]}",
        [pb.Part(image=b"\x89PNG broken")],
        sampling=pb.SamplingOptions(),
    )
    events = follow(broker, req)
    assert events[-1].HasField("failed")
    assert events[-1].failed.code == "INVALID_ARGUMENT"
    assert events[-1].failed.reason == "INVALID_INPUT"
    assert "image" in events[-1].failed.message
    # The request itself is in the dead-letter topic, with the reason and where it came from.
    letters = [
        letter
        for letter in _read_all(broker, "iomni.turns.dlq")
        if letter.original == req.SerializeToString()
    ]
    assert len(letters) == 1
    letter = letters[0]
    assert letter.key == req.session_id and letter.topic == "iomni.turns.requests"
    assert letter.reason.startswith("INVALID_ARGUMENT") and "image" in letter.reason
    after = worker.scrape()
    assert delta(before, after, "iomni_worker_dead_letters_total") == 1
    assert delta(before, after, "iomni_worker_turns_total", outcome="invalid") == 1


def test_kafka_turns_have_the_gateways_metrics_and_kv_reuse(broker: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    """The worker runs the same turn core as the gateway: TTFA and outcomes on its /metrics,
    KV-cache affinity and reuse across a session's turns."""
    worker = start_worker()
    before = worker.scrape()
    session = f"m-{uuid.uuid4().hex[:6]}"
    first = follow(broker, request(session, "the first question", tokens=6))
    second = follow(broker, request(session, "and a second one", tokens=6))
    after = worker.scrape()
    assert first[-1].HasField("done") and second[-1].HasField("done")
    assert second[-1].done.usage.prompt_tokens_reused > first[-1].done.usage.prompt_tokens // 2
    assert delta(before, after, "iomni_worker_time_to_first_audio_seconds_count") == 2
    assert delta(before, after, "iomni_worker_turns_total", outcome="ok") == 2
    assert delta(before, after, "iomni_worker_requests_total", outcome="ok") == 2
    assert delta(before, after, "iomni_worker_kv_affinity_total", result="hit") == 1
    assert delta(before, after, "iomni_worker_stage_duration_seconds_count", stage="prefill") == 2
    assert after.value("iomni_worker_active_turns") == 0


def test_killed_worker_turn_is_finished_by_another_exactly_once(
    broker: str, start_worker, redis
) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from iomni.state import DialogueState

    first = start_worker()
    session = f"k-{uuid.uuid4().hex[:6]}"
    req = request(session, "a long answer please", tokens=120)
    settings = StreamSettings(bootstrap=broker)
    follower = TurnFollower(settings)
    submit(settings, req)
    events = []
    for event in follower.events(req.turn_id, 90):
        events.append(event)
        if len(events) == 2:
            first.stop(signal.SIGKILL)
            break
    start_worker()
    restarts = 0
    for event in follower.events(req.turn_id, 120):
        restarts += follower.restarted
        events.append(event)
    follower.close()
    done = [e for e in events if e.HasField("done")]
    assert len(done) == 1 and done[0].done.usage.completion_tokens == 120
    # The dead worker's partial events are attempt 1; the turn ran again as attempt 2 from
    # sequence 0, and the follower said so once (its consumers start over there).
    assert {e.attempt for e in events[:2]} == {1}
    second = [e for e in events if e.attempt == 2]
    assert second and [e.sequence for e in second] == list(range(len(second)))
    assert done[0].attempt == 2 and restarts == 1

    async def history() -> list:
        state = DialogueState.from_url(redis.url)
        try:
            return await state.history(TENANT, session)
        finally:
            await state.aclose()

    messages = asyncio.run(history())
    assert len(messages) == 2 and messages[0].text == "a long answer please"


def test_two_workers_split_partitions_and_keep_order(broker: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    workers = [start_worker(), start_worker()]
    settings = StreamSettings(bootstrap=broker)
    time.sleep(4)  # both in the group
    follower = TurnFollower(settings)
    sessions = [f"w{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
    turns = [request(s, f"{n}") for n in range(2) for s in sessions]
    for req in turns:
        submit(settings, req)
    done_order: dict[str, list[str]] = {s: [] for s in sessions}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and sum(map(len, done_order.values())) < len(turns):
        for records in follower.consumer.poll(timeout_ms=200).values():
            for record in records:
                event = events_pb2.TurnEvent.FromString(record.value)
                if event.session_id in done_order and event.HasField("done"):
                    done_order[event.session_id].append(event.turn_id)
    follower.close()
    for session in sessions:
        assert done_order[session] == [r.turn_id for r in turns if r.session_id == session]
    processed = [w.metric("iomni_worker_requests_total", outcome="ok") for w in workers]
    assert all(p >= 1 for p in processed), processed


def _read_all(broker: str, topic: str) -> list[events_pb2.DeadLetter]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker,
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
    )
    letters = [events_pb2.DeadLetter.FromString(r.value) for r in consumer]
    consumer.close()
    return letters


def test_sigterm_finishes_in_flight_turns_then_leaves(broker: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker()
    req = request(f"t-{uuid.uuid4().hex[:6]}", "finish before leaving", tokens=60)
    settings = StreamSettings(bootstrap=broker)
    follower = TurnFollower(settings)
    submit(settings, req)
    events = []
    for event in follower.events(req.turn_id, 90):
        events.append(event)
        if len(events) == 1:
            worker.process.send_signal(signal.SIGTERM)
    follower.close()
    assert events[-1].HasField("done") and events[-1].done.usage.completion_tokens == 60
    assert worker.process.wait(60) == 0


def test_gateway_turns_reach_the_event_log(broker: str, start_gateway) -> None:  # type: ignore[no-untyped-def]
    from iomni.client import DialogueClient
    from tests.integration.conftest import TENANT_KEYS

    gateway = start_gateway("--events-bootstrap", broker)
    follower = TurnFollower(StreamSettings(bootstrap=broker))
    turn_id = uuid.uuid4().hex
    reply = DialogueClient(gateway.target, TENANT_KEYS["acme"]).chat(
        "", turn_id, text="logged", temperature=0.0, max_new_tokens=5
    )
    events = list(follower.events(turn_id, 30))
    follower.close()
    assert {e.source for e in events} == {"gateway"}
    assert events[-1].done.text == reply.text
    assert [e.sequence for e in events] == list(range(len(events)))


def test_live_turns_reach_the_event_log(broker: str, start_gateway) -> None:  # type: ignore[no-untyped-def]
    """A live-mode turn (typed, committed by end_of_turn) is published behind the reply, to
    its `done`, as manual turns are."""
    import asyncio

    from iomni.client import AsyncDialogueClient
    from tests.integration.conftest import TENANT_KEYS

    gateway = start_gateway("--events-bootstrap", broker)

    async def live_turn() -> pb.ConverseResponse:
        async with AsyncDialogueClient(gateway.target, TENANT_KEYS["acme"]) as client:
            stream = client.live(speech=False, temperature=0.0, max_new_tokens=5)
            stream.send_text("logged live")
            stream.end_of_turn()
            stream.close()  # the reply is still answered (the client only stopped sending)
            return [r async for r in stream if r.WhichOneof("payload") == "done"][0]

    follower = TurnFollower(StreamSettings(bootstrap=broker))
    done = asyncio.run(live_turn())
    events = list(follower.events(done.turn_id, 30))
    follower.close()
    assert {e.source for e in events} == {"gateway"}
    assert events[-1].done.text == done.done.text
    assert [e.sequence for e in events] == list(range(len(events)))
