"""`vision_encoder`: image tiles -> LLM-space embeddings; dynamic batching across requests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from iomni.errors import InvalidInput
from iomni.triton.backend import error_response, input_array, load_part, pb
from iomni.triton.tensors import IMAGE_EMBEDS, PIXEL_VALUES


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model = load_part(args, "vision").model
        self.device = next(self.model.parameters()).device

    def execute(self, requests: list[Any]) -> list[Any]:
        pixels: list[np.ndarray | None] = []
        errors: dict[int, Any] = {}
        for index, request in enumerate(requests):
            try:
                pixels.append(_pixels(request))
            except Exception as exc:
                errors[index] = error_response(exc)
                pixels.append(None)
        good = [p for p in pixels if p is not None]
        embeds = iter(())
        if good:
            batch = torch.from_numpy(np.concatenate(good)).to(self.device)
            out = self.model.encode_images(batch).float().cpu().numpy()
            embeds = iter(np.split(out, np.cumsum([len(p) for p in good])[:-1]))
        pb_utils = pb()
        return [
            errors[i]
            if p is None
            else pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(IMAGE_EMBEDS, np.ascontiguousarray(next(embeds)))]
            )
            for i, p in enumerate(pixels)
        ]


def _pixels(request: Any) -> np.ndarray:
    array = input_array(request, PIXEL_VALUES)
    if array.ndim != 4 or array.shape[1] != 3 or not np.isfinite(array).all():
        raise InvalidInput(f"{PIXEL_VALUES} must be finite (tiles, 3, H, W), got {array.shape}")
    return array
