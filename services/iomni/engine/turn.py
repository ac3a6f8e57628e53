"""`TurnEngine`: run one user turn against the model parts and stream what it produces."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from iomni import background
from iomni.engine.cache import EmbeddingCache, MediaStore, MemoryEmbeddingCache, embedding_key
from iomni.engine.events import AudioChunk, TextDelta, TurnDone, TurnEvent, Usage
from iomni.engine.parts import GenerationRequest, ModelParts, SpeechOptions, SpeechStream
from iomni.errors import InvalidInput, IomniError, NotFound
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.processor import DEFAULT_VIDEO_FRAMES, Processor, Segment
from iomni.model.sampling import SamplingParams
from iomni.model.speech.stream import SAMPLE_RATE, SAMPLES_PER_TOKEN, to_pcm16
from iomni.model.tokenizer import IncrementalDecoder
from iomni.telemetry.tracing import context_headers, tracer

log = logging.getLogger(__name__)
T = TypeVar("T")
# Text tokens per speech-decoder step (InteractiveOmni's 5:25 interleave).
SPEECH_TEXT_GROUP = 5
# A prompt with at most this much text is fitted on the event loop (at most ~2 ms on one core
# of the CI host): on the media pool, at its lower priority, it would wait behind image
# decoding and for a share of saturated cores, on the way to the first token.
INLINE_PROMPT_CHARS = 8000


@dataclass(frozen=True)
class TurnLimits:
    max_media_per_turn: int = 16
    max_text_chars: int = 32_000
    max_context_tokens: int = 32_768


@dataclass
class TurnRequest:
    user: Message  # media parts carry their bytes
    history: Sequence[Message] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    speech: SpeechOptions | None = None  # None: text only
    session_id: str = ""
    turn_id: str = ""


@dataclass
class _TurnStats:
    started: float
    timings: dict[str, float]
    usage: dict[str, int]
    completion: int = 0
    audio_chunks: int = 0
    audio_samples: int = 0
    decode_started: float | None = None

    def first_step(self, step_timings: dict[str, float]) -> None:
        if self.decode_started is None:
            self.decode_started = time.perf_counter()
            self.timings.update(step_timings)
            self.timings["first_token"] = (self.decode_started - self.started) * 1000

    def end_decode(self) -> None:
        if self.decode_started is not None:
            self.timings["decode"] = (time.perf_counter() - self.decode_started) * 1000

    def add(self, stage: str, since: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - since) * 1000

    def mark_first_audio(self) -> None:
        self.timings.setdefault("first_audio", (time.perf_counter() - self.started) * 1000)


@dataclass(eq=False)
class _SpeechCall:
    """One request to the speech decoder: its chunks as they arrive, and how many of them
    the turn has handed out."""

    arrived: list[np.ndarray] = field(default_factory=list)
    handed_out: int = 0
    progress: asyncio.Future[None] | None = None  # done when a chunk arrives or the call ends
    task: asyncio.Task[list[np.ndarray]] | None = None

    def add(self, chunk: np.ndarray) -> None:
        self.arrived.append(chunk)
        self.wake()

    def wake(self, *_: object) -> None:
        if self.progress is not None and not self.progress.done():
            self.progress.set_result(None)


class _Speaking:
    """A reply's text at the speech decoder: each group is sent as soon as it is complete,
    without waiting for the audio of the groups before it (so the decoder has the next text
    queued when it finishes a chunk); the audio comes back in order, as events, each chunk as
    soon as the decoder has rendered it (a call that renders several, as the reply's tail
    does, hands out the first while the next renders)."""

    def __init__(self, speech: SpeechStream, stats: _TurnStats) -> None:
        self.speech = speech
        self.stats = stats
        self.context = otel_context.get_current()
        self.in_flight: deque[_SpeechCall] = deque()

    @property
    def head(self) -> asyncio.Future[None] | None:
        """Done when the oldest call has audio to hand out (a chunk arrived, or it ended);
        None when no call is in flight."""
        if not self.in_flight:
            return None
        call = self.in_flight[0]
        if call.progress is None or call.progress.done():
            call.progress = asyncio.get_running_loop().create_future()
        if (call.task is not None and call.task.done()) or len(call.arrived) > call.handed_out:
            call.wake()
        return call.progress

    def send(self, pending: list[tuple[int, torch.Tensor]], final: bool = False) -> None:
        ids = [token for token, _ in pending]
        hidden = torch.stack([h for _, h in pending]) if pending else torch.zeros(0)
        pending.clear()
        call = _SpeechCall()
        # Tasks start in the order they are created: the requests go out in this order.
        call.task = asyncio.ensure_future(self._call(ids, hidden, final, call))
        call.task.add_done_callback(call.wake)
        self.in_flight.append(call)

    async def _call(
        self, ids: list[int], hidden: torch.Tensor, final: bool, call: _SpeechCall
    ) -> list[np.ndarray]:
        span = tracer().start_span("speech_decode", context=self.context)
        with trace.use_span(span, end_on_exit=True):
            started = time.perf_counter()
            arrays = await self.speech.push_text(ids, hidden, call.add) if ids else []
            if final:
                arrays += await self.speech.finish(call.add)
            self.stats.add("speech", started)
            return arrays

    def ready(self) -> list[AudioChunk]:
        """The audio rendered so far, in order: whole calls answered, and the chunks of the
        oldest call still rendering (raises a call's error)."""
        chunks: list[AudioChunk] = []
        while self.in_flight:
            call = self.in_flight[0]
            assert call.task is not None
            if call.task.done():
                samples = call.task.result()[call.handed_out :]
                self.in_flight.popleft()
            else:
                samples = call.arrived[call.handed_out :]
                call.handed_out = len(call.arrived)
            chunks += [self._event(s) for s in samples]
            if not call.task.done():
                break
        return chunks

    def _event(self, samples: np.ndarray) -> AudioChunk:
        stats = self.stats
        chunk = AudioChunk(to_pcm16(samples), stats.audio_chunks, text_tokens=stats.completion)
        stats.audio_chunks += 1
        stats.audio_samples += samples.size
        stats.mark_first_audio()
        return chunk

    def abandon(self) -> None:
        """A cancelled or failed turn: nobody waits for the rest (the stream's close discards
        it at the decoder)."""
        for call in self.in_flight:
            assert call.task is not None
            call.task.cancel()
            call.task.add_done_callback(_retrieve)
        self.in_flight.clear()


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


@dataclass
class _MediaState:
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # MediaPart.ident -> rows
    hits: int = 0
    encoded: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)


class TurnEngine:
    def __init__(
        self,
        parts: ModelParts,
        processor: Processor,
        embeddings: EmbeddingCache | None = None,
        media: MediaStore | None = None,
        limits: TurnLimits | None = None,
    ) -> None:
        self.parts = parts
        self.processor = processor
        self.embeddings = embeddings or MemoryEmbeddingCache()
        self.media = media
        self.limits = limits or TurnLimits()

    def start(self, request: TurnRequest) -> Turn:
        return Turn(self, request)

    async def prepare_media(self, part: MediaPart) -> None:
        """Decode and encode a media part now (a live camera frame as it arrives), so the turn
        that later carries it finds its embeddings cached; its bytes go to the media store."""
        if part.data is None:
            raise InvalidInput(f"{part.type} {part.sha256[:12]} has no bytes to encode")
        key = self.media_key(part)
        if await self.embeddings.get(key) is None:
            item = await background.run(prepare, self.processor, part, part.data)
            await self.embeddings.put(key, await self.encode(part, item, {}))
        if self.media is not None:
            await self.media.put(part.sha256, part.data)

    def media_key(self, part: MediaPart) -> str:
        variant = str(part.num_frames or DEFAULT_VIDEO_FRAMES) if part.type == "video" else ""
        return embedding_key(self.parts.model_id, part.type, part.sha256, variant)

    async def encode(self, part: MediaPart, item, timings: dict[str, float]) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """Embedding rows of a prepared media item; adds its time to `timings`."""
        started = time.perf_counter()
        stage = "audio_encode" if part.type == "audio" else "vision_encode"
        with tracer().start_as_current_span(stage):
            if part.type == "audio":
                windows = await self.parts.encode_audio(item.windows)
                rows = torch.cat(windows)[: item.num_tokens]
            else:
                tiles = await self.parts.encode_images(item.pixel_values)
                rows = tiles.reshape(-1, tiles.shape[-1])
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - started) * 1000
        return rows


class Turn:
    """One running turn. Iterate `events()` once; `cancel()` may be called from any thread."""

    def __init__(self, engine: TurnEngine, request: TurnRequest) -> None:
        self.engine = engine
        self.request = request
        self._cancelled = threading.Event()
        self._wake: asyncio.Event | None = None  # set on cancel, on the turn's event loop
        self._loop: asyncio.AbstractEventLoop | None = None

    def cancel(self) -> None:
        self._cancelled.set()
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing waits
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _until_any(self, *futures: asyncio.Future | None) -> None:
        """Until one of `futures` is done or the turn is cancelled (a cancel does not wait for
        a decode step or a speech chunk in flight)."""
        if self._wake is None:
            self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
            if self.cancelled:
                self._wake.set()
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                {f for f in futures if f is not None} | {waiter},
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def _unless_cancelled(self, work: Callable[[], Awaitable[T]]) -> T | None:
        """`work()`'s result, or None as soon as the turn is cancelled: a barge-in does not wait
        for seconds of media decoding and encoding. Cut short, the work goes on in the
        background: each cache entry it writes is whole (a later turn with the same media finds
        it there), and its errors are retrieved, as nobody waits for them any more."""
        if self.cancelled:
            return None
        task = asyncio.ensure_future(work())
        task.add_done_callback(_retrieve)
        await self._until_any(task)
        return task.result() if task.done() else None

    async def events(self) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        request = self.request
        params = request.params.validate()
        _validate_user(request.user, self.engine.limits)
        prompt = await self._unless_cancelled(self._prompt)
        if prompt is None:
            stats = _TurnStats(started, {}, {"prompt_tokens": 0})
            yield self._done("cancelled", "", stats, media_stored=False)
            return
        media, messages, ids, dropped = prompt
        special = self.engine.processor.tokenizer.special
        stats = _TurnStats(
            started,
            dict(media.timings_ms),
            dict(
                media_cache_hits=media.hits,
                media_encoded=media.encoded,
                history_turns_dropped=dropped,
                prompt_tokens=len(ids),
                image_tokens=ids.count(special.img_context),
                audio_tokens=ids.count(special.audio_context),
            ),
        )
        if self.cancelled:
            yield self._done("cancelled", "", stats)
            return
        speech = await self._open_speech(stats)
        speaking = _Speaking(speech, stats) if speech is not None else None
        try:
            generation = GenerationRequest(
                input_ids=ids,
                media=_placeholder_rows(messages, media.rows, special),
                params=params,
                stop_ids=special.stop_ids,
                session_id=request.session_id,
                return_hidden=speech is not None,
            )
            decoder = IncrementalDecoder(self.engine.processor.tokenizer)
            pending: list[tuple[int, torch.Tensor]] = []  # text not yet given to the speech decoder
            reason = "length"
            llm_span = tracer().start_span("llm", context=otel_context.get_current())
            generation.trace_headers = context_headers(trace.set_span_in_context(llm_span))
            stream = self.engine.parts.generate(generation)
            next_step: asyncio.Future | None = None
            try:
                while True:
                    # Text and audio flow independently: the next token is awaited together
                    # with the oldest speech request, and whichever comes first goes out.
                    if next_step is None:
                        next_step = asyncio.ensure_future(anext(stream, None))
                    await self._until_any(next_step, speaking.head if speaking else None)
                    for chunk in speaking.ready() if speaking else []:
                        yield chunk
                    if self.cancelled:
                        reason = "cancelled"
                        break
                    if not next_step.done():
                        continue
                    step, next_step = next_step.result(), None
                    if step is None:
                        break
                    stats.first_step(step.timings_ms)
                    if step.reused_tokens:
                        stats.usage["prompt_tokens_reused"] = step.reused_tokens
                    if step.token_id in special.stop_ids:
                        reason = "eos"
                        break
                    stats.completion += 1
                    delta = decoder.push(step.token_id)
                    if delta:
                        yield TextDelta(delta, stats.completion - 1)
                    if speaking is not None:
                        pending.append((step.token_id, step.hidden))
                        if len(pending) >= SPEECH_TEXT_GROUP:
                            speaking.send(pending)
            finally:
                if next_step is not None and not next_step.done():
                    next_step.cancel()  # a cancel does not wait for a decode step in flight
                    with contextlib.suppress(BaseException):
                        await next_step
                await stream.aclose()
                llm_span.end()
            tail = decoder.flush()
            if tail:
                yield TextDelta(tail, stats.completion - 1)
            stats.end_decode()
            if speaking is not None and reason != "cancelled":
                speaking.send(pending, final=True)
                while speaking.head is not None:
                    await self._until_any(speaking.head)
                    if self.cancelled:
                        reason = "cancelled"  # no audio follows a cancel
                        break
                    for chunk in speaking.ready():
                        yield chunk
            yield self._done(reason, decoder.text, stats)
        finally:
            if speaking is not None:
                speaking.abandon()
            if speech is not None:
                await speech.close()  # no-op when finished; discards an unfinished reply

    async def _open_speech(self, stats: _TurnStats) -> SpeechStream | None:
        if self.request.speech is None:
            return None
        opened = time.perf_counter()
        options = self.request.speech
        if not options.sequence_id and self.request.turn_id:
            options = replace(options, sequence_id=self.request.turn_id)
        speech = await self.engine.parts.open_speech(options)
        stats.add("speech", opened)
        return speech

    def _done(
        self, reason: str, text: str, stats: _TurnStats, media_stored: bool = True
    ) -> TurnDone:
        """`media_stored` False: a cancel came before the new media were decoded and stored;
        the record leaves them out, as a later turn could not load them (or they do not
        decode) and would fail on its history."""
        stats.timings["total"] = (time.perf_counter() - stats.started) * 1000
        user = Message(
            "user",
            tuple(
                p.without_data() if isinstance(p, MediaPart) else p
                for p in self.request.user.parts
                if media_stored or not (isinstance(p, MediaPart) and p.data is not None)
            ),
        )
        assistant = Message("assistant", (TextPart(text),))
        usage = Usage(
            completion_tokens=stats.completion,
            speech_tokens=stats.audio_samples // SAMPLES_PER_TOKEN,
            audio_ms=1000.0 * stats.audio_samples / SAMPLE_RATE,
            **stats.usage,
        )
        return TurnDone(
            stop_reason=reason,
            usage=usage,  # type: ignore[arg-type]
            timings_ms=stats.timings,
            record=(user, assistant),
        )

    async def _prompt(self) -> tuple[_MediaState, list[Message], list[int], int]:
        """The turn's media resolved, then its prompt: ids, and the exchanges dropped."""
        request = self.request
        media = await self._resolve_media([*request.history, request.user])
        if _text_chars([*request.history, request.user]) <= INLINE_PROMPT_CHARS:
            return media, *self._fit_prompt(request, media)
        # Tokenising a long history is CPU work: off the event loop, as decoding media is.
        messages, ids, dropped = await background.run(self._fit_prompt, request, media)
        return media, messages, ids, dropped

    # -- media ------------------------------------------------------------------------------

    async def _resolve_media(self, messages: Sequence[Message]) -> _MediaState:
        state = _MediaState()
        new_parts = [p for p in self.request.user.media if p.data is not None]
        parts = _unique_media(messages)
        cached_rows = {
            p.ident: await self.engine.embeddings.get(self.engine.media_key(p)) for p in parts
        }
        if self.engine.media is not None:  # history media served from the cache stay stored
            kept = [p.sha256 for p in parts if p.data is None and cached_rows[p.ident] is not None]
            await self.engine.media.touch(kept)
        # Decode the new turn's media first: a bad file fails fast, before any encoding. Decoding
        # is CPU work: off the event loop, so other sessions' streams keep flowing meanwhile,
        # and at low priority, so it does not take the cores from audio being rendered. Bytes
        # whose embeddings are cached decoded fine before (same sha256) and are not decoded
        # again: a client that sends its history's images with every turn pays for them once.
        prepared = {
            p.ident: await background.run(prepare, self.engine.processor, p, p.data)  # type: ignore[arg-type]
            for p in new_parts
            if cached_rows.get(p.ident) is None
        }
        for part in parts:
            cached = cached_rows[part.ident]
            if cached is not None:
                state.rows[part.ident] = cached
                state.hits += 1
                continue
            item = prepared.get(part.ident) or await background.run(
                prepare, self.engine.processor, part, await self._load_bytes(part)
            )
            rows = await self.engine.encode(part, item, state.timings_ms)
            await self.engine.embeddings.put(self.engine.media_key(part), rows)
            state.rows[part.ident] = rows
            state.encoded += 1
        if self.engine.media is not None:
            for part in new_parts:
                await self.engine.media.put(part.sha256, part.data)  # type: ignore[arg-type]
        return state

    async def _load_bytes(self, part: MediaPart) -> bytes:
        data = await self.engine.media.get(part.sha256) if self.engine.media is not None else None
        if data is None:
            raise NotFound(
                f"{part.type} {part.sha256[:12]} from an earlier turn is no longer available; "
                "start a new session or send it again"
            )
        return data

    # -- prompt -----------------------------------------------------------------------------

    def _fit_prompt(
        self, request: TurnRequest, media: _MediaState
    ) -> tuple[list[Message], list[int], int]:
        """Prompt ids; the oldest exchanges are dropped when the context would overflow.

        CPU work (a long prompt's runs off the event loop: `_prompt`). Each distinct segment (a
        message's text, the template between two messages) is tokenised once, however many
        drops are tried: `Processor.encode` encodes segment by segment, so lengths and ids are
        exactly those of encoding every candidate prompt whole."""
        processor = self.engine.processor
        counts = {ident: rows.shape[0] for ident, rows in media.rows.items()}
        budget = self.engine.limits.max_context_tokens - request.params.max_new_tokens
        encoded: dict[tuple[type, Segment], list[int]] = {}

        def ids_of(segment: Segment) -> list[int]:
            key = (type(segment), segment)  # PlainText and template text tokenise differently
            if key not in encoded:
                encoded[key] = processor.encode([segment])
            return encoded[key]

        history = list(request.history)
        dropped = 0
        while True:
            messages = [*history, request.user]
            segments = processor.prompt_segments(messages, counts)
            length = sum(len(ids_of(s)) for s in segments)
            if length <= budget:
                return messages, [i for s in segments for i in ids_of(s)], dropped
            if not history:
                raise InvalidInput(
                    f"the turn needs {length} prompt tokens but only {budget} fit the context "
                    f"({self.engine.limits.max_context_tokens} minus max_new_tokens); send less "
                    "media or lower max_new_tokens"
                )
            # Drop a whole exchange (user + assistant) so roles keep alternating.
            history = history[2:] if len(history) >= 2 else []
            dropped += 1


def prepare(processor: Processor, part: MediaPart, data: bytes):  # type: ignore[no-untyped-def]
    """Decode and preprocess media bytes (CPU work: callers run it off the event loop)."""
    if part.type == "image":
        return processor.prepare_image(data)
    if part.type == "frame":
        return processor.prepare_frame(data)
    if part.type == "video":
        return processor.prepare_video(data, part.num_frames or DEFAULT_VIDEO_FRAMES)
    return processor.prepare_audio(data)


def _validate_user(user: Message, limits: TurnLimits) -> None:
    if user.role != "user":
        raise InvalidInput("the new turn must be a user message")
    if not user.parts:
        raise InvalidInput("the turn is empty: send text, an image, a video or audio")
    media = user.media
    if len(media) > limits.max_media_per_turn:
        raise InvalidInput(
            f"a turn may carry at most {limits.max_media_per_turn} media items, got {len(media)}"
        )
    text = sum(len(p.text) for p in user.parts if isinstance(p, TextPart))
    if text > limits.max_text_chars:
        raise InvalidInput(f"text is {text} characters; the limit is {limits.max_text_chars}")
    if not media and not user.text.strip():
        raise InvalidInput("the turn has no content: the text is empty and there is no media")


def _text_chars(messages: Sequence[Message]) -> int:
    return sum(len(part.text) for m in messages for part in m.parts if isinstance(part, TextPart))


def _unique_media(messages: Sequence[Message]) -> list[MediaPart]:
    seen: set[str] = set()
    out: list[MediaPart] = []
    for message in messages:
        for part in message.media:
            if part.ident not in seen:
                seen.add(part.ident)
                out.append(part)
    return out


def _placeholder_rows(
    messages: Sequence[Message], rows: dict[str, torch.Tensor], special
) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    visual: list[torch.Tensor] = []
    audio: list[torch.Tensor] = []
    for message in messages:
        if message.role != "user":
            continue
        for part in message.media:
            (audio if part.type == "audio" else visual).append(rows[part.ident])
    out: dict[int, torch.Tensor] = {}
    if visual:
        out[special.img_context] = torch.cat(visual)
    if audio:
        out[special.audio_context] = torch.cat(audio)
    return out


__all__ = ["IomniError", "Turn", "TurnEngine", "TurnLimits", "TurnRequest"]
