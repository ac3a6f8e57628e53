"""The gateway as real processes, over real Triton and real Redis."""

from __future__ import annotations

import io
import signal
import subprocess
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
import soundfile as sf

from iomni.client import DialogueClient, Reply, chat_request
from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import dialogue_pb2_grpc as pb_grpc
from tests.integration.conftest import TENANT_KEYS, GatewayProcess
from tests.integration.prom import Scrape, delta

ACME, GLOBEX = TENANT_KEYS["acme"], TENANT_KEYS["globex"]
SHORT = {"temperature": 0.0, "max_new_tokens": 6}


def client(gateway: GatewayProcess, key: str = ACME) -> DialogueClient:
    return DialogueClient(gateway.target, key)


def turn_id() -> str:
    return uuid.uuid4().hex


def wav(seconds: float = 1.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def test_multi_turn_memory(gateway: GatewayProcess) -> None:
    c = client(gateway)
    first = c.chat("", turn_id(), text="Remember the word kumquat.", **SHORT)
    second = c.chat(first.session_id, turn_id(), text="Which word?", **SHORT)
    session = c.get_session(first.session_id)
    assert session.turns == 2 and len(session.history) == 4
    assert session.history[0].parts[0].text == "Remember the word kumquat."
    assert session.history[1].parts[0].text == first.text
    # Turn 2's prompt holds turn 1: it is longer by at least turn 1's exchange, and the llm
    # served that prefix from its KV cache.
    assert second.done.usage.prompt_tokens > first.done.usage.prompt_tokens + 6
    assert second.done.usage.prompt_tokens_reused >= first.done.usage.prompt_tokens
    c.close()


def test_two_gateways_share_one_session(gateway: GatewayProcess, start_gateway) -> None:  # type: ignore[no-untyped-def]
    other = start_gateway()
    a, b = client(gateway), client(other)
    first = a.chat("", turn_id(), text="Hello from A", **SHORT)
    second = b.chat(first.session_id, turn_id(), text="Hello from B", **SHORT)
    assert second.session_id == first.session_id
    history = b.get_session(first.session_id).history
    assert [m.parts[0].text for m in history[::2]] == ["Hello from A", "Hello from B"]
    assert second.done.usage.prompt_tokens > first.done.usage.prompt_tokens
    a.close()
    b.close()


def test_busy_session_rejects_a_second_turn(gateway: GatewayProcess) -> None:
    c = client(gateway)
    session = c.chat("", turn_id(), text="start", **SHORT).session_id
    long_turn = chat_request(session, turn_id(), text="talk", temperature=0.0, max_new_tokens=400)
    stream = c.chat_stream(long_turn)
    next(iter(stream))  # the first turn is running
    with pytest.raises(grpc.RpcError) as info:
        c.chat(session, turn_id(), text="me too", **SHORT)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert "busy" in info.value.details()
    stream.cancel()
    c.close()


def test_retried_chat_with_the_same_turn_id_runs_once(gateway: GatewayProcess) -> None:
    c = client(gateway)
    session = c.chat("", turn_id(), text="first", **SHORT).session_id
    retry_id = turn_id()
    original = c.chat(session, retry_id, text="only once", **SHORT)
    replay = c.chat(session, retry_id, text="only once", **SHORT)
    assert not original.done.replayed and replay.done.replayed
    assert replay.text == original.text
    assert c.get_session(session).turns == 2
    c.close()


def test_barge_in_stops_audio_and_truncates_history(gateway: GatewayProcess) -> None:
    channel = grpc.insecure_channel(gateway.target)
    stub = pb_grpc.DialogueStub(channel)
    requests: list[pb.ConverseRequest] = []
    cond = threading.Condition()

    def feed():  # type: ignore[no-untyped-def]
        for index in range(10_000):
            with cond:
                cond.wait_for(lambda index=index: len(requests) > index)
                request = requests[index]
            if request is None:
                return
            yield request

    def send(request) -> None:  # type: ignore[no-untyped-def]
        with cond:
            requests.append(request)
            cond.notify()

    config = pb.SessionConfig(
        sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=300),
        output=pb.OutputOptions(speech=True),
    )
    send(pb.ConverseRequest(config=config))
    send(pb.ConverseRequest(text=pb.UserText(text="Tell me a long story")))
    send(pb.ConverseRequest(end_of_turn=pb.EndOfTurn(turn_id="barge-1")))
    responses = stub.Converse(feed(), metadata=(("authorization", f"Bearer {ACME}"),))
    reply, after_cancel, session_id = Reply(), [], ""
    cancelled = False
    for response in responses:
        kind = response.WhichOneof("payload")
        session_id = response.session_id or session_id
        if cancelled and kind == "audio":
            after_cancel.append(response)
        reply.add(response)
        if kind == "audio" and not cancelled:
            cancelled = True
            send(pb.ConverseRequest(cancel=pb.Cancel(turn_id="barge-1")))
        if kind == "done":
            send(None)
    assert reply.done.stop_reason == pb.STOP_REASON_CANCELLED
    # Chunks already in flight when the cancel arrived may land; nothing after the turn stops.
    assert len(after_cancel) <= 1
    assert reply.done.usage.completion_tokens < 300
    history = client(gateway).get_session(session_id).history
    assert history[-1].parts[0].text == reply.text == reply.done.text
    channel.close()


def manual_turns(*texts: str, then: tuple[pb.ConverseRequest, ...] = ()) -> list:
    """A manual Converse stream's requests: a turn per text (ids t0, t1, ...), then `then`."""
    config = pb.SessionConfig(sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=200))
    requests = [pb.ConverseRequest(config=config)]
    for index, text in enumerate(texts):
        requests.append(pb.ConverseRequest(text=pb.UserText(text=text)))
        requests.append(pb.ConverseRequest(end_of_turn=pb.EndOfTurn(turn_id=f"t{index}")))
    return requests + list(then)


def test_a_cancel_naming_a_waiting_turn_cancels_that_turn(gateway: GatewayProcess) -> None:
    """t1 waits behind t0 when the cancel naming it arrives: t1 ends cancelled without
    running (stored as a barge-in before its first token is: the user's words, no reply), and
    t0, running, is left alone (the cancel used to stop whatever ran)."""
    cancel = pb.ConverseRequest(cancel=pb.Cancel(turn_id="t1"))
    stub = pb_grpc.DialogueStub(grpc.insecure_channel(gateway.target))
    requests = manual_turns("Tell me a long story", "And another", then=(cancel,))
    responses = list(stub.Converse(iter(requests), metadata=(("authorization", f"Bearer {ACME}"),)))
    done = {r.turn_id: r.done for r in responses if r.WhichOneof("payload") == "done"}
    assert done["t0"].stop_reason != pb.STOP_REASON_CANCELLED
    assert done["t1"].stop_reason == pb.STOP_REASON_CANCELLED
    assert done["t1"].usage.completion_tokens == 0 and not done["t1"].text
    history = client(gateway).get_session(responses[0].session_id).history
    assert [m.role for m in history] == ["user", "assistant"] * 2
    assert history[1].parts[0].text == done["t0"].text
    assert not "".join(part.text for part in history[3].parts)


def test_turns_waiting_on_a_stream_are_bounded(gateway: GatewayProcess) -> None:
    """Each waiting turn holds its media (up to the turn size limit): past the bound the
    stream ends with a clear RESOURCE_EXHAUSTED instead of queueing without end, and the
    turns that were waiting do not run after it (they used to, on a stream already gone)."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    before = Scrape(url)
    stub = pb_grpc.DialogueStub(grpc.insecure_channel(gateway.target))
    texts = ["Tell me a long story"] + [f"then {i}" for i in range(7)]
    responses = stub.Converse(
        iter(manual_turns(*texts)), metadata=(("authorization", f"Bearer {ACME}"),)
    )
    with pytest.raises(grpc.RpcError) as info:
        for _ in responses:
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already waiting on this stream" in (info.value.details() or "")
    deadline = time.monotonic() + 30
    while Scrape(url).value("iomni_gateway_active_turns") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # a waiting turn that wrongly starts does so within this
    after = Scrape(url)
    assert after.value("iomni_gateway_active_turns") == 0
    started = delta(before, after, "iomni_gateway_turns_total")  # every outcome
    assert started <= 1, f"{started} turns ran on a stream that had failed"


def test_tenants_are_isolated(gateway: GatewayProcess) -> None:
    mine, theirs = client(gateway, ACME), client(gateway, GLOBEX)
    session = mine.chat("", turn_id(), text="private", **SHORT).session_id
    for call in (
        lambda: theirs.get_session(session),
        lambda: theirs.chat(session, turn_id(), text="hi", **SHORT),
        lambda: theirs.delete_session(session),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert mine.get_session(session).turns == 1
    for key in ("", "wrong-key"):
        with pytest.raises(grpc.RpcError) as info:
            DialogueClient(gateway.target, key or None).get_session(session)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert mine.delete_session(session)
    with pytest.raises(grpc.RpcError) as info:
        mine.get_session(session)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"images": [b"\x89PNG not really"]}, grpc.StatusCode.INVALID_ARGUMENT, "image"),
        ({"audio": b""}, grpc.StatusCode.INVALID_ARGUMENT, "audio is empty"),
        ({"text": "x", "max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        ({"text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ],
)
def test_bad_input_is_a_clear_status(
    gateway: GatewayProcess, kwargs: dict, code: grpc.StatusCode, message: str
) -> None:
    c = client(gateway)
    with pytest.raises(grpc.RpcError) as info:
        c.chat("", turn_id(), **kwargs)
    assert info.value.code() == code
    assert message in info.value.details()
    c.close()


def test_unknown_session_and_missing_turn_id(gateway: GatewayProcess) -> None:
    c = client(gateway)
    with pytest.raises(grpc.RpcError) as info:
        c.chat("no-such-session", turn_id(), text="hi", **SHORT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        list(c.chat_stream(pb.ChatRequest(parts=[pb.Part(text="hi")])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "turn_id" in info.value.details()
    c.close()


def test_oversize_message_is_rejected(gateway: GatewayProcess) -> None:
    c = client(gateway)
    with pytest.raises(grpc.RpcError) as info:
        c.chat("", turn_id(), images=[b"\0" * (33 << 20)])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    c.close()


def test_speech_output_and_metrics(gateway: GatewayProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    before = Scrape(url)
    c = client(gateway)
    reply = c.chat("", turn_id(), text="speak", speech=True, temperature=0.0, max_new_tokens=12)
    assert reply.audio_chunks >= 1 and len(reply.audio) == reply.done.usage.speech_tokens * 1920
    assert "first_audio" in reply.done.timings_ms
    assert "prefill" in reply.done.timings_ms  # through Triton too (PREFILL_MS)
    c.close()
    after = Scrape(url)
    # Series that prove this turn was observed: one more of each, the audio's seconds counted.
    for name, labels in (
        ("iomni_gateway_time_to_first_audio_seconds_count", {}),
        ("iomni_gateway_time_to_first_token_seconds_count", {}),
        ("iomni_gateway_turn_duration_seconds_count", {}),
        ("iomni_gateway_speech_real_time_factor_count", {}),
        ("iomni_gateway_time_per_output_token_seconds_count", {}),
        ("iomni_gateway_turns_total", {"outcome": "ok"}),
        ("iomni_gateway_stage_duration_seconds_count", {"stage": "speech"}),
        ("iomni_gateway_stage_duration_seconds_count", {"stage": "prefill"}),
        ("iomni_gateway_kv_affinity_total", {}),
    ):
        assert delta(before, after, name, **labels) == 1, (name, labels)
    assert reply.done.usage.completion_tokens >= 2  # so the turn has a time per token
    assert delta(before, after, "iomni_gateway_time_per_output_token_seconds_sum") > 0
    audio_s = delta(before, after, "iomni_gateway_audio_seconds_total")
    assert audio_s == pytest.approx(reply.done.usage.audio_ms / 1000)
    assert after.value("iomni_gateway_active_turns") == 0
    (tmp_path / "metrics.txt").write_text(after.text)
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=after.text, text=True, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_embedded_engines_speech_decoders_report_on_the_gateways_metrics(
    start_gateway,  # type: ignore[no-untyped-def]
) -> None:
    """With `--transport inprocess` the speech workers' schedulers report under the Triton
    speech decoder's metric names, labelled by worker, on the gateway's /metrics."""
    embedded = start_gateway("--transport", "inprocess")
    url = f"http://127.0.0.1:{embedded.metrics_port}/metrics"
    before = Scrape(url)
    c = client(embedded)
    reply = c.chat("", turn_id(), text="speak", speech=True, temperature=0.0, max_new_tokens=12)
    assert reply.audio_chunks >= 1
    c.close()
    deadline = time.monotonic() + 10
    while True:  # the worker's last report crosses its pipe after the reply's audio
        after = Scrape(url)
        instances = {
            s.labels["instance"] for s in after.samples if s.name == "iomni_speech_open_sequences"
        }
        if instances and after.value("iomni_speech_open_sequences") == 0:
            break
        assert time.monotonic() < deadline, after.text
        time.sleep(0.1)
    assert delta(before, after, "iomni_speech_decode_batch_replies_count") >= 2  # two groups
    assert instances <= {"worker-0", "worker-1"}
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=after.text, text=True, capture_output=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_concurrency_limit_is_resource_exhausted(start_gateway) -> None:  # type: ignore[no-untyped-def]
    small = start_gateway("--max-concurrent-turns", "1")
    c = client(small)
    stream = c.chat_stream(
        chat_request("", turn_id(), text="long", temperature=0.0, max_new_tokens=400)
    )
    next(iter(stream))
    with pytest.raises(grpc.RpcError) as info:
        c.chat("", turn_id(), text="second", **SHORT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stream.cancel()
    c.close()


def test_health_is_not_serving_without_redis(start_gateway) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.redis_fixture import free_port

    lonely = start_gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0", wait=False)
    lonely.wait_serving(serving=False)
    with pytest.raises(grpc.RpcError) as info:
        client(lonely).chat("", turn_id(), text="hi", **SHORT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis" in info.value.details()


def test_sigkill_mid_turn_leaves_no_stuck_lease_or_half_turn(start_gateway) -> None:  # type: ignore[no-untyped-def]
    """With the default lease (6 s, renewed every 2 s) a killed gateway's session is served
    again within seconds; the killed turn left nothing half-written, and retrying its turn id
    runs it exactly once."""
    victim = start_gateway()
    survivor = start_gateway()
    c = client(victim)
    session = c.chat("", turn_id(), text="before", **SHORT).session_id
    killed_turn = turn_id()
    stream = c.chat_stream(
        chat_request(session, killed_turn, text="long", temperature=0.0, max_new_tokens=400)
    )
    next(iter(stream))
    victim.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    s = client(survivor)
    while True:
        try:
            reply = s.chat(session, killed_turn, text="long", **SHORT)  # the client's retry
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED  # busy until the lease lapses
            assert time.monotonic() - killed_at < 8, "the dead gateway's lease outlived 8 s"
            time.sleep(0.2)
    assert not reply.done.replayed  # it had never been committed: it ran now
    again = s.chat(session, killed_turn, text="long", **SHORT)
    assert again.done.replayed and again.text == reply.text
    history = s.get_session(session).history
    assert [m.parts[0].text for m in history[::2]] == ["before", "long"]  # once, no half turn
    assert history[-1].parts[0].text == reply.text
    s.close()


def test_sigterm_drains_in_flight_turns(start_gateway) -> None:  # type: ignore[no-untyped-def]
    draining = start_gateway("--grace", "60")
    c = client(draining)
    stream = c.chat_stream(
        chat_request("", turn_id(), text="finish me", temperature=0.0, max_new_tokens=60)
    )
    reply = Reply()
    iterator = iter(stream)
    reply.add(next(iterator))
    draining.process.send_signal(signal.SIGTERM)
    for response in iterator:
        reply.add(response)
    assert reply.done is not None and reply.done.usage.completion_tokens == 60
    assert draining.process.wait(60) == 0
