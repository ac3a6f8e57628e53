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

from iomni.errors import CheckpointError
from iomni.model.config import InteractiveOmniConfig
from iomni.model.interactive_omni import (
    ALL_PARTS,
    PART_GROUPS,
    PARTS,
    InteractiveOmniModel,
    parameters_by_part,
    tied_parameters,
)
from iomni.model.llm import pack_vocab_projection

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    not_loaded: dict[str, int] = field(default_factory=dict)  # prefix -> tensors (parts skipped)

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
            out.append(f"  - {prefix}.*: {count}")
        for prefix, count in sorted(self.not_loaded.items()):
            out.append(f"not loaded by this process: {prefix}.* ({count} tensors)")
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


def meta_model(
    config: InteractiveOmniConfig, parts: tuple[str, ...] = ALL_PARTS
) -> InteractiveOmniModel:
    with torch.device("meta"):
        return InteractiveOmniModel(config, parts)


def expected_shapes(model: InteractiveOmniModel) -> dict[str, tuple[int, ...]]:
    """Tensors a checkpoint must hold for `model` (tied duplicates are not stored)."""
    tied = tied_parameters(model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def key_report(model: InteractiveOmniModel, stored: dict[str, tuple[int, ...]]) -> KeyReport:
    expected = expected_shapes(model)
    built = set(model.prefixes)
    skipped = {p for group in PART_GROUPS.values() for p in group} - built
    report = KeyReport(tied=sorted(tied_parameters(model)))
    report.missing = [name for name in expected if name not in stored]
    for name in sorted(set(stored) - set(expected)):
        prefix = name.split(".", 1)[0]
        if prefix in skipped:
            report.not_loaded[prefix] = report.not_loaded.get(prefix, 0) + 1
        else:
            report.unexpected.append(name)
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
    path: Path | str,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    parts: tuple[str, ...] = ALL_PARTS,
) -> LoadedCheckpoint:
    """Load config and the weights of `parts`; raise CheckpointError on any missing or
    misshaped tensor of those parts."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = InteractiveOmniConfig.from_file(path / "config.json")
    dtype = dtype or torch.float32
    model = meta_model(config, parts)
    expected = expected_shapes(model)
    files = weight_files(path)
    stored = stored_shapes(path)
    report = key_report(model, stored)
    if report.missing:
        raise CheckpointError(
            f"checkpoint {path} is missing {len(report.missing)} required tensors, e.g. "
            + ", ".join(report.missing[:8])
        )
    _check_shapes(stored, expected)
    for line in report.lines()[1:]:
        log.info("checkpoint %s: %s", path.name, line.strip())
    state = _read_tensors(files, expected, dtype, device)
    tied = tied_parameters(model)
    model.load_state_dict(state, strict=False, assign=True)
    for name, source in tied.items():
        _set_parameter(model, name, model.get_parameter(source))
    _materialise_buffers(model, device)
    cpu_llm = device == "cpu" and hasattr(model, "language_model")
    if cpu_llm and not pack_vocab_projection(model.language_model):
        _vocab_columns_first(model.language_model.lm_head.weight)
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


def _vocab_columns_first(weight: torch.nn.Parameter) -> None:
    """Where the projection cannot be prepacked (a non-float32 CPU load, a torch without
    oneDNN), store it [vocab, hidden] column-major (same shape and values).

    On CPU, `F.linear` with a row-major [151936, D] weight takes a slow GEMM path: measured on
    `small` (D 256, one core) 12 ms for one row and 19 ms for eight; column-major, the same
    product is the plain x @ W.T and takes 5.3 and 17-19 ms. A tied embedding shares the
    parameter, and a row lookup from this layout is as exact (it only gathers strided
    values)."""
    weight.data = weight.data.t().contiguous().t()


def _set_parameter(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, value)


def _materialise_buffers(model: InteractiveOmniModel, device: str) -> None:
    # Non-persistent buffers (rotary frequencies) are not in checkpoints: rebuild their
    # modules from the module's own config.
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(config=module.config)
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, fresh)
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
    if name.endswith("parametrizations.weight.original0"):  # weight-norm gains: unit filters
        return torch.ones(shape)
    if leaf in ("ls1", "ls2"):
        return torch.full(shape, 0.1)
    if name.endswith("embed_positions.weight"):
        return _sinusoids(*shape)
    if len(shape) == 1 and name != "default_speaker_embedding":  # norm scales, snake alphas
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
    for name, shape in expected_shapes(meta_model(config)).items():
        yield name, random_tensor(name, shape, seed).to(dtype)


def model_state(model: InteractiveOmniModel) -> Iterator[tuple[str, torch.Tensor]]:
    tied = tied_parameters(model)
    for name, tensor in model.state_dict().items():
        if name not in tied:
            yield name, tensor.detach().cpu()


def save_checkpoint(
    model: InteractiveOmniModel, out_dir: Path, max_shard_bytes: int = 2 << 30
) -> None:
    """Save weights and config of a model in memory (tokenizer files are written separately)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save(out_dir / "config.json")
    write_tensors(model_state(model), out_dir, max_shard_bytes)


def part_parameter_counts(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str, int]]:
    counts = parameters_by_part(shapes)
    rows = [
        (prefix, PARTS.get(prefix, "?"), counts.pop(prefix)) for prefix in PARTS if prefix in counts
    ]
    rows += [(prefix, "not used by this build", n) for prefix, n in sorted(counts.items())]
    return rows
