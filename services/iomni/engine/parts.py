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

import numpy as np
import torch

from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.llm import embed_token, forward
from iomni.model.sampling import SamplingParams, make_generator, sample_next
from iomni.model.speech.speaker import SpeakerEncoder
from iomni.model.speech.stream import SpeechSession


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


class SpeechStream(Protocol):
    """One reply's speech: text in, float32 24 kHz sample arrays out, in order."""

    async def push_text(
        self, token_ids: Sequence[int], hidden: torch.Tensor
    ) -> list[np.ndarray]: ...

    async def finish(self) -> list[np.ndarray]: ...

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


class InProcessParts:
    """PyTorch modules called directly, one forward at a time (a lock serialises the model)."""

    def __init__(self, checkpoint: LoadedCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.model_id = checkpoint.fingerprint
        self._lock = threading.Lock()
        self._speaker: SpeakerEncoder | None = None

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

    async def open_speech(self, options: SpeechOptions) -> SpeechStream:
        model = self.model
        if options.speaker_wav is None:
            speaker = model.default_speaker_embedding.detach()
        else:
            encoder = await asyncio.to_thread(self._speaker_encoder)
            speaker = await asyncio.to_thread(encoder.embed, options.speaker_wav)
        session = SpeechSession(
            model.voicelm, model.flow, model.hifigan, speaker, seed=options.seed
        )
        return InProcessSpeech(self, session)

    def _speaker_encoder(self) -> SpeakerEncoder:
        if self._speaker is None:
            self._speaker = SpeakerEncoder.from_checkpoint(self.checkpoint.path)
        return self._speaker


class InProcessSpeech:
    def __init__(self, parts: InProcessParts, session: SpeechSession) -> None:
        self.parts = parts
        self.session = session

    async def push_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> list[np.ndarray]:
        return await asyncio.to_thread(self.parts._run, self.session.push_text, token_ids, hidden)

    async def finish(self) -> list[np.ndarray]:
        return await asyncio.to_thread(self.parts._run, self.session.finish)

    async def close(self) -> None:
        self.session.done = True
