"""`InteractiveOmniConfig`: the checkpoint's `config.json` with its sub-configs.

The real checkpoint's config is a `transformers.PretrainedConfig` built by remote code. We read
and write the same JSON layout ourselves so that unknown fields survive a round trip and nothing
depends on `trust_remote_code`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transformers import Qwen3Config, WhisperConfig

from iomni.errors import CheckpointError

SPEECH_SUBCONFIGS = ("voicelm_config", "flow_config", "hifigan_config")

# Top-level fields of the remote `InteractiveOmniConfig.__init__` with their class defaults.
TOP_LEVEL_DEFAULTS: dict[str, Any] = {
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "pad2square": False,
    "select_layer": -4,
    "force_image_size": None,
    "downsample_ratio": 0.5,
    "template": "internvl2_5",
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "ps_version": "v1",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
}


@dataclass
class InternVisionConfig:
    """InternViT hyper-parameters (`vision_config`), named as in InternVL's config."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 448
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    initializer_factor: float = 0.1
    use_flash_attn: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InternVisionConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


class InteractiveOmniConfig:
    """Reads and writes `config.json`; keeps every field it does not understand."""

    model_type = "interactiveomni"

    def __init__(self, raw: dict[str, Any]) -> None:
        if not isinstance(raw, dict):
            raise CheckpointError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        self._raw = copy.deepcopy(raw)
        for key, default in TOP_LEVEL_DEFAULTS.items():
            self._raw.setdefault(key, default)
        for key in ("vision_config", "audio_config", "llm_config"):
            if not isinstance(self._raw.get(key), dict):
                raise CheckpointError(f"config.json has no '{key}' object; it is required")
        self.vision_config = InternVisionConfig.from_dict(self._raw["vision_config"])
        self.audio_config = WhisperConfig(**self._raw["audio_config"])
        self.llm_config = Qwen3Config(**self._raw["llm_config"])
        self._check()

    def __getattr__(self, name: str) -> Any:
        # Top-level fields (select_layer, template, ...) read straight from the raw JSON.
        raw = self.__dict__.get("_raw", {})
        if name in raw:
            return raw[name]
        raise AttributeError(name)

    def speech_config(self, name: str) -> dict[str, Any] | None:
        """One of the speech-decoder sub-configs, as the JSON dict."""
        value = self._raw.get(name)
        return copy.deepcopy(value) if isinstance(value, dict) else None

    @property
    def image_size(self) -> int:
        return self._raw.get("force_image_size") or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """LLM tokens per image tile: (image_size / patch)^2 * downsample_ratio^2."""
        grid = self.image_size // self.vision_config.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    @property
    def llm_hidden_size(self) -> int:
        return self.llm_config.hidden_size

    def _check(self) -> None:
        v = self.vision_config
        grid = self.image_size // v.patch_size
        scale = 1 / self.downsample_ratio
        if self.image_size % v.patch_size or grid % scale:
            raise CheckpointError(
                f"vision patch grid {grid} is not divisible by 1/downsample_ratio={scale}"
            )
        if self.select_layer != -1 and -self.select_layer > v.num_hidden_layers + 1:
            raise CheckpointError(
                f"select_layer={self.select_layer} needs at least {-self.select_layer - 1} "
                f"vision layers, the config has {v.num_hidden_layers}"
            )
        if self.ps_version not in ("v1", "v2"):
            raise CheckpointError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self._raw)
        out["vision_config"] = {**out["vision_config"], **asdict(self.vision_config)}
        out["model_type"] = self.model_type
        out.setdefault("architectures", ["InteractiveOmniModel"])
        return out

    @classmethod
    def from_file(cls, path: Path) -> InteractiveOmniConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path} does not exist; a checkpoint needs config.json") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        return cls(raw)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
