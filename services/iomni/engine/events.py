"""What a turn emits, in order: text deltas (later audio chunks), then exactly one `TurnDone`."""

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
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    audio_tokens: int = 0
    media_cache_hits: int = 0
    media_encoded: int = 0
    history_turns_dropped: int = 0


@dataclass(frozen=True)
class TurnDone:
    stop_reason: StopReason
    usage: Usage
    # Stage -> milliseconds: vision_encode, audio_encode, prefill, decode, first_token, total.
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The turn as actually produced: the user message and what the model said.
    record: tuple[Message, Message] | None = None


TurnEvent = TextDelta | TurnDone
