"""The engine's only door to the model: encode media, stream the LLM.

`InProcessParts` calls the PyTorch modules directly; a Triton transport implements the same
protocol over the network. Nothing above this interface knows which one it talks to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.llm import embed_token, forward
from iomni.model.sampling import SamplingParams, make_generator, sample_next


@dataclass
class GenerationRequest:
    input_ids: Sequence[int]
    media: Mapping[int, torch.Tensor]  # placeholder token id -> (n, H) rows, in prompt order
    params: SamplingParams
    stop_ids: Sequence[int]
    session_id: str = ""
    return_hidden: bool = True


@dataclass(frozen=True)
class LLMStep:
    token_id: int
    hidden: torch.Tensor | None  # (H,) hidden state of the position that predicted the token
    timings_ms: dict[str, float] = field(default_factory=dict)  # "prefill" on the first step


class ModelParts(Protocol):
    model_id: str  # identifies the weights; scopes cached embeddings

    async def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    async def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]: ...


class InProcessParts:
    """PyTorch modules called directly, one forward at a time (a lock serialises the model)."""

    def __init__(self, checkpoint: LoadedCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.model_id = checkpoint.fingerprint
        self._lock = threading.Lock()

    def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        with self._lock, torch.inference_mode():
            return fn(*args)

    async def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return await asyncio.to_thread(self._run, self.model.encode_images, pixel_values)

    async def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        return await asyncio.to_thread(self._run, self.model.encode_audio, windows)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]:
        lm = self.model.language_model
        ids = torch.tensor(list(request.input_ids), dtype=torch.long)
        generator = make_generator(request.params)
        stop = set(request.stop_ids)

        def prefill():  # type: ignore[no-untyped-def]
            return forward(lm, self.model.inputs_embeds(ids, request.media), None)

        started = time.perf_counter()
        step, cache = await asyncio.to_thread(self._run, prefill)
        timings = {"prefill": (time.perf_counter() - started) * 1000}
        for _ in range(request.params.max_new_tokens):
            token = sample_next(step.logits, request.params, generator)
            hidden = step.hidden.float() if request.return_hidden else None
            yield LLMStep(token, hidden, timings)
            timings = {}
            if token in stop:
                return
            step, cache = await asyncio.to_thread(
                self._run, lambda t=token, c=cache: forward(lm, embed_token(lm, t), c)
            )
