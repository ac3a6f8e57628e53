"""`TurnEngine`: run one user turn against the model parts and stream what it produces."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from iomni.engine.cache import EmbeddingCache, MediaStore, MemoryEmbeddingCache, embedding_key
from iomni.engine.events import TextDelta, TurnDone, TurnEvent, Usage
from iomni.engine.parts import GenerationRequest, ModelParts
from iomni.errors import InvalidInput, IomniError, NotFound
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.processor import DEFAULT_VIDEO_FRAMES, Processor
from iomni.model.sampling import SamplingParams
from iomni.model.tokenizer import IncrementalDecoder

log = logging.getLogger(__name__)


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
    session_id: str = ""
    turn_id: str = ""


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


class Turn:
    """One running turn. Iterate `events()` once; `cancel()` may be called from any thread."""

    def __init__(self, engine: TurnEngine, request: TurnRequest) -> None:
        self.engine = engine
        self.request = request
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        request = self.request
        params = request.params.validate()
        _validate_user(request.user, self.engine.limits)
        media = await self._resolve_media([*request.history, request.user])
        messages, ids, dropped = self._fit_prompt(request, media)
        timings = dict(media.timings_ms)
        usage = dict(
            media_cache_hits=media.hits,
            media_encoded=media.encoded,
            history_turns_dropped=dropped,
            prompt_tokens=len(ids),
        )
        if self.cancelled:
            yield self._done("cancelled", "", 0, usage, timings, started)
            return
        decoder = IncrementalDecoder(self.engine.processor.tokenizer)
        special = self.engine.processor.tokenizer.special
        generation = GenerationRequest(
            input_ids=ids,
            media=_placeholder_rows(messages, media.rows, special),
            params=params,
            stop_ids=special.stop_ids,
            session_id=request.session_id,
        )
        usage["image_tokens"] = ids.count(special.img_context)
        usage["audio_tokens"] = ids.count(special.audio_context)
        count, reason, decode_started = 0, "length", None
        stream = self.engine.parts.generate(generation)
        try:
            async for step in stream:
                if decode_started is None:
                    decode_started = time.perf_counter()
                    timings.update(step.timings_ms)
                    timings["first_token"] = (decode_started - started) * 1000
                if step.token_id in special.stop_ids:
                    reason = "eos"
                    break
                count += 1
                delta = decoder.push(step.token_id)
                if delta:
                    yield TextDelta(delta, count - 1)
                if self.cancelled:
                    reason = "cancelled"
                    break
        finally:
            await stream.aclose()
        tail = decoder.flush()
        if tail:
            yield TextDelta(tail, count - 1)
        if decode_started is not None:
            timings["decode"] = (time.perf_counter() - decode_started) * 1000
        yield self._done(reason, decoder.text, count, usage, timings, started)

    def _done(
        self, reason: str, text: str, completion: int, usage: dict, timings: dict, started: float
    ) -> TurnDone:
        timings["total"] = (time.perf_counter() - started) * 1000
        user = Message(
            "user",
            tuple(
                p.without_data() if isinstance(p, MediaPart) else p for p in self.request.user.parts
            ),
        )
        assistant = Message("assistant", (TextPart(text),))
        return TurnDone(
            stop_reason=reason,
            usage=Usage(completion_tokens=completion, **usage),  # type: ignore[arg-type]
            timings_ms=timings,
            record=(user, assistant),
        )

    # -- media ------------------------------------------------------------------------------

    async def _resolve_media(self, messages: Sequence[Message]) -> _MediaState:
        state = _MediaState()
        new_parts = [p for p in self.request.user.media if p.data is not None]
        # Decode the new turn's media first: a bad file fails fast, before any encoding.
        prepared = {p.ident: self._prepare(p, p.data) for p in new_parts}  # type: ignore[arg-type]
        for part in _unique_media(messages):
            key = self._key(part)
            cached = self.engine.embeddings.get(key)
            if cached is not None:
                state.rows[part.ident] = cached
                state.hits += 1
                continue
            item = prepared.get(part.ident) or self._prepare(part, self._load_bytes(part))
            rows = await self._encode(part, item, state.timings_ms)
            self.engine.embeddings.put(key, rows)
            state.rows[part.ident] = rows
            state.encoded += 1
        if self.engine.media is not None:
            for part in new_parts:
                self.engine.media.put(part.sha256, part.data)  # type: ignore[arg-type]
        return state

    def _key(self, part: MediaPart) -> str:
        variant = str(part.num_frames or DEFAULT_VIDEO_FRAMES) if part.type == "video" else ""
        return embedding_key(self.engine.parts.model_id, part.type, part.sha256, variant)

    def _load_bytes(self, part: MediaPart) -> bytes:
        data = self.engine.media.get(part.sha256) if self.engine.media is not None else None
        if data is None:
            raise NotFound(
                f"{part.type} {part.sha256[:12]} from an earlier turn is no longer available; "
                "start a new session or send it again"
            )
        return data

    def _prepare(self, part: MediaPart, data: bytes):  # type: ignore[no-untyped-def]
        processor = self.engine.processor
        if part.type == "image":
            return processor.prepare_image(data)
        if part.type == "video":
            return processor.prepare_video(data, part.num_frames or DEFAULT_VIDEO_FRAMES)
        return processor.prepare_audio(data)

    async def _encode(self, part: MediaPart, item, timings: dict[str, float]) -> torch.Tensor:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        if part.type == "audio":
            windows = await self.engine.parts.encode_audio(item.windows)
            rows = torch.cat(windows)[: item.num_tokens]
            stage = "audio_encode"
        else:
            tiles = await self.engine.parts.encode_images(item.pixel_values)
            rows = tiles.reshape(-1, tiles.shape[-1])
            stage = "vision_encode"
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - started) * 1000
        return rows

    # -- prompt -----------------------------------------------------------------------------

    def _fit_prompt(
        self, request: TurnRequest, media: _MediaState
    ) -> tuple[list[Message], list[int], int]:
        """Prompt ids; the oldest turns are dropped when the context would overflow."""
        processor = self.engine.processor
        counts = {sha: rows.shape[0] for sha, rows in media.rows.items()}
        budget = self.engine.limits.max_context_tokens - request.params.max_new_tokens
        history = list(request.history)
        dropped = 0
        while True:
            messages = [*history, request.user]
            ids = processor.encode(processor.prompt_segments(messages, counts))
            if len(ids) <= budget:
                return messages, ids, dropped
            if not history:
                raise InvalidInput(
                    f"the turn needs {len(ids)} prompt tokens but only {budget} fit the context "
                    f"({self.engine.limits.max_context_tokens} minus max_new_tokens); send less "
                    "media or lower max_new_tokens"
                )
            # Drop a whole exchange (user + assistant) so roles keep alternating.
            history = history[2:] if len(history) >= 2 else []
            dropped += 1


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
