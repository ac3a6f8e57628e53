"""Checkpoints in the real InteractiveOmni layout: `config.json` + (sharded) safetensors.

Loading reports missing and unexpected keys by name; a missing required key is an error, never
silently random weights. Random checkpoints are generated tensor by tensor from a model built on
the meta device, so even the 8B size never holds the model in memory, let alone twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from iomni.errors import CheckpointError
from iomni.model.config import SPEECH_SUBCONFIGS, InteractiveOmniConfig
from iomni.model.interactive_omni import PARTS, InteractiveOmniModel, parameters_by_part

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TIED_LM_HEAD = "language_model.lm_head.weight"
# Prefixes of the speech decoder (built by a later part of the code); reported, not errors.
SPEECH_PREFIXES = ("voicelm", "flow", "hifigan", "hift", "speech_decoder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)

    def unexpected_by_prefix(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in self.unexpected:
            prefix = key.split(".", 1)[0]
            counts[prefix] = counts.get(prefix, 0) + 1
        return counts

    def lines(self) -> list[str]:
        out = [f"missing keys: {len(self.missing)}"]
        out += [f"  - {k}" for k in self.missing[:20]]
        if len(self.missing) > 20:
            out.append(f"  ... and {len(self.missing) - 20} more")
        out.append(f"unexpected keys: {len(self.unexpected)}")
        for prefix, count in sorted(self.unexpected_by_prefix().items()):
            why = " (speech decoder: not loaded by this build)" if prefix in SPEECH_PREFIXES else ""
            out.append(f"  - {prefix}.*: {count}{why}")
        if self.tied:
            out.append(f"tied (not stored): {', '.join(self.tied)}")
        return out


@dataclass
class LoadedCheckpoint:
    path: Path
    config: InteractiveOmniConfig
    model: InteractiveOmniModel
    report: KeyReport
    fingerprint: str


# ---------------------------------------------------------------------------------------------
# Reading


def weight_files(path: Path) -> dict[str, Path]:
    """Map every stored tensor name to the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.exists():
                raise CheckpointError(f"{index} names {shard.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if single.exists():
        try:
            with safe_open(single, "pt") as handle:
                return {name: single for name in handle.keys()}  # noqa: SIM118
        except SafetensorError as exc:
            raise CheckpointError(f"{single} is not a readable safetensors file: {exc}") from exc
    raise CheckpointError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, "pt") as handle:
                present = set(handle.keys())
                absent = [name for name in names if name not in present]
                if absent:
                    raise CheckpointError(
                        f"{INDEX_FILE} maps {len(absent)} tensors to {file.name}, which does not "
                        f"hold them, e.g. {', '.join(absent[:5])}"
                    )
                for name in names:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    return shapes


def fingerprint(path: Path) -> str:
    """Identifies the weights: cached media embeddings are only valid for the same one."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(set(weight_files(path).values())):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            # The safetensors header names every tensor with its offsets: cheap and specific.
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_len, 1 << 24)))
        digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


def meta_model(config: InteractiveOmniConfig) -> InteractiveOmniModel:
    with torch.device("meta"):
        return InteractiveOmniModel(config)


def expected_shapes(model: InteractiveOmniModel) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def key_report(
    config: InteractiveOmniConfig,
    stored: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
) -> KeyReport:
    report = KeyReport()
    tie = bool(config.llm_config.tie_word_embeddings)
    for name in expected:
        if name in stored:
            continue
        if tie and name == TIED_LM_HEAD:
            report.tied.append(name)
        else:
            report.missing.append(name)
    report.unexpected = sorted(set(stored) - set(expected))
    return report


def _check_shapes(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]):
    wrong = [
        f"{name}: stored {list(stored[name])}, model expects {list(shape)}"
        for name, shape in expected.items()
        if name in stored and stored[name] != shape
    ]
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} tensors have the wrong shape for config.json: " + "; ".join(wrong[:5])
        )


def load_checkpoint(
    path: Path | str, dtype: torch.dtype | None = None, device: str = "cpu"
) -> LoadedCheckpoint:
    """Load config and weights; raise CheckpointError on any missing or misshaped tensor."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = InteractiveOmniConfig.from_file(path / "config.json")
    dtype = dtype or torch.float32
    model = meta_model(config)
    expected = expected_shapes(model)
    files = weight_files(path)
    stored = stored_shapes(path)
    report = key_report(config, stored, expected)
    if report.missing:
        raise CheckpointError(
            f"checkpoint {path} is missing {len(report.missing)} required tensors, e.g. "
            + ", ".join(report.missing[:8])
        )
    _check_shapes(stored, expected)
    for line in report.lines()[1:]:
        log.info("checkpoint %s: %s", path.name, line.strip())
    state = _read_tensors(files, expected, dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    if report.tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    _materialise_buffers(model, device)
    model.eval()
    return LoadedCheckpoint(path, config, model, report, fingerprint(path))


def _read_tensors(
    files: dict[str, Path], expected: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(file, "pt", device=device) as handle:
            for name in names:
                state[name] = handle.get_tensor(name).to(dtype)
    return state


def _materialise_buffers(model: InteractiveOmniModel, device: str) -> None:
    # Rotary frequencies are non-persistent buffers: rebuild them from the config.
    lm = model.language_model.model
    with torch.device(device):
        lm.rotary_emb = Qwen3RotaryEmbedding(config=lm.config)
    left = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    left += [name for name, t in model.named_buffers() if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left uninitialised after loading: {', '.join(left[:8])}")


# ---------------------------------------------------------------------------------------------
# Writing


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal position table."""
    increment = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic value for one tensor: depends on (name, seed) only, not on order."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if leaf in ("ls1", "ls2"):
        return torch.full(shape, 0.1)
    if name.endswith("embed_positions.weight"):
        return _sinusoids(*shape)
    if len(shape) == 1:  # LayerNorm / RMSNorm scales
        return torch.ones(shape)
    tensor_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    generator = torch.Generator().manual_seed(tensor_seed)
    return torch.randn(shape, generator=generator) * 0.02


def _shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    out_dir: Path,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Stream (name, tensor) pairs into shards of at most `max_shard_bytes`; write the index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    temp_files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            temp = out_dir / f".shard-{len(temp_files):05d}.tmp"
            save_file(shard, str(temp), metadata={"format": "pt", **(metadata or {})})
            temp_files.append((temp, list(shard)))
            shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    flush()
    names = _shard_names(len(temp_files))
    weight_map: dict[str, str] = {}
    for (temp, keys), final in zip(temp_files, names, strict=True):
        temp.rename(out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def random_state(
    config: InteractiveOmniConfig, seed: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    expected = expected_shapes(meta_model(config))
    tie = bool(config.llm_config.tie_word_embeddings)
    for name, shape in expected.items():
        if tie and name == TIED_LM_HEAD:
            continue
        yield name, random_tensor(name, shape, seed).to(dtype)


def model_state(model: InteractiveOmniModel) -> Iterator[tuple[str, torch.Tensor]]:
    tie = bool(model.config.llm_config.tie_word_embeddings)
    for name, tensor in model.state_dict().items():
        if not (tie and name == TIED_LM_HEAD):
            yield name, tensor.detach().cpu()


def save_checkpoint(
    model: InteractiveOmniModel, out_dir: Path, max_shard_bytes: int = 2 << 30
) -> None:
    """Save weights and config of a model in memory (tokenizer files are written separately)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save(out_dir / "config.json")
    write_tensors(model_state(model), out_dir, max_shard_bytes)


def speech_subconfigs_present(config: InteractiveOmniConfig) -> list[str]:
    return [name for name in SPEECH_SUBCONFIGS if config.speech_config(name) is not None]


def part_parameter_counts(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str, int]]:
    counts = parameters_by_part(shapes)
    rows = [
        (prefix, PARTS.get(prefix, "?"), counts.pop(prefix)) for prefix in PARTS if prefix in counts
    ]
    rows += [(prefix, "not used by this build", n) for prefix, n in sorted(counts.items())]
    return rows
