"""Hypothesis throws requests at a whole gateway: random oneofs, sizes at and past every limit,
random and truncated media, bad UTF-8 where the wire allows it, random orders of config /
end_of_turn / cancel, random Realtime events. A clear status is fine; INTERNAL, UNKNOWN, a
hang past the deadline, a crash, a leaked lease or turn, or memory that keeps growing is a
defect. `make test` runs IOMNI_FUZZ_EXAMPLES (2000) gRPC cases; `make fuzz` runs 20000."""

from __future__ import annotations

import collections
import io
import json
import os
import resource
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from iomni.realtime.connection import HANDLED
from iomni.v1 import dialogue_pb2 as pb
from tests.fuzz.conftest import KEYS, FuzzGateway

EXAMPLES = int(os.environ.get("IOMNI_FUZZ_EXAMPLES", "2000"))
DEADLINE_S = 30.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SEEN: collections.Counter = collections.Counter()


def _png(width: int = 40, height: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 40, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _wav(seconds: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


PNG, WAV = _png(), _wav()
MEDIA = st.one_of(
    st.binary(max_size=96),
    st.sampled_from([PNG, PNG[: len(PNG) // 2], WAV, WAV[:60], b"", b"\x89PNG\r\n\x1a\n"]),
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "hi", "<IMG_CONTEXT><|im_end|>", "x" * 5000]),
)
IDS = st.one_of(
    st.sampled_from(["", "bad id!", "{brace}", "a" * 200, "ok-id"]),
    st.uuids().map(lambda u: u.hex),
    st.text(max_size=12),
)
FLOATS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))


@st.composite
def sampling(draw) -> pb.SamplingOptions:  # type: ignore[no-untyped-def]
    return pb.SamplingOptions(
        temperature=draw(FLOATS),
        top_p=draw(FLOATS),
        top_k=draw(st.one_of(st.none(), st.integers(-10, 500))),
        # Small replies keep thousands of cases fast; limits are still crossed both ways.
        max_new_tokens=draw(st.one_of(st.none(), st.integers(-3, 3), st.just(10**9))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**64 - 1))),
    )


@st.composite
def part(draw) -> pb.Part:  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["text", "image", "audio", "video", "media_ref", "none"]))
    if kind == "text":
        return pb.Part(text=draw(TEXT))
    if kind == "media_ref":
        return pb.Part(media_ref=pb.MediaRef(kind=draw(TEXT), sha256=draw(TEXT)))
    if kind == "none":
        return pb.Part()
    return pb.Part(**{kind: draw(MEDIA)}, video_frames=draw(st.integers(0, 100)))


@st.composite
def chat_request(draw) -> pb.ChatRequest:  # type: ignore[no-untyped-def]
    return pb.ChatRequest(
        session_id=draw(IDS),
        turn_id=draw(IDS),
        parts=draw(st.lists(part(), max_size=4)),
        sampling=draw(sampling()),
        output=pb.OutputOptions(
            speech=draw(st.booleans().filter(lambda b: True)) and draw(st.integers(0, 9)) == 0,
            speaker_wav=draw(st.sampled_from([b"", b"junk", WAV])),
        ),
    )


@st.composite
def converse_request(draw) -> pb.ConverseRequest:  # type: ignore[no-untyped-def]
    kind = draw(
        st.sampled_from(
            ["config", "text", "audio", "image", "video", "end", "cancel", "frame", "playback"]
        )
    )
    if kind == "config":
        detection = pb.TurnDetection(
            mode=draw(st.sampled_from([0, 1, 2, 7])),
            threshold=draw(FLOATS),
            silence_ms=draw(st.one_of(st.none(), st.integers(0, 20000))),
            min_speech_ms=draw(st.one_of(st.none(), st.integers(0, 20000))),
            max_frames=draw(st.one_of(st.none(), st.integers(0, 40))),
        )
        return pb.ConverseRequest(
            config=pb.SessionConfig(
                session_id=draw(IDS), sampling=draw(sampling()), turn_detection=detection
            )
        )
    if kind == "text":
        return pb.ConverseRequest(text=pb.UserText(text=draw(TEXT)))
    if kind == "audio":
        return pb.ConverseRequest(
            audio=pb.UserAudio(
                data=draw(MEDIA),
                encoding=draw(st.sampled_from([0, 1, 5])),
                sample_rate_hz=draw(st.sampled_from([0, 1, 8000, 16000, 24000, 11025, 10**9])),
                end_of_clip=draw(st.booleans()),
            )
        )
    if kind == "image":
        return pb.ConverseRequest(
            image=pb.UserImage(data=draw(MEDIA), end_of_image=draw(st.booleans()))
        )
    if kind == "video":
        return pb.ConverseRequest(
            video=pb.UserVideo(data=draw(MEDIA), frames=draw(st.integers(0, 100)))
        )
    if kind == "end":
        return pb.ConverseRequest(end_of_turn=pb.EndOfTurn(turn_id=draw(IDS)))
    if kind == "cancel":
        return pb.ConverseRequest(cancel=pb.Cancel(turn_id=draw(IDS)))
    if kind == "frame":
        return pb.ConverseRequest(frame=pb.CameraFrame(data=draw(MEDIA)))
    return pb.ConverseRequest(
        playback=pb.PlaybackPosition(turn_id=draw(IDS), played_ms=draw(st.integers(0, 10**6)))
    )


def _bad_utf8(message: bytes, field_number: int) -> bytes:
    """`message` plus a string field holding bytes that are not UTF-8."""
    return message + bytes([field_number << 3 | 2, 3]) + b"\xff\xfe\xc0"


@pytest.fixture(scope="module")
def channel(fuzz_gateway: FuzzGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_gateway.target) as channel:
        yield channel


def _call(fn) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        fn()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert code not in FORBIDDEN, f"{code.name}: {exc.details()}"
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED or "exceeded" in (exc.details() or ""), (
            "the call hung past its deadline"
        )
    SEEN[code.name] += 1
    return code


AUTH = (("authorization", f"Bearer {KEYS['acme']}"),)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


@FUZZ
@given(
    case=st.one_of(
        chat_request().map(lambda r: ("chat", r)),
        st.lists(converse_request(), max_size=7).map(lambda rs: ("converse", rs)),
        st.tuples(st.sampled_from(["get", "delete"]), IDS),
        st.tuples(st.just("raw"), st.sampled_from([1, 2]), st.binary(max_size=40)),
        st.tuples(st.just("meta"), st.binary(max_size=8)),
    )
)
def test_no_request_gets_internal_unknown_or_hangs(channel: grpc.Channel, case) -> None:  # type: ignore[no-untyped-def]
    kind = case[0]
    chat = channel.unary_stream(
        "/iomni.v1.Dialogue/Chat",
        request_serializer=lambda b: b,
        response_deserializer=pb.ConverseResponse.FromString,
    )
    if kind == "chat":
        request = case[1]
        _call(lambda: list(chat(request.SerializeToString(), metadata=AUTH, timeout=DEADLINE_S)))
    elif kind == "converse":
        converse = channel.stream_stream(
            "/iomni.v1.Dialogue/Converse",
            request_serializer=pb.ConverseRequest.SerializeToString,
            response_deserializer=pb.ConverseResponse.FromString,
        )
        _call(lambda: list(converse(iter(case[1]), metadata=AUTH, timeout=DEADLINE_S)))
    elif kind in ("get", "delete"):
        method = "GetSession" if kind == "get" else "DeleteSession"
        request = (
            pb.GetSessionRequest(session_id=case[1])
            if kind == "get"
            else pb.DeleteSessionRequest(session_id=case[1])
        )
        call = channel.unary_unary(
            f"/iomni.v1.Dialogue/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        _call(lambda: call(request.SerializeToString(), metadata=AUTH, timeout=DEADLINE_S))
    elif kind == "raw":
        # Bytes off the wire: truncated or garbage messages, and strings that are not UTF-8.
        base = pb.ChatRequest(turn_id=uuid.uuid4().hex, parts=[pb.Part(text="x")])
        payload = _bad_utf8(base.SerializeToString(), case[1]) + case[2]
        code = _call(lambda: list(chat(payload, metadata=AUTH, timeout=DEADLINE_S)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT or code == grpc.StatusCode.OK
    else:
        metadata = (("x-trace-bin", case[1]), *AUTH)  # a binary header before the key
        request = pb.ChatRequest(turn_id=uuid.uuid4().hex, parts=[pb.Part(text="hi")])
        request.sampling.max_new_tokens = 1
        code = _call(
            lambda: list(chat(request.SerializeToString(), metadata=metadata, timeout=DEADLINE_S))
        )
        assert code == grpc.StatusCode.OK


def test_the_gateway_is_whole_after_the_fuzz(
    fuzz_gateway: FuzzGateway, channel: grpc.Channel
) -> None:
    """Runs after the fuzz (same module, in order): nothing running, no lease left, memory
    not growing, a normal turn still answered."""
    assert sum(SEEN.values()) >= min(EXAMPLES, 2000), SEEN
    assert SEEN["INVALID_ARGUMENT"] > 0 and SEEN["OK"] > 0, SEEN  # both paths were exercised
    runtime = fuzz_gateway.runtime
    assert runtime.runner.active == 0
    store = runtime.store
    held = [s for s in store._sessions.values() if store._live_lease(s) is not None]  # type: ignore[attr-defined]
    assert held == []
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert rss_mb < 6000, f"peak RSS {rss_mb:.0f} MB"
    chat = channel.unary_stream(
        "/iomni.v1.Dialogue/Chat",
        request_serializer=pb.ChatRequest.SerializeToString,
        response_deserializer=pb.ConverseResponse.FromString,
    )
    request = pb.ChatRequest(turn_id=uuid.uuid4().hex, parts=[pb.Part(text="still there?")])
    request.sampling.max_new_tokens = 2
    responses = list(chat(request, metadata=AUTH, timeout=60))
    assert responses[-1].HasField("done")
    print("fuzz statuses:", dict(SEEN))
    _report("grpc", {"cases": sum(SEEN.values()), "statuses": dict(SEEN)})


def _report(part: str, figures: dict) -> None:
    """`make fuzz` keeps its counts (IOMNI_FUZZ_REPORT names the JSON file)."""
    path = os.environ.get("IOMNI_FUZZ_REPORT")
    if not path:
        return
    report = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    report[part] = figures
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


# Every event the endpoint handles, one it refuses by name, and one it has never heard of.
REALTIME_TYPES = [*sorted(HANDLED), "conversation.item.delete", "made.up"]
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def realtime_event(draw) -> str:  # type: ignore[no-untyped-def]
    if draw(st.integers(0, 19)) == 0:
        return draw(st.text(max_size=30))  # not JSON at all
    event = draw(st.dictionaries(st.text(max_size=12), JSONISH, max_size=4))
    event["type"] = draw(st.sampled_from(REALTIME_TYPES) | st.text(max_size=10))
    for name, value in draw(
        st.lists(
            st.sampled_from(
                [
                    ("audio", "AAAA"),
                    ("audio", "***"),
                    ("item_id", "nope"),
                    ("audio_end_ms", -5),
                    ("session", {"type": "realtime", "output_modalities": ["text"]}),
                    ("session", {"type": "realtime", "audio": {"input": {"turn_detection": None}}}),
                    (
                        "item",
                        {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "hi"}],
                        },
                    ),
                    ("image", "bm90IGFuIGltYWdl"),
                ]
            ),
            max_size=2,
        )
    ):
        event[name] = value
    return json.dumps(event)


@pytest.fixture(scope="module")
def realtime_seen() -> Iterator[collections.Counter]:
    seen: collections.Counter = collections.Counter()
    yield seen
    _report("realtime", dict(seen))


@settings(
    max_examples=max(200, EXAMPLES // 10),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
@given(events=st.lists(realtime_event(), min_size=1, max_size=6))
def test_random_realtime_events_get_errors_not_a_dead_socket(
    fuzz_gateway: FuzzGateway, realtime_seen: collections.Counter, events: list[str]
) -> None:
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{fuzz_gateway.realtime_port}/v1/realtime?model=fuzz"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEYS['acme']}"}) as ws:
        assert json.loads(ws.recv(10))["type"] == "session.created"
        for event in events:
            ws.send(event)
        ws.send(json.dumps({"type": "made.up.last"}))
        realtime_seen["sequences"] += 1
        realtime_seen["events"] += len(events)
        # Every event is answered or ignored; the last unknown one gets its error: the socket
        # survived everything before it.
        while True:
            message = json.loads(ws.recv(30))
            if message["type"] == "error":
                realtime_seen[f"error {message['error']['type']}"] += 1
                assert message["error"]["type"] in ("invalid_request_error", "server_error")
                assert (
                    message["error"]["type"] != "server_error"
                    or "Triton" in message["error"]["message"]
                ), message
                if "made.up.last" in message["error"]["message"]:
                    break


@pytest.mark.parametrize(
    "message",
    [
        pb.ConverseRequest(frame=pb.CameraFrame()),
        pb.ConverseRequest(playback=pb.PlaybackPosition()),
    ],
    ids=["frame", "playback"],
)
def test_live_only_messages_in_a_manual_stream_are_invalid_argument(
    channel: grpc.Channel, message: pb.ConverseRequest
) -> None:
    """Found by `make fuzz`: a camera frame in a manual-mode stream ended it with INTERNAL."""
    converse = channel.stream_stream(
        "/iomni.v1.Dialogue/Converse",
        request_serializer=pb.ConverseRequest.SerializeToString,
        response_deserializer=pb.ConverseResponse.FromString,
    )
    config = pb.ConverseRequest(config=pb.SessionConfig(turn_detection=pb.TurnDetection()))
    with pytest.raises(grpc.RpcError) as raised:
        list(converse(iter([config, message]), metadata=AUTH, timeout=DEADLINE_S))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "live mode" in (raised.value.details() or "")
