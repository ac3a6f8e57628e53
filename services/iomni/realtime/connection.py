"""One OpenAI Realtime WebSocket connection: client events in, server events out, over a
`LiveSession` (the same turn-taking, turn core and state as gRPC live mode).

Client events are validated with the `openai` package's types; a bad one gets an `error`
event naming the problem, never a closed socket. Outgoing events wait in a bounded queue: a
client that stops reading is disconnected, not buffered forever.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from openai.types import realtime as rt
from pydantic import ValidationError

from iomni.engine.events import AudioChunk, TextDelta
from iomni.errors import IomniError
from iomni.live.detector import SpeechStarted, SpeechStopped, TurnDetection
from iomni.live.session import (
    Interrupted,
    LiveEvent,
    LiveSession,
    LiveSettings,
    LiveWarning,
    ReplyStarted,
    ReplyTruncated,
    TurnCommitted,
)
from iomni.model.conversation import MediaPart, TextPart
from iomni.model.sampling import SamplingParams
from iomni.parts import SpeechOptions
from iomni.realtime import events as ev
from iomni.turns.runner import TurnFinished, TurnOutput, TurnRunner

log = logging.getLogger(__name__)
RATE = 24000  # the protocol's PCM rate, in and out
MAX_OUTPUT_TOKENS = 1024  # "inf" means this
HANDLED = {
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "response.create",
    "response.cancel",
    ev.EXTENSION_FRAME,
}
NOT_SUPPORTED = {
    "conversation.item.delete": "items cannot be deleted from a dialogue here",
    "conversation.item.retrieve": "items cannot be retrieved; use GetSession over gRPC",
    "output_audio_buffer.clear": "output_audio_buffer is a WebRTC/SIP event; this is WebSocket",
    "transcription_session.update": "transcription-only sessions are not served",
}
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,(.*)$", re.DOTALL)


@dataclass
class Limits:
    send_queue: int = 2048  # outgoing events waiting for a slow client; beyond: disconnect
    idle_timeout_s: float = 300.0  # no client event for this long: the connection is closed


@dataclass
class _Response:
    """One model response (= one turn of ours) as the protocol sees it."""

    turn_id: str
    response_id: str
    item_id: str
    audio: bool
    text: list[str] = field(default_factory=list)
    reason: str | None = None  # turn_detected | client_cancelled when interrupted


class RealtimeConnection:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        runner: TurnRunner,
        tenant: str,
        session_id: str,
        observer: Any,
        limits: Limits,
    ) -> None:
        self.ws = ws
        self.limits = limits
        self.session = rt.RealtimeSessionCreateRequest(
            type="realtime",
            output_modalities=["audio"],
            max_output_tokens="inf",
            audio=rt.RealtimeAudioConfig(
                input=rt.RealtimeAudioConfigInput(
                    format={"type": "audio/pcm", "rate": RATE},
                    turn_detection={"type": "server_vad", **_vad_defaults()},
                ),
                output=rt.RealtimeAudioConfigOutput(
                    format={"type": "audio/pcm", "rate": RATE}, voice="alloy"
                ),
            ),
        )
        self.outbox: asyncio.Queue[dict | None] = asyncio.Queue(limits.send_queue)
        self.live = LiveSession(
            runner,
            tenant,
            session_id,
            self._params(),
            self._speech(),
            self._live_settings(),
            self._on_live,
            observer,
        )
        self.responses: dict[str, _Response] = {}  # turn id -> response
        self.by_item: dict[str, str] = {}  # assistant item id -> turn id
        self.pending_user_item: str | None = None  # the item speech will become
        self.last_item: str | None = None
        self.closing = False

    # -- the connection -------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            self.send(
                ev.event(rt.SessionCreatedEvent, type="session.created", session=self.session)
            )
            self.send(
                ev.event(
                    rt.ConversationCreatedEvent,
                    type="conversation.created",
                    conversation={"id": self.live.session_id, "object": "realtime.conversation"},
                )
            )
            await self._read()
        finally:
            self.closing = True
            await self.live.close()
            if not self.outbox.full():
                self.outbox.put_nowait(None)
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer

    async def _read(self) -> None:
        while not self.ws.closed:
            try:
                message = await self.ws.receive(timeout=self.limits.idle_timeout_s)
            except TimeoutError:
                self.send(ev.error("invalid_request_error", "idle for too long", "idle_timeout"))
                await asyncio.sleep(0.05)
                await self.ws.close(code=1000, message=b"idle timeout")
                return
            if message.type == WSMsgType.TEXT:
                await self._dispatch(message.data)
            elif message.type == WSMsgType.BINARY:
                self.send(ev.error("invalid_request_error", "send JSON text frames", "binary"))
            elif message.type == WSMsgType.ERROR:
                # A frame over the size cap (or a broken one): say so, then the socket is gone.
                log.info("realtime socket error: %s", self.ws.exception())
                return
            else:
                return

    def send(self, event: dict) -> None:
        if self.closing:
            return
        try:
            self.outbox.put_nowait(event)
        except asyncio.QueueFull:
            # The client stopped reading: drop it rather than buffer without bound.
            self.closing = True
            log.warning(
                "realtime client not reading (%d events queued); closing", self.outbox.qsize()
            )
            self._closer = asyncio.ensure_future(
                self.ws.close(code=1008, message=b"client is not reading")
            )

    async def _write(self) -> None:
        while (event := await self.outbox.get()) is not None:
            await self.ws.send_str(json.dumps(event))

    # -- client events --------------------------------------------------------------------

    async def _dispatch(self, data: str) -> None:
        try:
            raw = json.loads(data)
            kind = raw.get("type") if isinstance(raw, dict) else None
        except json.JSONDecodeError as exc:
            self.send(ev.error("invalid_request_error", f"not JSON: {exc}", "invalid_json"))
            return
        event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
        if kind in NOT_SUPPORTED:
            message = f"{kind} is not supported: {NOT_SUPPORTED[kind]}"
            self.send(ev.error("invalid_request_error", message, "unsupported_event", event_id))
            return
        if kind not in HANDLED:
            message = f"unknown event type {kind!r}; see GET /v1/realtime/capabilities"
            self.send(ev.error("invalid_request_error", message, "unknown_event", event_id))
            return
        try:
            await HANDLERS[kind](self, raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = f"{kind}: {where}: {first['msg']}"
            self.send(ev.error("invalid_request_error", message, "invalid_event", event_id))
        except IomniError as exc:
            kind_name = "server_error" if exc.code.outcome == "error" else "invalid_request_error"
            self.send(ev.error(kind_name, exc.detail, exc.code.name.lower(), event_id))

    async def _session_update(self, raw: dict) -> None:
        update = rt.SessionUpdateEvent.model_validate(raw).session
        if not isinstance(update, rt.RealtimeSessionCreateRequest):
            raise _invalid("only realtime sessions are served (not transcription sessions)")
        if update.tools:
            raise _invalid("tools are not supported")
        merged = self.session.model_copy(deep=True)
        for name in update.model_fields_set - {"audio"}:
            setattr(merged, name, getattr(update, name))
        if update.audio is not None:
            merged.audio = _merge_audio(merged.audio, update.audio)
        _check_formats(merged)
        self.session = merged
        self.live.reconfigure(self._live_settings(), self._params(), self._speech())
        self.send(ev.event(rt.SessionUpdatedEvent, type="session.updated", session=self.session))

    async def _append(self, raw: dict) -> None:
        event = rt.InputAudioBufferAppendEvent.model_validate(raw)
        await self.live.push_audio(_b64(event.audio, "audio"), RATE)

    async def _commit(self, raw: dict) -> None:
        rt.InputAudioBufferCommitEvent.model_validate(raw)
        if not await self.live.commit():
            raise _invalid("the input audio buffer is empty: nothing to commit")

    async def _clear(self, raw: dict) -> None:
        rt.InputAudioBufferClearEvent.model_validate(raw)
        self.live.clear()
        self.pending_user_item = None
        self.send(ev.event(rt.InputAudioBufferClearedEvent, type="input_audio_buffer.cleared"))

    async def _item_create(self, raw: dict) -> None:
        event = rt.ConversationItemCreateEvent.model_validate(raw)
        item = event.item
        if not isinstance(item, rt.RealtimeConversationItemUserMessage):
            raise _invalid("only user messages can be created (text, image, audio content)")
        kinds, texts = [], []
        for content in item.content:
            if content.type == "input_text":
                self.live.add_part(TextPart(content.text or ""))
                texts.append(content.text or "")
            elif content.type == "input_image":
                data = _b64(_data_url(content.image_url or "", "image_url"), "image_url")
                self.live.add_part(MediaPart.from_bytes("image", data))
                kinds.append("input_image")
            elif content.type == "input_audio":
                pcm = _b64(content.audio or "", "audio")
                self.live.add_part(MediaPart.from_bytes("audio", _wav(pcm)))
                kinds.append("input_audio")
        item_id = item.id or ev.new_id("item")
        self._item_added(ev.user_item(item_id, kinds, texts))

    async def _truncate(self, raw: dict) -> None:
        event = rt.ConversationItemTruncateEvent.model_validate(raw)
        turn_id = self.by_item.get(event.item_id)
        if turn_id is None or not await self.live.playback(turn_id, event.audio_end_ms, True):
            raise _invalid(f"no assistant audio item {event.item_id!r} to truncate")

    async def _response_create(self, raw: dict) -> None:
        rt.ResponseCreateEvent.model_validate(raw)
        if await self.live.respond() is None:
            raise _invalid("nothing to respond to: commit audio or create an item first")

    async def _response_cancel(self, raw: dict) -> None:
        rt.ResponseCancelEvent.model_validate(raw)
        self.live.cancel()

    async def _frame(self, raw: dict) -> None:
        image = raw.get("image")
        if not isinstance(image, str):
            raise _invalid(f"{ev.EXTENSION_FRAME} needs `image`: base64 JPEG/PNG")
        await self.live.push_frame(_b64(image, "image"))

    # -- live events -> server events ------------------------------------------------------

    async def _on_live(self, turn_id: str, event: LiveEvent | TurnOutput) -> None:
        if isinstance(event, SpeechStarted):
            self.pending_user_item = self.pending_user_item or ev.new_id("item")
            self.send(
                ev.event(
                    rt.InputAudioBufferSpeechStartedEvent,
                    type="input_audio_buffer.speech_started",
                    audio_start_ms=event.audio_start_ms,
                    item_id=self.pending_user_item,
                )
            )
        elif isinstance(event, SpeechStopped):
            self.send(
                ev.event(
                    rt.InputAudioBufferSpeechStoppedEvent,
                    type="input_audio_buffer.speech_stopped",
                    audio_end_ms=event.audio_end_ms,
                    item_id=self.pending_user_item or ev.new_id("item"),
                )
            )
        elif isinstance(event, TurnCommitted):
            self._committed()
            if turn_id:
                self._response_started(turn_id)
        elif isinstance(event, ReplyStarted):
            self._response_started(turn_id)
        elif isinstance(event, TextDelta | AudioChunk | TurnFinished):
            self._output(turn_id, event)
        elif isinstance(event, Interrupted):
            response = self.responses.get(turn_id)
            if response is not None:
                response.reason = "turn_detected" if event.by == "voice" else "client_cancelled"
        elif isinstance(event, ReplyTruncated):
            response = self.responses.get(turn_id)
            if response is not None:
                self.send(
                    ev.event(
                        rt.ConversationItemTruncatedEvent,
                        type="conversation.item.truncated",
                        item_id=response.item_id,
                        content_index=0,
                        audio_end_ms=event.played_ms,
                    )
                )
        elif isinstance(event, LiveWarning):
            self.send(ev.error("invalid_request_error", event.message, event.code.name.lower()))

    def _committed(self) -> None:
        item_id = self.pending_user_item or ev.new_id("item")
        self.pending_user_item = None
        self.send(
            ev.event(
                rt.InputAudioBufferCommittedEvent,
                type="input_audio_buffer.committed",
                item_id=item_id,
                previous_item_id=self.last_item,
            )
        )
        self._item_added(ev.user_item(item_id, ["input_audio"], []))

    def _item_added(self, item: rt.ConversationItem) -> None:
        for model, kind in (
            (rt.ConversationItemAdded, "conversation.item.added"),
            (rt.ConversationItemDone, "conversation.item.done"),
        ):
            self.send(ev.event(model, type=kind, item=item, previous_item_id=self.last_item))
        self.last_item = item.id

    def _response_started(self, turn_id: str) -> None:
        audio = self._speech() is not None
        response = _Response(turn_id, f"resp_{turn_id[:24]}", f"item_{turn_id[:24]}", audio)
        self.responses[turn_id] = response
        self.by_item[response.item_id] = turn_id
        modalities = ["audio"] if audio else ["text"]
        self.send(
            ev.event(
                rt.ResponseCreatedEvent,
                type="response.created",
                response=rt.RealtimeResponse(
                    id=response.response_id,
                    object="realtime.response",
                    status="in_progress",
                    output=[],
                    output_modalities=modalities,  # type: ignore[arg-type]
                    conversation_id=self.live.session_id,
                ),
            )
        )
        item = ev.assistant_item(response.item_id, audio, None, "in_progress")
        self.send(
            ev.event(
                rt.ResponseOutputItemAddedEvent,
                type="response.output_item.added",
                response_id=response.response_id,
                output_index=0,
                item=item,
            )
        )
        self._item_added(item)
        self.send(
            ev.event(
                rt.ResponseContentPartAddedEvent,
                type="response.content_part.added",
                **self._where(response),
                part={"type": "audio" if audio else "text", "transcript": "" if audio else None},
            )
        )

    def _where(self, response: _Response) -> dict:
        return {
            "response_id": response.response_id,
            "item_id": response.item_id,
            "output_index": 0,
            "content_index": 0,
        }

    def _output(self, turn_id: str, output: TurnOutput) -> None:
        response = self.responses.get(turn_id)
        if response is None:
            return
        where = self._where(response)
        if isinstance(output, TextDelta):
            response.text.append(output.text)
            model, kind = (
                (rt.ResponseAudioTranscriptDeltaEvent, "response.output_audio_transcript.delta")
                if response.audio
                else (rt.ResponseTextDeltaEvent, "response.output_text.delta")
            )
            self.send(ev.event(model, type=kind, delta=output.text, **where))
        elif isinstance(output, AudioChunk):
            self.send(
                ev.event(
                    rt.ResponseAudioDeltaEvent,
                    type="response.output_audio.delta",
                    delta=ev.audio_delta(output.pcm),
                    **where,
                )
            )
        else:
            self._finished(response, output)

    def _finished(self, response: _Response, done: TurnFinished) -> None:
        where, text = self._where(response), done.text
        if response.audio:
            self.send(
                ev.event(rt.ResponseAudioDoneEvent, type="response.output_audio.done", **where)
            )
            self.send(
                ev.event(
                    rt.ResponseAudioTranscriptDoneEvent,
                    type="response.output_audio_transcript.done",
                    transcript=text,
                    **where,
                )
            )
        else:
            self.send(
                ev.event(
                    rt.ResponseTextDoneEvent, type="response.output_text.done", text=text, **where
                )
            )
        part = (
            {"type": "audio", "transcript": text}
            if response.audio
            else {"type": "text", "text": text}
        )
        self.send(
            ev.event(
                rt.ResponseContentPartDoneEvent,
                type="response.content_part.done",
                part=part,
                **where,
            )
        )
        cancelled = done.stop_reason == "cancelled"
        item = ev.assistant_item(
            response.item_id, response.audio, text, "incomplete" if cancelled else "completed"
        )
        self.send(
            ev.event(
                rt.ResponseOutputItemDoneEvent,
                type="response.output_item.done",
                response_id=response.response_id,
                output_index=0,
                item=item,
            )
        )
        self.send(ev.event(rt.ConversationItemDone, type="conversation.item.done", item=item))
        status = "cancelled" if cancelled else "completed"
        details = None
        if cancelled:
            details = {"type": "cancelled", "reason": response.reason or "client_cancelled"}
        elif done.stop_reason == "length":
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        self.send(
            ev.event(
                rt.ResponseDoneEvent,
                type="response.done",
                response=rt.RealtimeResponse(
                    id=response.response_id,
                    object="realtime.response",
                    status=status,  # type: ignore[arg-type]
                    status_details=details,
                    output=[item],
                    usage=ev.usage(done.usage),
                    conversation_id=self.live.session_id,
                ),
            )
        )

    # -- session config -> the turn core --------------------------------------------------

    def _params(self) -> SamplingParams:
        limit = self.session.max_output_tokens
        tokens = MAX_OUTPUT_TOKENS if limit in (None, "inf") else int(limit)  # type: ignore[arg-type]
        return SamplingParams(max_new_tokens=max(1, min(tokens, MAX_OUTPUT_TOKENS))).validate()

    def _speech(self) -> SpeechOptions | None:
        if "audio" not in (self.session.output_modalities or ["audio"]):
            return None
        voice = (
            self.session.audio.output.voice
            if self.session.audio and self.session.audio.output
            else None
        )
        # A voice is a name (every name is the checkpoint's default speaker) or a reference
        # recording as a data URL (`data:audio/wav;base64,...`) to clone.
        if isinstance(voice, str) and voice.startswith("data:"):
            return SpeechOptions(speaker_wav=_b64(_data_url(voice, "voice"), "voice"))
        return SpeechOptions()

    def _live_settings(self) -> LiveSettings:
        audio_in = self.session.audio.input if self.session.audio else None
        vad = audio_in.turn_detection if audio_in else None
        if vad is None:
            return LiveSettings(vad=False, auto_respond=False)
        if vad.type != "server_vad":
            raise _invalid("semantic_vad is not supported; use server_vad or null (manual turns)")
        defaults = TurnDetection()
        silence = vad.silence_duration_ms or defaults.silence_ms
        detection = TurnDetection(
            threshold=vad.threshold if vad.threshold is not None else defaults.threshold,
            prefix_padding_ms=(
                vad.prefix_padding_ms
                if vad.prefix_padding_ms is not None
                else defaults.prefix_padding_ms
            ),
            silence_ms=silence,
            end_of_speech_ms=min(defaults.end_of_speech_ms, silence),
        )
        return LiveSettings(
            detection=detection,
            auto_respond=vad.create_response is not False,
            interrupt_response=vad.interrupt_response is not False,
        ).validate()


Handler = Callable[[RealtimeConnection, dict], Awaitable[None]]
HANDLERS: dict[str, Handler] = {
    "session.update": RealtimeConnection._session_update,
    "input_audio_buffer.append": RealtimeConnection._append,
    "input_audio_buffer.commit": RealtimeConnection._commit,
    "input_audio_buffer.clear": RealtimeConnection._clear,
    "conversation.item.create": RealtimeConnection._item_create,
    "conversation.item.truncate": RealtimeConnection._truncate,
    "response.create": RealtimeConnection._response_create,
    "response.cancel": RealtimeConnection._response_cancel,
    ev.EXTENSION_FRAME: RealtimeConnection._frame,
}


def _vad_defaults() -> dict:
    d = TurnDetection()
    return {
        "threshold": d.threshold,
        "prefix_padding_ms": d.prefix_padding_ms,
        "silence_duration_ms": d.silence_ms,
        "create_response": True,
        "interrupt_response": True,
    }


def _merge_audio(current: Any, update: Any) -> Any:
    merged = current.model_copy(deep=True) if current is not None else update
    for side in ("input", "output"):
        new = getattr(update, side)
        if new is None:
            continue
        old = getattr(merged, side)
        if old is None:
            setattr(merged, side, new)
            continue
        for name in new.model_fields_set:
            setattr(old, name, getattr(new, name))
    return merged


def _check_formats(session: rt.RealtimeSessionCreateRequest) -> None:
    audio = session.audio
    for side in ("input", "output"):
        config = getattr(audio, side) if audio else None
        fmt = config.format if config else None
        if fmt is not None and (
            fmt.type not in (None, "audio/pcm") or getattr(fmt, "rate", RATE) not in (None, RATE)
        ):
            raise _invalid(f"audio.{side}.format must be audio/pcm at 24000 Hz")


def _invalid(message: str) -> IomniError:
    from iomni.errors import InvalidInput

    return InvalidInput(message)


def _b64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(f"`{name}` is not valid base64") from exc


def _data_url(value: str, name: str) -> str:
    match = _DATA_URL.match(value)
    if match is None:
        raise _invalid(f"`{name}` must be a data URL (data:<type>;base64,...)")
    return match.group(1)


def _wav(pcm: bytes) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    if len(pcm) % 2:
        raise _invalid("input_audio must be PCM16: an even number of bytes")
    buffer = io.BytesIO()
    sf.write(buffer, np.frombuffer(pcm, "<i2"), RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
