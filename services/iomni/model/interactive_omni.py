"""`InteractiveOmniModel`: the parts of the checkpoint, under the checkpoint's key prefixes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from iomni.model.audio import AudioWhisperModel, audio_projector, encode_windows
from iomni.model.config import InteractiveOmniConfig
from iomni.model.llm import build_language_model, splice_media
from iomni.model.vision import InternVisionModel, encode_tiles, vision_projector

# Key prefix -> human name. Order is the order parts are listed in reports.
PARTS: dict[str, str] = {
    "vision_model": "vision encoder (InternViT)",
    "mlp1": "vision projector",
    "audio_model": "audio encoder (Whisper)",
    "mlp2": "audio projector",
    "language_model": "LLM (Qwen3)",
}


class InteractiveOmniModel(nn.Module):
    def __init__(self, config: InteractiveOmniConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision_config)
        self.mlp1 = vision_projector(config)
        self.audio_model = AudioWhisperModel(config.audio_config)
        self.mlp2 = audio_projector(config)
        self.language_model = build_language_model(config.llm_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles, num_image_token, H_llm)."""
        pixels = pixel_values.to(self.dtype)
        return encode_tiles(self.vision_model, self.mlp1, self.config, pixels)

    @torch.inference_mode()
    def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Log-mel windows (128, T_i) -> per-window (tokens_i, H_llm)."""
        return encode_windows(self.audio_model, self.mlp2, [w.to(self.dtype) for w in windows])

    def inputs_embeds(
        self, input_ids: torch.Tensor, media: Mapping[int, torch.Tensor]
    ) -> torch.Tensor:
        return splice_media(self.language_model, input_ids, media)


def parameters_by_part(named: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Parameter counts grouped by top-level key prefix."""
    counts: dict[str, int] = {}
    for name, shape in named.items():
        prefix = name.split(".", 1)[0]
        numel = 1
        for dim in shape:
            numel *= dim
        counts[prefix] = counts.get(prefix, 0) + numel
    return counts
