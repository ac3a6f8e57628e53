"""The model-part interface: what the engine asks of the model, whatever carries it.

The engine talks only to `ModelParts`; the in-process transport (`iomni.engine.parts`) and the
Triton transport (`iomni.triton.client`) implement it. It lives below both so that neither
reaches up into the other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from iomni.model.sampling import SamplingParams


@dataclass
class GenerationRequest:
    input_ids: Sequence[int]
    media: Mapping[int, torch.Tensor]  # placeholder token id -> (n, H) rows, in prompt order
    params: SamplingParams
    stop_ids: Sequence[int]
    session_id: str = ""
    return_hidden: bool = True
    trace_headers: dict[str, str] = field(default_factory=dict)  # W3C context for the llm call


@dataclass(frozen=True)
class SpeechOptions:
    """Speak the reply. `speaker_wav` clones a voice; None uses the checkpoint's default."""

    speaker_wav: bytes | None = None
    seed: int = 0
    sequence_id: str = ""  # set by the engine to the turn id (the speech sequence's id)


ChunkCallback = Callable[[np.ndarray], None]


class SpeechStream(Protocol):
    """One reply's speech: text in, float32 24 kHz sample arrays out, in order.

    Each call returns the audio its text made ready. A call may render several chunks (the
    last text renders the reply's tail); `on_chunk`, if given, is called on the event loop with
    each chunk as soon as it is rendered, before the call returns them all."""

    async def push_text(
        self, token_ids: Sequence[int], hidden: torch.Tensor, on_chunk: ChunkCallback | None = None
    ) -> list[np.ndarray]: ...

    async def finish(self, on_chunk: ChunkCallback | None = None) -> list[np.ndarray]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class LLMStep:
    token_id: int
    hidden: torch.Tensor | None  # (H,) hidden state of the position that predicted the token
    timings_ms: dict[str, float] = field(default_factory=dict)  # "prefill" on the first step
    reused_tokens: int = 0  # first step: prompt tokens served from a KV cache


class ModelParts(Protocol):
    model_id: str  # identifies the weights; scopes cached embeddings

    async def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    async def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]: ...

    async def open_speech(self, options: SpeechOptions) -> SpeechStream: ...
