"""The OpenAI Realtime endpoint over the real stack, driven by a client nobody here wrote: the
official `openai` SDK (`client.realtime.connect`). Every server event is validated against the
SDK's own types (`openai.types.realtime.RealtimeServerEvent`)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from iomni.client import AsyncDialogueClient
from iomni.testing.speech import RATE, espeak_available, pcm, silence, spoken
from tests.conftest import png_bytes
from tests.integration.conftest import TENANT_KEYS, GatewayProcess

pytestmark = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng")
SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
SPEED = 3.5


class Conversation:
    """An SDK connection plus a reader that validates and keeps every server event."""

    def __init__(self, connection) -> None:  # type: ignore[no-untyped-def]
        self.connection = connection
        self.events: list[dict] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            raw = await self.connection.recv_bytes()
            SERVER_EVENT.validate_json(raw)  # the contract: fails the test on a bad event
            self.events.append(json.loads(raw))

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout_s: float = 90) -> dict:
        deadline = time.monotonic() + timeout_s
        while len(self.of(kind)) < count:
            if self.reader.done():
                self.reader.result()
            assert time.monotonic() < deadline, (
                f"no {kind} #{count}: {[e['type'] for e in self.events]}"
            )
            await asyncio.sleep(0.02)
        return self.of(kind)[count - 1]

    async def say(self, samples: np.ndarray) -> None:
        step = RATE * 40 // 1000
        for start in range(0, len(samples), step):
            chunk = base64.b64encode(pcm(samples[start : start + step])).decode()
            await self.connection.input_audio_buffer.append(audio=chunk)
            await asyncio.sleep(0.04 / SPEED)


def sdk(gateway: GatewayProcess, key: str = TENANT_KEYS["acme"]) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{gateway.realtime_port}/v1")


async def test_a_spoken_conversation_through_the_openai_sdk(gateway: GatewayProcess) -> None:
    """Server VAD, two spoken turns, a barge-in with truncate, then a text turn with an image."""
    async with sdk(gateway).realtime.connect(model="interactiveomni") as connection:
        talk = Conversation(connection)
        await talk.wait_for("session.created")
        session_id = (await talk.wait_for("conversation.created"))["conversation"]["id"]
        await connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["audio"],
                "max_output_tokens": 40,
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}
                },
            }
        )
        updated = await talk.wait_for("session.updated")
        assert updated["session"]["max_output_tokens"] == 40

        # Turn 1: speech, then silence; the server hears the end and answers.
        await talk.say(np.concatenate([spoken("Hello, who are you?"), silence(1.2)]))
        done = await talk.wait_for("response.done")
        kinds = [e["type"] for e in talk.events]
        for expected in (
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_audio_transcript.delta",
            "response.output_audio.delta",
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
        ):
            assert expected in kinds, expected
        assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
        assert done["response"]["status"] in ("completed", "incomplete")
        assert done["response"]["usage"]["input_token_details"]["audio_tokens"] > 0
        audio = b"".join(
            base64.b64decode(e["delta"]) for e in talk.of("response.output_audio.delta")
        )
        assert len(audio) > 0 and len(audio) % 2 == 0
        transcript = talk.of("response.output_audio_transcript.done")[0]["transcript"]

        # Turn 2: the user speaks over the reply (barge-in), then says how much they heard.
        await talk.say(np.concatenate([spoken("Tell me a long story"), silence(0.8)]))
        second = await talk.wait_for("response.created", 2)
        first_audio = len(talk.of("response.output_audio.delta"))
        while len(talk.of("response.output_audio.delta")) == first_audio:
            await asyncio.sleep(0.02)
        await talk.say(np.concatenate([spoken("Stop, stop please"), silence(1.2)]))
        cancelled = await talk.wait_for("response.done", 2)
        assert cancelled["response"]["id"] == second["response"]["id"]
        assert cancelled["response"]["status"] == "cancelled"
        assert cancelled["response"]["status_details"]["reason"] == "turn_detected"
        item_id = cancelled["response"]["output"][0]["id"]
        await connection.conversation.item.truncate(
            item_id=item_id, content_index=0, audio_end_ms=1000
        )
        truncated = await talk.wait_for("conversation.item.truncated")
        assert truncated["item_id"] == item_id and truncated["audio_end_ms"] == 1000
        await talk.wait_for("response.done", 3)  # the reply to "stop"

        # Turn 4: typed text with an image, answered on request (no audio in).
        image = base64.b64encode(png_bytes(320, 240)).decode()
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{image}"},
                ],
            }
        )
        await connection.response.create()
        last = await talk.wait_for("response.done", 4)
        assert last["response"]["usage"]["input_token_details"]["image_tokens"] > 0

        # An unknown event gets an `error` naming it; the socket stays open.
        await connection.send({"type": "made.up.event"})  # type: ignore[arg-type]
        error = await talk.wait_for("error")
        assert "made.up.event" in error["error"]["message"]
        assert error["error"]["type"] == "invalid_request_error"
        await connection.response.cancel()  # nothing running: harmless
        talk.reader.cancel()

    # The same dialogue, seen over gRPC: four turns, the interrupted one cut to what was heard.
    async with AsyncDialogueClient(gateway.target, TENANT_KEYS["acme"]) as client:
        stored = await client.get_session(session_id)
    assert stored.turns == 4
    assert stored.history[1].parts[0].text == transcript
    cut = stored.history[3].parts[0].text
    said = "".join(
        e["delta"]
        for e in talk.events
        if e["type"] == "response.output_audio_transcript.delta"
        and e["response_id"] == second["response"]["id"]
    )
    assert said.startswith(cut) and len(cut) <= len(said)


async def test_manual_turns_and_text_only_output(gateway: GatewayProcess) -> None:
    """turn_detection null: audio waits for input_audio_buffer.commit; output_modalities
    ["text"] answers with output_text deltas and no audio."""
    async with sdk(gateway).realtime.connect(model="interactiveomni") as connection:
        talk = Conversation(connection)
        await connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "max_output_tokens": 8,
                "audio": {"input": {"turn_detection": None}},
            }
        )
        await talk.wait_for("session.updated")
        await talk.say(spoken("Good morning"))
        await asyncio.sleep(1.0)
        assert talk.of("input_audio_buffer.speech_started") == []  # no VAD in manual mode
        await connection.input_audio_buffer.commit()
        await talk.wait_for("input_audio_buffer.committed")
        assert talk.of("response.created") == []  # committed, not answered yet
        await connection.response.create()
        done = await talk.wait_for("response.done")
        assert talk.of("response.output_text.delta") and not talk.of("response.output_audio.delta")
        assert done["response"]["output"][0]["content"][0]["type"] == "output_text"
        await connection.input_audio_buffer.commit()  # empty now
        error = await talk.wait_for("error")
        assert "empty" in error["error"]["message"]
        talk.reader.cancel()


async def test_bad_keys_and_unknown_sessions_are_refused(gateway: GatewayProcess) -> None:
    url = f"ws://127.0.0.1:{gateway.realtime_port}/v1/realtime?model=x"
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, additional_headers={"Authorization": "Bearer nope"}):
            pass
    assert info.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(
            url + "&session_id=does-not-exist",
            additional_headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}"},
        ):
            pass
    assert info.value.response.status_code == 404
    # A browser passes its key as a subprotocol.
    async with websockets.connect(
        url, subprotocols=["realtime", f"openai-insecure-api-key.{TENANT_KEYS['globex']}"]
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send("not json")
        assert "not JSON" in json.loads(await _next_error(ws))["error"]["message"]
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "***"}))
        assert "base64" in json.loads(await _next_error(ws))["error"]["message"]


async def _next_error(ws) -> str:  # type: ignore[no-untyped-def]
    while True:
        raw = await asyncio.wait_for(ws.recv(), 10)
        if json.loads(raw)["type"] == "error":
            return raw


def test_capabilities_and_readiness(gateway: GatewayProcess) -> None:
    base = f"http://127.0.0.1:{gateway.realtime_port}"
    with urllib.request.urlopen(base + "/v1/realtime/capabilities") as r:
        capabilities = json.loads(r.read())
    assert "iomni.input_frame.append" in capabilities["extensions"]
    assert "conversation.item.truncate" in capabilities["client_events"]
    with urllib.request.urlopen(base + "/readyz") as r:
        assert json.loads(r.read()) == {"serving": True}
    with urllib.request.urlopen(base + "/") as r:
        assert b"/static/app.js" in r.read()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(base + "/static/nothing-here.js")


async def test_limits_oversize_messages_and_idle_connections(start_gateway) -> None:  # type: ignore[no-untyped-def]
    """A message over the size cap closes the socket with 1009 (too big); a connection with no
    client event for the idle timeout gets an `error` and is closed."""
    strict = start_gateway("--realtime-idle-timeout-s", "2", "--max-message-mb", "1")
    url = f"ws://127.0.0.1:{strict.realtime_port}/v1/realtime?model=x"
    headers = {"Authorization": f"Bearer {TENANT_KEYS['acme']}"}
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.recv()  # session.created
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (2 << 20)}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with websockets.connect(url, additional_headers=headers) as ws:
        started = time.monotonic()
        seen = []
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                seen.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        assert 1.5 < time.monotonic() - started < 8
        assert seen[-1]["type"] == "error" and seen[-1]["error"]["code"] == "idle_timeout"
