"""The `iomni.v1.Dialogue` service: turns run by the engine over Triton, state in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
import soundfile as sf

from iomni.engine.runner import (
    RunningTurn,
    TurnRunner,
    chat_message,
    sampling_params,
    speech_options,
)
from iomni.errors import Internal, InvalidInput, IomniError
from iomni.gateway.auth import Tenants
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.telemetry.metrics import GatewayMetrics
from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import dialogue_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "ABORTED": grpc.StatusCode.ABORTED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
}


def pcm16_to_wav(data: bytes, rate: int) -> bytes:
    if rate < 8000 or rate > 192000:
        raise InvalidInput(f"PCM16 audio needs sample_rate_hz between 8000 and 192000, got {rate}")
    if len(data) % 2:
        raise InvalidInput("PCM16 audio must have an even number of bytes")
    buffer = io.BytesIO()
    sf.write(buffer, np.frombuffer(data, dtype="<i2"), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class TurnAssembler:
    """Collects a Converse turn's parts; chunks of one media item are concatenated."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parts: list[TextPart | MediaPart] = []
        self.open: dict[str, bytearray] = {}
        self.audio_rate = 0
        self.audio_pcm = False
        self.video_frames = 0
        self.size = 0

    def add(self, request: pb.ConverseRequest) -> None:
        kind = request.WhichOneof("payload")
        if kind == "text":
            self.parts.append(TextPart(request.text.text))
            return
        chunk = getattr(request, kind)
        self.size += len(chunk.data)
        if self.size > self.max_bytes:
            raise InvalidInput(f"the turn's media exceed {self.max_bytes >> 20} MiB")
        self.open.setdefault(kind, bytearray()).extend(chunk.data)
        if kind == "audio":
            self.audio_pcm = chunk.encoding == pb.AUDIO_ENCODING_PCM16
            self.audio_rate = chunk.sample_rate_hz
        if kind == "video":
            self.video_frames = chunk.frames or self.video_frames
        ended = {"audio": "end_of_clip", "image": "end_of_image", "video": "end_of_video"}
        if getattr(chunk, ended[kind]):
            self._close(kind)

    def _close(self, kind: str) -> None:
        data = bytes(self.open.pop(kind, b""))
        if kind == "audio" and self.audio_pcm:
            data = pcm16_to_wav(data, self.audio_rate)
        frames = (self.video_frames or None) if kind == "video" else None
        self.parts.append(MediaPart.from_bytes(kind, data, num_frames=frames))

    def finish(self) -> Message:
        for kind in list(self.open):
            self._close(kind)
        message = Message("user", tuple(self.parts))
        self.parts, self.size = [], 0
        return message


def history_message(message: Message) -> pb.Message:
    parts = []
    for part in message.parts:
        if isinstance(part, TextPart):
            parts.append(pb.Part(text=part.text))
        else:
            parts.append(
                pb.Part(
                    media_ref=pb.MediaRef(kind=part.type, sha256=part.sha256),
                    video_frames=part.num_frames or 0,
                )
            )
    return pb.Message(role=message.role, parts=parts)


class DialogueService(pb_grpc.DialogueServicer):
    def __init__(
        self,
        runner: TurnRunner,
        state,
        tenants: Tenants,  # type: ignore[no-untyped-def]
        metrics: GatewayMetrics,
    ) -> None:
        self.runner = runner
        self.state = state
        self.tenants = tenants
        self.metrics = metrics

    async def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        try:
            return self.tenants.authenticate(context.invocation_metadata() or ())
        except IomniError as exc:
            await abort(context, exc)
            raise

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.ConverseResponse]:  # type: ignore[no-untyped-def]
        tenant = await self._tenant(context)
        self.metrics.active_streams.inc()
        queue: asyncio.Queue[pb.ConverseResponse | None] = asyncio.Queue()
        task: asyncio.Task | None = None
        try:
            if not request.turn_id:
                raise InvalidInput("turn_id is required: it makes retries of Chat safe")
            session_id = request.session_id
            if not session_id:
                session_id = (await self.state.create_session(tenant)).session_id
            task = asyncio.create_task(self._chat_turn(tenant, session_id, request, queue))
            async for response in _drain(queue, task):
                yield response
        except Exception as exc:
            await abort(context, as_project_error(exc, "the turn"))
        finally:
            if task is not None and not task.done():
                # The client went away: stop the turn (the runner releases the lease).
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self.metrics.active_streams.dec()

    async def _chat_turn(self, tenant, session_id, request, queue) -> None:  # type: ignore[no-untyped-def]
        try:
            await self.runner.run(
                tenant,
                session_id,
                request.turn_id,
                chat_message(list(request.parts)),
                sampling_params(request.sampling),
                speech_options(request.output),
                queue.put,
                RunningTurn(asyncio.Event()),
            )
        finally:
            await queue.put(None)

    async def Converse(self, request_iterator, context) -> AsyncIterator[pb.ConverseResponse]:  # type: ignore[no-untyped-def]
        tenant = await self._tenant(context)
        self.metrics.active_streams.inc()
        conversation = _Conversation(self, tenant)
        try:
            async for response in conversation.run(request_iterator):
                yield response
        except Exception as exc:
            await abort(context, as_project_error(exc, "the stream"))
        finally:
            await conversation.close()
            self.metrics.active_streams.dec()

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:  # type: ignore[no-untyped-def]
        tenant = await self._tenant(context)
        try:
            info = await self.state.get_session(tenant, request.session_id)
            history = await self.state.history(tenant, request.session_id)
        except IomniError as exc:
            await abort(context, exc)
            raise
        return pb.Session(
            session_id=info.session_id,
            created_at=info.created_at,
            turns=info.turns,
            history=[history_message(m) for m in history],
        )

    async def DeleteSession(
        self,
        request: pb.DeleteSessionRequest,
        context,  # type: ignore[no-untyped-def]
    ) -> pb.DeleteSessionResponse:
        tenant = await self._tenant(context)
        try:
            await self.state.get_session(tenant, request.session_id)
            deleted = await self.state.delete_session(tenant, request.session_id)
        except IomniError as exc:
            await abort(context, exc)
            raise
        return pb.DeleteSessionResponse(deleted=deleted)


class _Conversation:
    """One Converse stream: a reader assembling turns, one turn running at a time."""

    def __init__(self, service: DialogueService, tenant: str) -> None:
        self.service = service
        self.tenant = tenant
        self.queue: asyncio.Queue[pb.ConverseResponse | None] = asyncio.Queue()
        self.turns: asyncio.Queue[tuple[str, Message] | None] = asyncio.Queue()
        self.running: RunningTurn | None = None
        self.error: IomniError | None = None
        self.tasks: list[asyncio.Task] = []

    async def run(self, requests) -> AsyncIterator[pb.ConverseResponse]:  # type: ignore[no-untyped-def]
        iterator = requests.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("payload") != "config":
            raise InvalidInput("the first Converse message must be `config`")
        self.config = first.config
        self.params = sampling_params(first.config.sampling)
        self.speech = speech_options(first.config.output)
        self.session_id, resumed, turns = await self._session(first.config.session_id)
        yield pb.ConverseResponse(
            session_id=self.session_id, started=pb.SessionStarted(resumed=resumed, turns=turns)
        )
        self.tasks = [asyncio.create_task(self._read(iterator)), asyncio.create_task(self._work())]
        while True:
            response = await self.queue.get()
            if response is None:
                break
            yield response
        if self.error is not None:
            raise self.error

    async def _session(self, session_id: str) -> tuple[str, bool, int]:
        state = self.service.state
        if not session_id:
            return (await state.create_session(self.tenant)).session_id, False, 0
        info = await state.get_session(self.tenant, session_id)
        return info.session_id, True, info.turns

    async def _read(self, iterator) -> None:  # type: ignore[no-untyped-def]
        assembler = TurnAssembler(self.service.runner.limits.max_turn_bytes)
        try:
            async for request in iterator:
                kind = request.WhichOneof("payload")
                if kind == "cancel":
                    self._cancel()
                elif kind == "end_of_turn":
                    turn_id = request.end_of_turn.turn_id or uuid.uuid4().hex
                    await self.turns.put((turn_id, assembler.finish()))
                elif kind == "config":
                    raise InvalidInput("`config` may only be the first message of a stream")
                elif kind is not None:
                    assembler.add(request)
        except Exception as exc:
            self._fail(as_project_error(exc, "the stream"))
        finally:
            await self.turns.put(None)

    def _cancel(self) -> None:
        if self.running is not None and not self.running.cancel.is_set():
            self.running.cancelled_at = time.perf_counter()
            self.running.cancel.set()

    async def _work(self) -> None:
        try:
            while True:
                item = await self.turns.get()
                if item is None:
                    break
                turn_id, message = item
                self.running = RunningTurn(asyncio.Event())
                await self.service.runner.run(
                    self.tenant,
                    self.session_id,
                    turn_id,
                    message,
                    self.params,
                    self.speech,
                    self.queue.put,
                    self.running,
                )
                self.running = None
        except Exception as exc:
            self._fail(as_project_error(exc, "the turn"))
        finally:
            await self.queue.put(None)

    def _fail(self, exc: IomniError) -> None:
        if self.error is None:
            self.error = exc
        self._cancel()
        self.queue.put_nowait(None)

    async def close(self) -> None:
        self._cancel()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task


async def _drain(queue: asyncio.Queue, task: asyncio.Task) -> AsyncIterator[pb.ConverseResponse]:
    while True:
        response = await queue.get()
        if response is None:
            break
        yield response
    await task  # re-raises the turn's error, if any


def as_project_error(exc: Exception, what: str) -> IomniError:
    """Project errors pass through; anything else is logged and becomes a generic INTERNAL.
    grpc's own abort (and task cancellation, a BaseException) are re-raised untouched."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, IomniError):
        return exc
    log.exception("%s failed", what)
    return Internal(f"{what} failed: {type(exc).__name__}")


async def abort(context: grpc.aio.ServicerContext, exc: IomniError) -> None:
    code = STATUS.get(exc.code, grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error: %s", exc.detail)
    await context.abort(code, exc.detail)
