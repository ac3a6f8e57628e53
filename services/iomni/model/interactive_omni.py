"""`InteractiveOmniModel`: the parts of the checkpoint, under the checkpoint's key prefixes.

A process can build only the parts it serves (`parts=`): a Triton model for the vision encoder
needs neither the LLM nor the speech decoder in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from iomni.errors import CheckpointError
from iomni.model.audio import AudioWhisperModel, audio_projector, encode_windows
from iomni.model.config import InteractiveOmniConfig
from iomni.model.llm import build_language_model, splice_media
from iomni.model.speech.flow import CausalMaskedDiffWithXvec, FlowConfig
from iomni.model.speech.hift import HiFTConfig, HiFTGenerator
from iomni.model.speech.speaker import SPEAKER_DIM
from iomni.model.speech.voicelm import VoiceLM, VoiceLMConfig
from iomni.model.vision import InternVisionModel, encode_tiles, vision_projector

# Key prefix -> human name. Order is the order parts are listed in reports.
PARTS: dict[str, str] = {
    "vision_model": "vision encoder (InternViT)",
    "mlp1": "vision projector",
    "audio_model": "audio encoder (Whisper)",
    "mlp2": "audio projector",
    "language_model": "LLM (Qwen3)",
    "voicelm": "speech-token LM (Qwen2)",
    "flow": "flow matching (mel decoder)",
    "hifigan": "HiFT vocoder",
    "default_speaker_embedding": "default speaker x-vector",
}
# What a process may ask for -> the key prefixes it builds.
PART_GROUPS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_model", "mlp1"),
    "audio": ("audio_model", "mlp2"),
    "llm": ("language_model",),
    "speech": ("voicelm", "flow", "hifigan", "default_speaker_embedding"),
}
ALL_PARTS = tuple(PART_GROUPS)


class InteractiveOmniModel(nn.Module):
    def __init__(self, config: InteractiveOmniConfig, parts: Iterable[str] = ALL_PARTS) -> None:
        super().__init__()
        self.config = config
        self.parts = frozenset(parts)
        unknown = self.parts - set(PART_GROUPS)
        if unknown:
            raise CheckpointError(
                f"unknown model parts {sorted(unknown)}; choose from {', '.join(PART_GROUPS)}"
            )
        if "vision" in self.parts:
            self.vision_model = InternVisionModel(config.vision_config)
            self.mlp1 = vision_projector(config)
        if "audio" in self.parts:
            self.audio_model = AudioWhisperModel(config.audio_config)
            self.mlp2 = audio_projector(config)
        if "llm" in self.parts:
            self.language_model = build_language_model(config.llm_config)
        if "speech" in self.parts:
            self._build_speech(config)

    def _build_speech(self, config: InteractiveOmniConfig) -> None:
        raw = {
            name: config.speech_config(name)
            for name in ("voicelm_config", "flow_config", "hifigan_config")
        }
        absent = [name for name, value in raw.items() if value is None]
        if absent:
            raise CheckpointError(
                f"config.json has no {', '.join(absent)}: the speech decoder "
                "cannot be built; serve text only"
            )
        self.voicelm = VoiceLM(VoiceLMConfig.from_dict(raw["voicelm_config"]))  # type: ignore[arg-type]
        self.flow = CausalMaskedDiffWithXvec(FlowConfig.from_dict(raw["flow_config"]))  # type: ignore[arg-type]
        self.hifigan = HiFTGenerator(HiFTConfig.from_dict(raw["hifigan_config"]))  # type: ignore[arg-type]
        self.default_speaker_embedding = nn.Parameter(torch.zeros(SPEAKER_DIM))

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(p for group in self.parts for p in PART_GROUPS[group])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _require(self, group: str) -> None:
        if group not in self.parts:
            raise CheckpointError(f"this process did not load the {group} part of the model")

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles, num_image_token, H_llm)."""
        self._require("vision")
        pixels = pixel_values.to(self.mlp1[1].weight)  # its device and dtype
        return encode_tiles(self.vision_model, self.mlp1, self.config, pixels)

    @torch.inference_mode()
    def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Log-mel windows (128, T_i) -> per-window (tokens_i, H_llm)."""
        self._require("audio")
        weight = self.mlp2[1].weight
        return encode_windows(self.audio_model, self.mlp2, [w.to(weight) for w in windows])

    def inputs_embeds(
        self, input_ids: torch.Tensor, media: Mapping[int, torch.Tensor]
    ) -> torch.Tensor:
        self._require("llm")
        return splice_media(self.language_model, input_ids, media)


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Parameter names that share storage with an earlier one (e.g. a tied lm_head)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


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
