"""What a turn emits: text deltas and audio chunks as they are produced, then one `TurnDone`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from iomni.model.conversation import Message

StopReason = Literal["eos", "length", "cancelled"]


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_index: int  # index of the last generated token this delta covers


@dataclass(frozen=True)
class AudioChunk:
    """PCM16 little-endian mono audio. `sequence` counts chunks of the turn from 0."""

    pcm: bytes
    sequence: int
    sample_rate: int = 24000
    text_tokens: int = 0  # text tokens generated when this chunk was ready

    @property
    def num_samples(self) -> int:
        return len(self.pcm) // 2

    @property
    def duration_ms(self) -> float:
        return 1000.0 * self.num_samples / self.sample_rate


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    audio_tokens: int = 0
    media_cache_hits: int = 0
    media_encoded: int = 0
    history_turns_dropped: int = 0
    speech_tokens: int = 0
    audio_ms: float = 0.0
    prompt_tokens_reused: int = 0  # served from the llm's KV cache of this session


@dataclass(frozen=True)
class TurnDone:
    stop_reason: StopReason
    usage: Usage
    # Stage -> milliseconds: vision_encode, audio_encode, prefill, first_token, decode,
    # speech (time spent in the speech decoder), first_audio, total.
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The turn as actually produced: the user message and what the model said.
    record: tuple[Message, Message] | None = None


TurnEvent = TextDelta | AudioChunk | TurnDone
