"""The Realtime connection's own rules, without a network: a client that stops reading is
disconnected (its queue is bounded), and outgoing events match the `openai` types."""

from __future__ import annotations

import asyncio

from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from iomni.engine.events import Usage
from iomni.realtime import events as ev
from iomni.realtime.connection import Limits, RealtimeConnection
from iomni.turns.store import MemoryDialogueStore


class StuckSocket:
    """A WebSocket whose client never reads: every send blocks."""

    def __init__(self) -> None:
        self.closed = False
        self.close_code: int | None = None
        self.sent = 0

    async def send_str(self, data: str) -> None:
        self.sent += 1
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.closed = True
        self.close_code = code


class FakeRunner:
    def __init__(self) -> None:
        self.store = MemoryDialogueStore()
        self.engine = None


async def test_a_client_that_stops_reading_is_disconnected_not_buffered() -> None:
    socket = StuckSocket()
    connection = RealtimeConnection(
        socket,  # type: ignore[arg-type]
        FakeRunner(),  # type: ignore[arg-type]
        "acme",
        "s1",
        None,
        Limits(send_queue=8),
    )
    writer = asyncio.create_task(connection._write())
    for _ in range(20):
        connection.send(ev.error("invalid_request_error", "x"))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert socket.closed and socket.close_code == 1008
    assert connection.outbox.qsize() <= 8  # bounded: nothing beyond the cap was kept
    assert connection.closing
    writer.cancel()


def test_built_events_validate_against_the_openai_types() -> None:
    adapter = TypeAdapter(RealtimeServerEvent)
    usage = ev.usage(
        Usage(prompt_tokens=30, completion_tokens=5, audio_tokens=10, speech_tokens=25)
    )
    assert usage.input_token_details.text_tokens == 20  # type: ignore[union-attr]
    for event in (
        ev.error("invalid_request_error", "bad", "unknown_event"),
        ev.event(
            __import__("openai").types.realtime.ResponseAudioDeltaEvent,
            type="response.output_audio.delta",
            delta=ev.audio_delta(b"\x00\x01"),
            response_id="r",
            item_id="i",
            output_index=0,
            content_index=0,
        ),
    ):
        adapter.validate_python(event)
