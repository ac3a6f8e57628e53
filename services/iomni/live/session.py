"""`LiveSession`: one live conversation for any front door (gRPC Converse in live mode, the
Realtime WebSocket, `iomni chat --live`).

Microphone audio streams in without pause; Silero VAD and the `TurnDetector` decide when the
user speaks and when their turn is over, and the session runs turns through the turn core by
itself. At the end of speech a turn may start early (speculatively: its outputs are held and it
is not committed); if the user goes on speaking it is discarded without a trace, otherwise the
silence confirms it and what it already produced goes out at once. Speech over a reply
interrupts it; the client's playback position cuts the stored reply to what was heard. Camera
frames are encoded as they arrive, so vision work overlaps the user's speech, and the most
recent ones join the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import soundfile as sf

from iomni.engine.events import AudioChunk, TextDelta
from iomni.errors import ErrorCode, InvalidInput, IomniError
from iomni.live.detector import (
    SpeechStarted,
    SpeechStopped,
    TurnDetection,
    TurnDetector,
    Utterance,
)
from iomni.live.observer import LiveObserver, NullLiveObserver
from iomni.live.vad import SAMPLE_RATE, VoiceActivity
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.sampling import SamplingParams
from iomni.parts import SpeechOptions
from iomni.telemetry.tracing import tracer
from iomni.turns.runner import RunningTurn, TurnFinished, TurnInput, TurnOutput, TurnRunner

log = logging.getLogger(__name__)

INPUT_RATES = (8000, 16000, 24000, 32000, 44100, 48000)
# Text tokens spoken per second of reply audio: the speech decoder turns each group of 5 text
# tokens into 25 speech tokens of 40 ms (InteractiveOmni's 5:25 interleave).
SPOKEN_TOKENS_PER_S = 5.0


@dataclass(frozen=True)
class LiveSettings:
    detection: TurnDetection = field(default_factory=TurnDetection)
    early_start: bool = True
    interrupt_response: bool = True
    max_frames: int = 4  # recent camera frames attached to a turn
    max_speedup: float = 4.0  # sustained audio faster than this times real time is dropped
    burst_s: float = 5.0  # audio a client may send ahead of real time before that applies
    max_frame_fps: float = 4.0  # sustained camera frames per second; faster ones are dropped
    auto_respond: bool = True  # a committed turn is answered at once (else: `respond()`)
    vad: bool = True  # False: no turn detection; audio waits for `commit()` (manual turns)

    def validate(self) -> LiveSettings:
        self.detection.validate()
        if not 0 <= self.max_frames <= 16:
            raise InvalidInput(f"max_frames must be between 0 and 16, got {self.max_frames}")
        return self


# -- what a live session emits, besides the turn outputs ------------------------------------


@dataclass(frozen=True)
class TurnCommitted:
    audio_start_ms: int
    audio_end_ms: int
    frames: int


@dataclass(frozen=True)
class ReplyStarted:
    """A reply begins to what the user committed earlier (`respond()`)."""


@dataclass(frozen=True)
class Interrupted:
    by: Literal["voice", "client"]


@dataclass(frozen=True)
class ReplyTruncated:
    played_ms: int
    text: str


@dataclass(frozen=True)
class LiveWarning:
    code: ErrorCode
    message: str


LiveEvent = (
    SpeechStarted
    | SpeechStopped
    | TurnCommitted
    | ReplyStarted
    | Interrupted
    | ReplyTruncated
    | LiveWarning
)
# (turn id or "", event): turn outputs carry their turn's id.
Emit = Callable[[str, LiveEvent | TurnOutput], Awaitable[None]]


@dataclass
class _Reply:
    """A turn the session started, and what is known of how it was heard."""

    turn_id: str
    running: RunningTurn
    end_of_speech_at: float  # monotonic time the user's speech ended
    task: asyncio.Task | None = None
    utterance_end_ms: int = 0
    deltas: list[TextDelta] = field(default_factory=list)
    first_audio_at: float | None = None
    audio_ms: float = 0.0
    finished: bool = False
    interrupted: bool = False
    frames: list[MediaPart] = field(default_factory=list)  # what its turn carried
    text: list[TextPart] = field(default_factory=list)

    @property
    def speculative(self) -> bool:
        return self.running.speculative and not self.running.confirmed.is_set()

    def playing(self, now: float) -> bool:
        """Still producing, or its audio (sent at real time) has not finished playing."""
        if not self.finished:
            return True
        return self.first_audio_at is not None and now < self.first_audio_at + self.audio_ms / 1000

    def spoken_text(self, played_ms: int) -> str:
        tokens = int(np.ceil(played_ms / 1000 * SPOKEN_TOKENS_PER_S))
        return "".join(d.text for d in self.deltas if d.token_index < tokens)


class LiveSession:
    def __init__(
        self,
        runner: TurnRunner,
        tenant: str,
        session_id: str,
        params: SamplingParams,
        speech: SpeechOptions | None,
        settings: LiveSettings,
        emit: Emit,
        observer: LiveObserver | None = None,
    ) -> None:
        self.runner = runner
        self.tenant = tenant
        self.session_id = session_id
        self.params = params
        self.speech = speech
        self.settings = settings.validate()
        self.emit = emit
        self.observer = observer or NullLiveObserver()
        self.detector = TurnDetector(settings.detection)
        self.vad = VoiceActivity()
        self.frames: deque[MediaPart] = deque(maxlen=max(settings.max_frames, 1))
        self.text: list[TextPart] = []
        self.parts: list[MediaPart] = []  # media items added for the next turn
        self._manual: list[np.ndarray] = []  # manual turns: audio until commit()
        self._manual_ms = 0
        self.reply: _Reply | None = None  # the latest turn started
        self.replies: deque[_Reply] = deque(maxlen=8)  # recent ones, for playback reports
        self.closed = False  # the client is gone: no turn starts any more
        self.pending: Message | None = None  # committed, not yet answered (auto_respond off)
        self._resampler: object | None = None
        self._rate = 0
        self._started = time.monotonic()
        self._received_s = 0.0
        self._frames_taken = 0
        self._tasks: set[asyncio.Task] = set()

    def reconfigure(
        self, settings: LiveSettings, params: SamplingParams, speech: SpeechOptions | None
    ) -> None:
        """New settings for the turns to come (a Realtime `session.update`). Turn detection
        restarts unless the user is mid-utterance."""
        self.settings = settings.validate()
        self.params, self.speech = params, speech
        if not self.detector.speaking:
            self.detector = TurnDetector(settings.detection)
        frames = max(settings.max_frames, 1)
        if frames != self.frames.maxlen:
            self.frames = deque(self.frames, frames)

    # -- input ------------------------------------------------------------------------------

    async def push_audio(self, pcm: bytes, rate: int) -> None:
        """PCM16 little-endian mono at `rate` Hz, continuous."""
        if rate not in INPUT_RATES:
            await self._warn(
                ErrorCode.INVALID_INPUT,
                f"audio at {rate} Hz is not supported; send PCM16 at "
                f"{', '.join(str(r) for r in INPUT_RATES)} Hz",
            )
            return
        if len(pcm) % 2:
            await self._warn(ErrorCode.INVALID_INPUT, "PCM16 audio needs an even number of bytes")
            return
        seconds = len(pcm) / 2 / rate
        if not self.settings.vad:
            await self._buffer(pcm, rate)
            return
        if self._too_fast(seconds):
            await self._warn(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"audio arrives faster than {self.settings.max_speedup:g}x real time; "
                "this chunk was dropped (stream at the speed it is recorded)",
            )
            return
        samples = self._resample(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768, rate)
        started = time.perf_counter()
        with tracer().start_as_current_span("vad"):
            scored = self.vad.push(samples)
        self.observer.vad_time(time.perf_counter() - started, len(samples) / SAMPLE_RATE)
        for frame, probability in scored:
            for event in self.detector.push(frame, probability):
                await self._on_detector(event)

    async def _buffer(self, pcm: bytes, rate: int) -> None:
        """Manual turns (no VAD): audio waits in a buffer, bounded, until `commit()`."""
        samples = self._resample(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768, rate)
        held = sum(len(c) for c in self._manual)
        if (held + len(samples)) * 1000 > self.settings.detection.max_utterance_ms * SAMPLE_RATE:
            await self._warn(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the input audio buffer is full ({self.settings.detection.max_utterance_ms} ms);"
                " commit it before appending more",
            )
            return
        self._manual.append(samples)

    def _too_fast(self, seconds: float) -> bool:
        elapsed = time.monotonic() - self._started
        allowed = self.settings.max_speedup * elapsed + self.settings.burst_s
        if self._received_s + seconds > allowed:
            return True
        self._received_s += seconds
        return False

    def _resample(self, samples: np.ndarray, rate: int) -> np.ndarray:
        if rate == SAMPLE_RATE:
            return samples
        if rate != self._rate:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
            self._rate = rate
        return self._resampler.resample_chunk(samples)  # type: ignore[attr-defined]

    async def push_frame(self, data: bytes) -> None:
        """A camera frame: decoded and encoded now (overlapping speech), kept for the turn."""
        if self.settings.max_frames == 0:
            return
        # Every frame costs a vision encode: a client that floods frames must not take the
        # encoder from everyone else (a burst of max_frames is fine).
        elapsed = time.monotonic() - self._started
        if self._frames_taken >= self.settings.max_frame_fps * elapsed + self.settings.max_frames:
            await self._warn(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"camera frames arrive faster than {self.settings.max_frame_fps:g} per second; "
                "this one was dropped (send 1-2 frames per second)",
            )
            return
        self._frames_taken += 1
        part = MediaPart.from_bytes("frame", data)
        try:
            await self.runner.engine.prepare_media(part)
        except IomniError as exc:
            await self._warn(exc.code, f"camera frame dropped: {exc.detail}")
            return
        self.frames.append(part)

    def add_text(self, text: str) -> None:
        """Typed text joins the next turn."""
        self.text.append(TextPart(text))

    async def commit(self) -> bool:
        """End the user's turn now (what was said so far), as `end_of_turn` does. False when
        there was nothing to commit."""
        utterance = self.detector.force_commit() if self.settings.vad else self._take_buffer()
        if utterance is not None:
            await self._committed(utterance, how="client")
            return True
        if self.text or self.frames:
            if self.settings.auto_respond:
                await self._start_turn(self._message(None), speculative=False, end_ms=0)
            else:
                self.pending = self._message(None)
                self.frames.clear()
                self.text = []
            return True
        return False

    def _take_buffer(self) -> Utterance | None:
        if not self._manual:
            return None
        audio = np.concatenate(self._manual)
        self._manual = []
        start = self._manual_ms
        self._manual_ms += len(audio) * 1000 // SAMPLE_RATE
        return Utterance(audio, start, self._manual_ms, forced=True)

    def clear(self) -> None:
        """Drop input audio not yet committed. A reply started early on it is dropped too: the
        silence that would confirm it can no longer come (it would wait for its verdict until
        the turn timeout, holding the session)."""
        self._discard_early_reply()
        self._manual = []
        self.detector = TurnDetector(self.settings.detection)
        self.vad.reset()

    def add_part(self, part: TextPart | MediaPart) -> None:
        """A text or media item that joins the next turn (Realtime `conversation.item.create`)."""
        if isinstance(part, TextPart):
            self.text.append(part)
        else:
            self.parts.append(part)

    def cancel(self) -> None:
        """The client interrupts the reply (its own barge-in)."""
        self._interrupt("client")

    async def respond(self) -> str | None:
        """Answer what the user committed or added (when `auto_respond` is off); returns the
        reply's turn id, None when there is nothing to answer."""
        message, self.pending = self.pending, None
        if message is None and (self.text or self.frames or self.parts):
            message = self._message(None)
        if message is None:
            return None
        return await self._start_turn(message, speculative=False, end_ms=0, announce=False)

    async def playback(self, turn_id: str, played_ms: int, truncate: bool = False) -> bool:
        """The client played `played_ms` of a reply: after an interruption (or always, with
        `truncate`), the stored reply is cut to what was heard. False for an unknown reply."""
        reply = next(
            (r for r in reversed(self.replies) if r.turn_id == turn_id or not turn_id), None
        )
        if reply is None:
            return False
        if reply.interrupted or truncate:
            self._spawn(self._truncate(reply, played_ms))
        return True

    async def finish(self, timeout_s: float | None = None) -> None:
        """The client stopped sending (its request stream ended) but still listens: what is in
        progress (the reply, a playback cut) runs to its end, its reply done and committed as
        a manual turn already queued is, within `timeout_s` (by default the runner's turn
        timeout); then the session closes. A reply started early is dropped: no silence
        confirmed the user's turn over."""
        reply = self.reply
        if reply is not None and reply.speculative:
            reply.running.discard()
        limit = self.runner.limits.turn_timeout_s if timeout_s is None else timeout_s
        try:
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=limit)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop now (the client is gone): every reply not finished is cancelled, and a turn
        still waiting for the one before it never starts."""
        self.closed = True
        for reply in self.replies:  # the latest ones, `self.reply` among them
            if reply.finished:
                continue
            if reply.speculative:
                reply.running.discard()
            reply.running.request_cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    # -- turn-taking ------------------------------------------------------------------------

    async def _on_detector(self, event: SpeechStarted | SpeechStopped | Utterance) -> None:
        if isinstance(event, SpeechStarted):
            await self._speech_started(event)
        elif isinstance(event, SpeechStopped):
            await self.emit("", event)
            if self.settings.early_start and self.settings.auto_respond:
                with tracer().start_as_current_span("early_start"):
                    utterance = self.detector.utterance_so_far()
                    await self._start_turn(
                        self._message(utterance),
                        speculative=True,
                        end_ms=event.audio_end_ms,
                        utterance=utterance,
                    )
        else:
            await self._committed(event)

    async def _speech_started(self, event: SpeechStarted) -> None:
        # The user went on: a turn started early never happened; any other reply is cut.
        if not self._discard_early_reply() and self.settings.interrupt_response:
            self._interrupt("voice")
        await self.emit("", event)

    def _discard_early_reply(self) -> bool:
        """Drop the latest reply if it was started early and not dropped yet (counted once);
        False if there is none such."""
        reply = self.reply
        if reply is None or not reply.speculative or reply.running.discarded:
            return False
        reply.running.discard()
        self.observer.speculative("discarded")
        return True

    def _interrupt(self, by: Literal["voice", "client"]) -> None:
        reply = self.reply
        if reply is None or reply.interrupted or reply.speculative:
            return
        if not reply.playing(time.monotonic()):
            return
        reply.interrupted = True
        reply.running.request_cancel()
        self.observer.barge_in(by)
        self._spawn(self.emit(reply.turn_id, Interrupted(by)))

    async def _committed(self, utterance: Utterance, how: str = "") -> None:
        with tracer().start_as_current_span("commit") as span:
            span.set_attribute("iomni.audio_end_ms", utterance.audio_end_ms)
            reply = self.reply
            early = (
                reply is not None
                and reply.speculative
                and not reply.running.discarded
                and reply.utterance_end_ms == utterance.audio_end_ms
            )
            self.observer.committed(how or ("forced" if utterance.forced else "vad"))
            if early:
                assert reply is not None
                frames = len(reply.frames)
                self._consume(reply)
                reply.running.confirm()
                self.observer.speculative("confirmed")
                await self.emit(
                    reply.turn_id,
                    TurnCommitted(utterance.audio_start_ms, utterance.audio_end_ms, frames),
                )
                return
            message = self._message(utterance)
            if not self.settings.auto_respond:
                self.pending = message
                self.frames.clear()
                self.text = []
                frames = sum(1 for p in message.media if p.type == "frame")
                await self.emit(
                    "", TurnCommitted(utterance.audio_start_ms, utterance.audio_end_ms, frames)
                )
                return
            await self._start_turn(
                message, speculative=False, end_ms=utterance.audio_end_ms, utterance=utterance
            )

    def _message(self, utterance: Utterance | None) -> Message:
        parts: list[TextPart | MediaPart] = [*self.frames, *self.parts]
        self.parts = []
        if utterance is not None and utterance.audio.size:
            parts.append(MediaPart.from_bytes("audio", _wav(utterance.audio)))
        parts += self.text
        return Message("user", tuple(parts))

    def _consume(self, reply: _Reply) -> None:
        """The reply's turn used these frames and this text: later turns do not get them."""
        self.frames = deque((f for f in self.frames if f not in reply.frames), self.frames.maxlen)
        self.text = [t for t in self.text if t not in reply.text]

    async def _start_turn(
        self,
        message: Message,
        speculative: bool,
        end_ms: int,
        utterance: Utterance | None = None,
        announce: bool = True,
    ) -> str | None:
        """Start answering `message`. `announce`: say `TurnCommitted` (the user's turn ends
        here); a reply to what was committed earlier says `ReplyStarted` instead."""
        if not message.parts or self.closed:
            return None
        previous = self.reply
        turn_id = uuid.uuid4().hex
        now = time.monotonic()
        # The end of speech was heard (position - end) ms of audio ago (audio comes at real time).
        behind_s = max(0, self.detector.position_ms - end_ms) / 1000 if end_ms else 0.0
        end_of_speech_at = now - behind_s
        reply = _Reply(turn_id, RunningTurn(speculative=speculative), end_of_speech_at)
        reply.utterance_end_ms = utterance.audio_end_ms if utterance is not None else 0
        reply.frames = [p for p in message.media if p.type == "frame"]
        reply.text = [p for p in message.parts if isinstance(p, TextPart)]
        self.reply = reply
        self.replies.append(reply)
        if speculative:
            self.observer.speculative("started")
        else:
            self._consume(reply)
            start_ms = utterance.audio_start_ms if utterance else 0
            event = TurnCommitted(start_ms, end_ms, len(reply.frames)) if announce else None
            await self.emit(turn_id, event or ReplyStarted())
        turn = TurnInput(self.tenant, self.session_id, turn_id, message, self.params, self.speech)
        reply.task = self._spawn(self._run(turn, reply, previous))
        return turn_id

    async def _run(self, turn: TurnInput, reply: _Reply, previous: _Reply | None) -> None:
        async def emit(output: TurnOutput) -> None:
            if isinstance(output, TextDelta):
                reply.deltas.append(output)
            elif isinstance(output, AudioChunk):
                now = time.monotonic()
                if reply.first_audio_at is None:
                    reply.first_audio_at = now
                    self.observer.speech_to_first_audio(now - reply.end_of_speech_at)
                reply.audio_ms += output.duration_ms
            elif isinstance(output, TurnFinished):
                reply.finished = True
            await self.emit(turn.turn_id, output)

        try:
            if previous is not None and previous.task is not None and previous is not reply:
                # One turn of a session at a time: the one before (interrupted or discarded)
                # ends first. Its outcome is its own; a cancel of this one (close) gets through.
                await asyncio.wait([previous.task])
            if self.closed:
                return
            await self.runner.run(turn, emit, reply.running)
        except IomniError as exc:
            await self._warn(exc.code, f"turn {turn.turn_id} failed: {exc.detail}")
        except Exception as exc:  # a bug: the client hears of it too, the log has the traceback
            log.exception("live turn %s failed", turn.turn_id)
            await self._warn(
                ErrorCode.INTERNAL, f"turn {turn.turn_id} failed: {type(exc).__name__}"
            )
        finally:
            reply.finished = True

    async def _truncate(self, reply: _Reply, played_ms: int) -> None:
        if reply.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(reply.task)  # the cut applies to the committed reply
        text = reply.spoken_text(played_ms)
        try:
            cut = await self.runner.store.truncate_reply(
                self.tenant, self.session_id, reply.turn_id, text
            )
        except IomniError as exc:
            await self._warn(exc.code, f"could not cut reply {reply.turn_id}: {exc.detail}")
            return
        if cut:
            await self.emit(reply.turn_id, ReplyTruncated(played_ms, text))

    # -- plumbing ---------------------------------------------------------------------------

    async def _warn(self, code: ErrorCode, message: str) -> None:
        self.observer.warning(code.outcome)
        await self.emit("", LiveWarning(code, message))

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def live_settings(detection: TurnDetection, **changes: object) -> LiveSettings:
    return replace(LiveSettings(detection=detection), **changes)  # type: ignore[arg-type]
