"""Config presets for generated checkpoints: `tiny`, `small`, `4b`, `8b`.

`4b` / `8b` use the published sizes of InternViT-300M, Whisper-large-v3's encoder and
Qwen3-4B / -8B. Top-level fields the real `config.json` may set differently (select_layer,
ps_version, template) use the remote config class defaults, except `downsample_ratio`: 0.25
(64 tokens per tile, as the paper states) for `small`/`4b`/`8b`; see docs/model.md for which
facts are still assumptions.
"""

from __future__ import annotations

import copy
from typing import Any

from iomni.errors import InvalidInput
from iomni.model.speech.flow import SMALL_FLOW_CONFIG, TINY_FLOW_CONFIG, FlowConfig
from iomni.model.speech.hift import SMALL_HIFT_CONFIG, TINY_HIFT_CONFIG, HiFTConfig

QWEN_VOCAB = 151936

_VISION_300M = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
)
_WHISPER_LARGE_V3 = dict(
    d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120
)
_QWEN3_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)
_QWEN3_8B = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
)

# CosyVoice2's speech-token LM backbone (Qwen2.5-0.5B-sized), the same for 4B and 8B.
_VOICELM_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
)

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2
        ),
        audio=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64),
        llm=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
        ),
        voicelm=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        max_dynamic_patch=12,
    ),
    "small": dict(
        vision=dict(
            hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3
        ),
        audio=dict(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024),
        llm=dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            tie_word_embeddings=True,
        ),
        voicelm=dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        max_dynamic_patch=6,
    ),
    "4b": dict(
        vision=_VISION_300M,
        audio=_WHISPER_LARGE_V3,
        llm=_QWEN3_4B,
        voicelm=_VOICELM_05B,
        max_dynamic_patch=12,
    ),
    "8b": dict(
        vision=_VISION_300M,
        audio=_WHISPER_LARGE_V3,
        llm=_QWEN3_8B,
        voicelm=_VOICELM_05B,
        max_dynamic_patch=12,
    ),
}

SIZES = tuple(_SIZES)


def _vision_config(dims: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "num_channels": 3,
        "patch_size": 14,
        "image_size": 448,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "initializer_factor": 0.1,
        "use_flash_attn": False,
        "drop_path_rate": 0.0,
        **dims,
    }


def _audio_config(dims: dict[str, Any]) -> dict[str, Any]:
    # num_mel_bins / max_source_positions are fixed by the feature extractor (128 bins, 30 s).
    return {
        "model_type": "whisper",
        "num_mel_bins": 128,
        "max_source_positions": 1500,
        "activation_function": "gelu",
        "decoder_layers": 1,
        "decoder_attention_heads": 2,
        "decoder_ffn_dim": 64,
        "vocab_size": 51866,
        "scale_embedding": False,
        **dims,
    }


def _llm_config(dims: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": QWEN_VOCAB,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
        **dims,
    }


def _as_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(config)


def _speech_configs(voicelm: dict[str, Any], llm_hidden: int, size: str) -> dict[str, Any]:
    # Built by the speech-decoder code; kept in config.json so checkpoints carry them already.
    width = voicelm["hidden_size"]
    flow = _as_dict(
        {"tiny": TINY_FLOW_CONFIG, "small": SMALL_FLOW_CONFIG}.get(size) or FlowConfig()
    )
    hift = _as_dict(
        {"tiny": TINY_HIFT_CONFIG, "small": SMALL_HIFT_CONFIG}.get(size) or HiFTConfig()
    )
    return {
        "voicelm_config": {
            "llm_input_size": width,
            "llm_output_size": width,
            "speech_token_size": 6561,
            "text_hidden_size": llm_hidden,
            "mix_ratio": [5, 25],
            "sampling_config": {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1},
            "llm_config": {
                "model_type": "qwen2",
                "vocab_size": QWEN_VOCAB,
                "head_dim": None,
                "rope_theta": 1_000_000.0,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True,
                **voicelm,
            },
        },
        "flow_config": flow,
        "hifigan_config": hift,
    }


def preset_config(size: str) -> dict[str, Any]:
    """The raw `config.json` dict for a named size."""
    if size not in _SIZES:
        raise InvalidInput(f"unknown checkpoint size {size!r}; choose one of {', '.join(SIZES)}")
    spec = copy.deepcopy(_SIZES[size])
    voicelm = spec["voicelm"]
    voicelm["head_dim"] = voicelm["hidden_size"] // voicelm["num_attention_heads"]
    raw: dict[str, Any] = {
        "architectures": ["InteractiveOmniModel"],
        "model_type": "interactiveomni",
        "iomni_size": size,
        "vision_config": _vision_config(spec["vision"]),
        "audio_config": _audio_config(spec["audio"]),
        "llm_config": _llm_config(spec["llm"]),
        "select_layer": -4,
        # The paper's 64 tokens per 448-px tile (0.25); `tiny` keeps the class default 0.5 so
        # its tests keep exercising that path. A real config.json always wins.
        "downsample_ratio": 0.5 if size == "tiny" else 0.25,
        "ps_version": "v1",
        "template": "internvl2_5",
        "force_image_size": 448,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": spec["max_dynamic_patch"],
        "torch_dtype": "float32" if size in ("tiny", "small") else "bfloat16",
    }
    raw.update(_speech_configs(voicelm, spec["llm"]["hidden_size"], size))
    return raw
