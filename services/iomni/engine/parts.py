"""The in-process transport: the model parts called directly, no servers.

`InProcessParts` calls the PyTorch modules directly; a Triton transport implements the same
protocol over the network. Nothing above this interface knows which one it talks to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import torch

from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.llm import embed_token, forward
from iomni.model.sampling import make_generator, sample_next
from iomni.model.speech.speaker import SpeakerEncoder
from iomni.model.speech.stream import SpeechSession
from iomni.parts import (
    GenerationRequest,
    LLMStep,
    ModelParts,
    SpeechOptions,
    SpeechStream,
)


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


__all__ = [
    "GenerationRequest",
    "InProcessParts",
    "InProcessSpeech",
    "LLMStep",
    "ModelParts",
    "SpeechOptions",
    "SpeechStream",
]
