"""`iomni make-checkpoint`: random-weight checkpoints in the real layout, with a fixed seed."""

from __future__ import annotations

import json
from pathlib import Path

from iomni.model.checkpoint import DTYPES, random_state, write_tensors
from iomni.model.config import InteractiveOmniConfig
from iomni.model.media import AudioFeatureExtractor
from iomni.model.presets import preset_config
from iomni.model.processor import write_generation_config
from iomni.model.speech.speaker import CAMPPLUS_FILE, write_standin_campplus
from iomni.model.tokenizer import Tokenizer, write_offline_tokenizer

# Shard sizes: one file for test sizes, ~4 GB like the published 4B for the real sizes.
SHARD_BYTES = {"tiny": 1 << 40, "small": 1 << 40, "4b": 4 << 30, "8b": 4 << 30}


def make_checkpoint(
    size: str, out_dir: Path, seed: int = 0, max_shard_bytes: int | None = None
) -> InteractiveOmniConfig:
    """Write config, weights, tokenizer and preprocessor files for a named size."""
    raw = preset_config(size)
    raw["iomni_seed"] = seed
    config = InteractiveOmniConfig(raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An old config.json would mark a half-written directory as complete; old shards linger.
    for stale in [*out_dir.glob("config.json"), *out_dir.glob("model*.safetensors*")]:
        stale.unlink()
    write_offline_tokenizer(out_dir)
    AudioFeatureExtractor().save(out_dir)
    write_generation_config(out_dir, Tokenizer.from_dir(out_dir).special.stop_ids)
    write_standin_campplus(out_dir / CAMPPLUS_FILE, seed=seed)
    dtype = DTYPES[raw["torch_dtype"]]
    write_tensors(
        random_state(config, seed, dtype),
        out_dir,
        max_shard_bytes or SHARD_BYTES[size],
        metadata={"iomni_size": size, "iomni_seed": str(seed)},
    )
    # config.json last: its presence marks a complete checkpoint.
    config.save(out_dir / "config.json")
    return config


def describe(out_dir: Path) -> dict[str, object]:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    return {
        "total_bytes": index["metadata"]["total_size"],
        "shards": len(set(index["weight_map"].values())),
    }
