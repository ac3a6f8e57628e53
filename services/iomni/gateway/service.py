"""The `iomni.v1.Dialogue` service: turns run by the engine over Triton, state in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import numpy as np
import soundfile as sf

from iomni import background, wire
from iomni.auth import Tenants
from iomni.errors import (
    DeadlineExceeded,
    ErrorCode,
    InvalidInput,
    IomniError,
    ResourceExhausted,
)
from iomni.gateway.live import LiveConversation
from iomni.gateway.registration import check
from iomni.gateway.status import abort, as_project_error
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.telemetry.metrics import GatewayMetrics
from iomni.turns.runner import RunningTurn, TurnInput, TurnOutput, TurnRunner
from iomni.turns.store import DialogueStore
from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import dialogue_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # Kafka is optional: imported where the log is configured
    from iomni.streams.publisher import EventLogTap, FrontDoorEventLog

log = logging.getLogger(__name__)


def pcm16_to_wav(data: bytes, rate: int) -> bytes:
    if rate < 8000 or rate > 192000:
        raise InvalidInput(f"PCM16 audio needs sample_rate_hz between 8000 and 192000, got {rate}")
    if len(data) % 2:
        raise InvalidInput("PCM16 audio must have an even number of bytes")
    buffer = io.BytesIO()
    sf.write(buffer, np.frombuffer(data, dtype="<i2"), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


LIVE_ONLY = ("frame", "playback")  # messages that mean something only with server VAD
# Turns a manual Converse stream may have waiting behind the running one: each holds up to
# `max_turn_bytes` of media, so the bound is one on the stream's memory.
MAX_WAITING_TURNS = 4


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
            self._count(len(request.text.text.encode()))
            self.parts.append(TextPart(request.text.text))
            return
        chunk = getattr(request, kind)
        self._count(len(chunk.data))
        self.open.setdefault(kind, bytearray()).extend(chunk.data)
        if kind == "audio":
            self.audio_pcm = chunk.encoding == pb.AUDIO_ENCODING_PCM16
            self.audio_rate = chunk.sample_rate_hz
        if kind == "video":
            self.video_frames = chunk.frames or self.video_frames  # said on any of its chunks
        ended = {"audio": "end_of_clip", "image": "end_of_image", "video": "end_of_video"}
        if getattr(chunk, ended[kind]):
            self._close(kind)

    def _count(self, size: int) -> None:
        # Text counts too: a turn is bounded however it is made up.
        self.size += size
        if self.size > self.max_bytes:
            raise InvalidInput(
                f"the turn's media and text exceed {self.max_bytes >> 20} MiB; send less"
            )

    def _close(self, kind: str) -> None:
        data = bytes(self.open.pop(kind, b""))
        if kind == "audio" and self.audio_pcm:
            data = pcm16_to_wav(data, self.audio_rate)
        frames = (self.video_frames or None) if kind == "video" else None
        if kind == "video":
            self.video_frames = 0  # the next video's own, or the default
        self.parts.append(MediaPart.from_bytes(kind, data, num_frames=frames))

    def finish(self) -> Message:
        for kind in list(self.open):
            self._close(kind)
        message = Message("user", tuple(self.parts))
        self.parts, self.size = [], 0
        return message


Responses = asyncio.Queue[pb.ConverseResponse | None]


class DialogueService(pb_grpc.DialogueServicer):
    def __init__(
        self,
        runner: TurnRunner,
        store: DialogueStore,
        tenants: Tenants,
        metrics: GatewayMetrics,
        event_log: FrontDoorEventLog | None = None,
        idle_timeout_s: float = 300.0,
    ) -> None:
        """`event_log`, when given, gets a copy of every turn's responses (the Kafka dialogue
        event log), published behind the turn."""
        self.runner = runner
        self.store = store
        self.tenants = tenants
        self.metrics = metrics
        self.event_log = event_log
        self.idle_timeout_s = idle_timeout_s  # a Converse stream with no message and no turn

    async def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        try:
            return self.tenants.authenticate(context.invocation_metadata() or ())
        except IomniError as exc:
            await abort(context, exc)
            raise

    async def run_turn(self, turn: TurnInput, queue: Responses, running: RunningTurn) -> None:
        """Run a turn, its outputs as responses into `queue` (and the event log)."""
        tap = self.event_log.turn(turn.session_id, turn.turn_id) if self.event_log else None
        try:
            await self.runner.run(turn, self._emitter(turn, queue, tap), running)
        except IomniError as exc:
            if tap is not None:
                tap.end(exc.code, exc.detail)
            raise
        except Exception:
            if tap is not None:
                tap.end(ErrorCode.INTERNAL, "the turn failed on an internal error")
            raise
        finally:
            if tap is not None:
                tap.end()  # the client went away; a no-op after its `done` or its error

    def _emitter(self, turn: TurnInput, queue: Responses, tap: EventLogTap | None):  # type: ignore[no-untyped-def]
        async def emit(output: TurnOutput) -> None:
            response = wire.response(turn.session_id, turn.turn_id, output)
            if tap is not None:
                tap.put(response)  # published behind the turn: the client never waits for it
            await queue.put(response)

        return emit

    async def Chat(self, request: pb.ChatRequest, context) -> None:  # type: ignore[no-untyped-def]
        tenant = await self._tenant(context)
        self.metrics.active_streams.inc()
        queue: Responses = asyncio.Queue()
        task: asyncio.Task | None = None
        try:
            request = check(request)
            if not request.turn_id:
                raise InvalidInput("turn_id is required: it makes retries of Chat safe")
            session_id = request.session_id
            if not session_id:
                session_id = (await self.store.create_session(tenant)).session_id
            turn = TurnInput(
                tenant,
                session_id,
                request.turn_id,
                await background.run_if_large(
                    request.ByteSize(), wire.chat_message, list(request.parts)
                ),
                wire.sampling_params(request.sampling),
                wire.speech_options(request.output),
            )
            task = asyncio.create_task(self._chat_turn(turn, queue))
            await self._send(context, _drain(queue, task))
        except Exception as exc:
            await abort(context, as_project_error(exc, "the turn"))
        finally:
            if task is not None and not task.done():
                # The client went away: stop the turn (the runner releases the lease).
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self.metrics.active_streams.dec()

    async def _chat_turn(self, turn: TurnInput, queue: Responses) -> None:
        try:
            await self.run_turn(turn, queue, RunningTurn())
        finally:
            await queue.put(None)

    async def Converse(self, request_iterator, context) -> None:  # type: ignore[no-untyped-def]
        tenant = await self._tenant(context)
        self.metrics.active_streams.inc()
        conversation = _Conversation(self, tenant)
        try:
            await self._send(context, conversation.run(request_iterator))
        except Exception as exc:
            await abort(context, as_project_error(exc, "the stream"))
        finally:
            await conversation.close()
            self.metrics.active_streams.dec()

    async def _send(self, context, responses: AsyncIterator[pb.ConverseResponse]) -> None:  # type: ignore[no-untyped-def]
        """Write the responses as they come. A client that stops reading holds the write; after
        `idle_timeout_s` the stream is closed rather than kept with its replies in memory."""
        async with contextlib.aclosing(responses) as stream:
            async for response in stream:
                try:
                    await asyncio.wait_for(context.write(response), self.idle_timeout_s)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the client read nothing for {self.idle_timeout_s:.0f} s; the stream "
                        "was closed (read responses as they come)"
                    ) from None

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:  # type: ignore[no-untyped-def]
        tenant = await self._tenant(context)
        try:
            request = check(request)
            info = await self.store.get_session(tenant, request.session_id)
            history = await self.store.history(tenant, request.session_id)
        except IomniError as exc:
            await abort(context, exc)
            raise
        return pb.Session(
            session_id=info.session_id,
            created_at=info.created_at,
            turns=info.turns,
            history=[wire.history_message(m) for m in history],
        )

    async def DeleteSession(
        self,
        request: pb.DeleteSessionRequest,
        context,  # type: ignore[no-untyped-def]
    ) -> pb.DeleteSessionResponse:
        tenant = await self._tenant(context)
        try:
            request = check(request)
            await self.store.get_session(tenant, request.session_id)
            deleted = await self.store.delete_session(tenant, request.session_id)
        except IomniError as exc:
            await abort(context, exc)
            raise
        return pb.DeleteSessionResponse(deleted=deleted)


class _Conversation:
    """One Converse stream: a reader assembling turns, one turn running at a time."""

    def __init__(self, service: DialogueService, tenant: str) -> None:
        self.service = service
        self.tenant = tenant
        self.queue: Responses = asyncio.Queue()
        self.turns: asyncio.Queue[tuple[str, Message] | None] = asyncio.Queue()
        self.waiting: set[str] = set()  # ids of the turns in `turns`
        self.cancel_when_started: set[str] = set()  # waiting turns a cancel named
        self.running: RunningTurn | None = None
        self.running_id = ""
        self.error: IomniError | None = None
        self.tasks: list[asyncio.Task] = []
        self.live: LiveConversation | None = None

    async def run(self, requests) -> AsyncIterator[pb.ConverseResponse]:  # type: ignore[no-untyped-def]
        iterator = self._touching(_checked(requests)).__aiter__()
        self.idle_since = time.monotonic()
        watchdog = asyncio.create_task(self._watch_idle())
        self.tasks.append(watchdog)
        try:  # the watchdog cannot wake a stream that never sent anything: bound it here
            first = await asyncio.wait_for(iterator.__anext__(), self.service.idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise self._idle_error() from None
        if first.WhichOneof("payload") != "config":
            raise InvalidInput("the first Converse message must be `config`")
        self.config = first.config
        self.params = wire.sampling_params(first.config.sampling)
        self.speech = wire.speech_options(first.config.output)
        live = wire.live_settings(first.config.turn_detection)
        self.session_id, resumed, turns = await self._session(first.config.session_id)
        yield pb.ConverseResponse(
            session_id=self.session_id, started=pb.SessionStarted(resumed=resumed, turns=turns)
        )
        if live is not None:
            service = self.service
            self.live = LiveConversation(
                service.runner, service.metrics, service.event_log,
                self.tenant, self.session_id, self.params, self.speech, live,
            )  # fmt: skip
            async for response in self.live.run(iterator):
                yield response
            return
        self.tasks += [asyncio.create_task(self._read(iterator)), asyncio.create_task(self._work())]
        while True:
            response = await self.queue.get()
            if response is None:
                break
            yield response
        if self.error is not None:
            raise self.error

    async def _touching(self, requests) -> AsyncIterator[pb.ConverseRequest]:  # type: ignore[no-untyped-def]
        async for request in requests:
            self.idle_since = time.monotonic()
            yield request

    def busy(self) -> bool:
        if self.live is not None:
            return self.live.live.reply is not None and not self.live.live.reply.finished
        return self.running is not None

    async def _watch_idle(self) -> None:
        """End a stream that has sent nothing for `idle_timeout_s` while no turn runs."""
        limit = self.service.idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            if self.busy():
                self.idle_since = time.monotonic()
            elif time.monotonic() - self.idle_since > limit:
                self._fail(self._idle_error())
                if self.live is not None:
                    self.live.fail(self.error)  # type: ignore[arg-type]
                return

    async def _session(self, session_id: str) -> tuple[str, bool, int]:
        store = self.service.store
        if not session_id:
            return (await store.create_session(self.tenant)).session_id, False, 0
        info = await store.get_session(self.tenant, session_id)
        return info.session_id, True, info.turns

    async def _read(self, iterator) -> None:  # type: ignore[no-untyped-def]
        assembler = TurnAssembler(self.service.runner.limits.max_turn_bytes)
        try:
            async for request in iterator:
                kind = request.WhichOneof("payload")
                if kind == "cancel":
                    self._cancel(request.cancel.turn_id)
                elif kind == "end_of_turn":
                    await self._queue(request.end_of_turn.turn_id or uuid.uuid4().hex, assembler)
                elif kind == "config":
                    raise InvalidInput("`config` may only be the first message of a stream")
                elif kind in LIVE_ONLY:
                    raise InvalidInput(
                        f"`{kind}` is for live mode (config.turn_detection.mode = "
                        "TURN_DETECTION_SERVER_VAD); in manual turns send images and audio"
                    )
                elif kind is not None:
                    assembler.add(request)
        except Exception as exc:
            self._fail(as_project_error(exc, "the stream"))
        finally:
            await self.turns.put(None)

    async def _queue(self, turn_id: str, assembler: TurnAssembler) -> None:
        if len(self.waiting) >= MAX_WAITING_TURNS:
            raise ResourceExhausted(
                f"{MAX_WAITING_TURNS} turns are already waiting on this stream behind the "
                "running one; send the next end_of_turn after a turn's `done`"
            )
        message = await background.run_if_large(assembler.size, assembler.finish)
        self.waiting.add(turn_id)
        self.turns.put_nowait((turn_id, message))

    def _cancel(self, turn_id: str = "") -> None:
        """Cancel the running turn, or the waiting turn `turn_id` names (it will end as
        cancelled as soon as it starts, without running)."""
        if turn_id and turn_id != self.running_id:
            if turn_id in self.waiting:
                self.cancel_when_started.add(turn_id)
            return
        if self.running is not None:
            self.running.request_cancel()

    async def _work(self) -> None:
        try:
            while True:
                item = await self.turns.get()
                if item is None or self.error is not None:
                    break  # a failed stream runs none of the turns still waiting on it
                turn_id, message = item
                self.waiting.discard(turn_id)
                self.running, self.running_id = RunningTurn(), turn_id
                if turn_id in self.cancel_when_started:
                    self.cancel_when_started.discard(turn_id)
                    self.running.request_cancel()
                turn = TurnInput(
                    self.tenant, self.session_id, turn_id, message, self.params, self.speech
                )
                await self.service.run_turn(turn, self.queue, self.running)
                self.running, self.running_id = None, ""
        except Exception as exc:
            self._fail(as_project_error(exc, "the turn"))
        finally:
            await self.queue.put(None)

    def _idle_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"no message on this stream for {self.service.idle_timeout_s:.0f} s; it was closed "
            "(open a new one to go on; the session is kept)"
        )

    def _fail(self, exc: IomniError) -> None:
        if self.error is None:
            self.error = exc
        self._cancel()
        self.queue.put_nowait(None)

    async def close(self) -> None:
        self._cancel()
        if self.live is not None:
            await self.live.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task


async def _checked(requests) -> AsyncIterator[pb.ConverseRequest]:  # type: ignore[no-untyped-def]
    """The stream's requests; one that did not parse ends it with INVALID_ARGUMENT."""
    async for request in requests:
        yield check(request)


async def _drain(queue: Responses, task: asyncio.Task) -> AsyncIterator[pb.ConverseResponse]:
    while True:
        response = await queue.get()
        if response is None:
            break
        yield response
    await task  # re-raises the turn's error, if any
