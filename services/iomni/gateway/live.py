"""A Converse stream in live mode: microphone audio and camera frames into a `LiveSession`,
its events and replies back as `ConverseResponse`s."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from iomni import wire
from iomni.engine.events import AudioChunk, TextDelta
from iomni.errors import ErrorCode, InvalidInput, IomniError
from iomni.gateway.status import as_project_error
from iomni.live.session import LiveEvent, LiveSession, LiveSettings, LiveWarning
from iomni.model.sampling import SamplingParams
from iomni.parts import SpeechOptions
from iomni.turns.runner import TurnFinished, TurnOutput, TurnRunner
from iomni.v1 import dialogue_pb2 as pb

if TYPE_CHECKING:
    from iomni.live.observer import LiveObserver
    from iomni.streams.publisher import EventLogTap, FrontDoorEventLog

EVENT_LOG_TURNS = 8  # publishers kept for turns still streaming


class LiveConversation:
    def __init__(
        self,
        runner: TurnRunner,
        observer: LiveObserver,
        event_log: FrontDoorEventLog | None,
        tenant: str,
        session_id: str,
        params: SamplingParams,
        speech: SpeechOptions | None,
        settings: LiveSettings,
    ) -> None:
        self.event_log = event_log
        self.session_id = session_id
        self.queue: asyncio.Queue[pb.ConverseResponse | None] = asyncio.Queue()
        self.live = LiveSession(
            runner,
            tenant,
            session_id,
            params,
            speech,
            settings,
            self._emit,
            observer,
        )
        self.error: IomniError | None = None
        self._logs: OrderedDict[str, EventLogTap] = OrderedDict()
        self._reader: asyncio.Task | None = None

    async def run(
        self, requests: AsyncIterator[pb.ConverseRequest]
    ) -> AsyncIterator[pb.ConverseResponse]:
        self._reader = asyncio.create_task(self._read(requests))
        while True:
            response = await self.queue.get()
            if response is None:
                break
            yield response
        if self.error is not None:
            raise self.error

    async def _read(self, requests: AsyncIterator[pb.ConverseRequest]) -> None:
        try:
            async for request in requests:
                await self._handle(request)
            # The client is done sending but still listens: its reply ends and is committed.
            await self.live.finish()
        except Exception as exc:
            self.error = as_project_error(exc, "the live stream")
        finally:
            await self.live.close()
            self._end_logs()
            await self.queue.put(None)

    async def _handle(self, request: pb.ConverseRequest) -> None:
        kind = request.WhichOneof("payload")
        if kind == "audio":
            if request.audio.encoding != pb.AUDIO_ENCODING_PCM16:
                await self._warn("live mode takes raw PCM16 audio chunks (encoding PCM16)")
                return
            await self.live.push_audio(request.audio.data, request.audio.sample_rate_hz)
        elif kind == "frame":
            await self.live.push_frame(request.frame.data)
        elif kind == "text":
            self.live.add_text(request.text.text)
        elif kind == "end_of_turn":
            await self.live.commit()
        elif kind == "cancel":
            self.live.cancel()
        elif kind == "playback":
            await self.live.playback(request.playback.turn_id, request.playback.played_ms)
        elif kind in ("image", "video"):
            await self._warn(f"live mode takes camera `frame`s, not `{kind}`; it was dropped")
        elif kind == "config":
            raise InvalidInput("`config` may only be the first message of a stream")

    async def _warn(self, message: str) -> None:
        await self._emit("", LiveWarning(ErrorCode.INVALID_INPUT, message))

    async def _emit(self, turn_id: str, event: LiveEvent | TurnOutput) -> None:
        response = wire.live_response(self.session_id, turn_id, event)
        if isinstance(event, TextDelta | AudioChunk | TurnFinished):
            self._log(turn_id, response)
        await self.queue.put(response)

    def _log(self, turn_id: str, response: pb.ConverseResponse) -> None:
        """The turn's outputs also go to the Kafka event log, as manual turns' do (behind the
        turn: the client never waits for the broker)."""
        if self.event_log is None:
            return
        tap = self._logs.get(turn_id)
        if tap is None:
            tap = self._logs[turn_id] = self.event_log.turn(self.session_id, turn_id)
            while len(self._logs) > EVENT_LOG_TURNS:
                self._logs.popitem(last=False)[1].end()
        tap.put(response)  # its `done` ends it
        if response.WhichOneof("payload") == "done":
            self._logs.pop(turn_id, None)

    def _end_logs(self) -> None:
        """Turns still streaming when the stream ends: their log says they did not finish."""
        for tap in self._logs.values():
            tap.end()
        self._logs.clear()

    def fail(self, error: IomniError) -> None:
        """End the stream with `error` (the idle watchdog)."""
        if self.error is None:
            self.error = error
        self.queue.put_nowait(None)

    async def close(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        await self.live.close()
        self._end_logs()
