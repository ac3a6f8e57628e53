"""`audio_encoder`: log-mel windows -> LLM-space embeddings; equal lengths batch together."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from iomni.errors import InvalidInput
from iomni.model.audio import tokens_after_pooling
from iomni.triton.backend import error_response, input_array, load_part, pb
from iomni.triton.tensors import AUDIO_EMBEDS, MEL

MAX_FRAMES = 3000  # one 30 s window at 100 Hz


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model = load_part(args, "audio").model
        self.device = next(self.model.parameters()).device

    def execute(self, requests: list[Any]) -> list[Any]:
        """All windows of all requests in one call: equal lengths share a forward."""
        mels: list[np.ndarray | Any] = []
        for request in requests:
            try:
                mels.append(_mel(request))
            except Exception as exc:
                mels.append(error_response(exc))
        windows = [
            torch.from_numpy(w).to(self.device)
            for m in mels
            if isinstance(m, np.ndarray)
            for w in m
        ]
        encoded = iter(self.model.encode_audio(windows)) if windows else iter(())
        pb_utils = pb()
        responses = []
        for mel in mels:
            if not isinstance(mel, np.ndarray):
                responses.append(mel)
                continue
            out = np.stack([next(encoded).float().cpu().numpy() for _ in range(len(mel))])
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(AUDIO_EMBEDS, out)])
            )
        return responses


def _mel(request: Any) -> np.ndarray:
    array = input_array(request, MEL)
    frames = array.shape[-1]
    if array.ndim != 3 or array.shape[1] != 128:
        raise InvalidInput(f"{MEL} must be (windows, 128, frames), got {array.shape}")
    if not 3 <= frames <= MAX_FRAMES or tokens_after_pooling(frames) < 1:
        raise InvalidInput(f"{MEL} windows must have 3..{MAX_FRAMES} frames, got {frames}")
    if not np.isfinite(array).all():
        raise InvalidInput(f"{MEL} contains NaN or infinite values")
    return array
