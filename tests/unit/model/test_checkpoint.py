"""Checkpoint save/load, key reports, sharding, config round trips and random generation."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from iomni.errors import CheckpointError
from iomni.model.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    LoadedCheckpoint,
    expected_shapes,
    load_checkpoint,
    meta_model,
    model_state,
    random_tensor,
    save_checkpoint,
    weight_files,
    write_tensors,
)
from iomni.model.config import InteractiveOmniConfig
from iomni.model.generate import make_checkpoint
from iomni.model.llm import PackedVocabProjection
from iomni.model.presets import preset_config

QKV = "vision_model.encoder.layers.0.attn.qkv.weight"
TIED_LM_HEAD = "language_model.lm_head.weight"
Tensors = dict[str, torch.Tensor]


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _read_all(path: Path) -> Tensors:
    state: Tensors = {}
    for file in sorted(set(weight_files(path).values())):
        state.update(load_file(file))
    return state


def _rewrite(path: Path, mutate: Callable[[Tensors], None]) -> None:
    """Replace the weights of `path` by one `model.safetensors` holding mutate(tensors)."""
    state = _read_all(path)
    mutate(state)
    for file in set(weight_files(path).values()):
        file.unlink()
    (path / INDEX_FILE).unlink(missing_ok=True)
    save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        assert sb[name].dtype == tensor.dtype, name
        assert torch.equal(sb[name], tensor), name


def _lm_tied(checkpoint: LoadedCheckpoint) -> bool:
    lm = checkpoint.model.language_model
    return lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------------------
# Save / load


def test_save_load_is_bit_exact_and_keeps_tie(tiny: LoadedCheckpoint, tmp_path: Path) -> None:
    save_checkpoint(tiny.model, tmp_path / "saved")
    loaded = load_checkpoint(tmp_path / "saved")
    _assert_same_state(tiny.model, loaded.model)
    assert loaded.config.llm_config.tie_word_embeddings
    assert _lm_tied(tiny) and _lm_tied(loaded)
    assert loaded.report.tied == [TIED_LM_HEAD, "voicelm.llm.model.lm_head.weight"]
    assert loaded.report.missing == [] and loaded.report.unexpected == []


def test_write_tensors_shards_and_index(tiny: LoadedCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    weight_map = write_tensors(model_state(tiny.model), out, max_shard_bytes=2 << 20)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count >= 3
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not list(out.glob(".shard-*"))
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map
    assert set(weight_map.values()) == set(shards)
    assert TIED_LM_HEAD not in weight_map
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for _, t in model_state(tiny.model)
    )
    tiny.config.save(out / "config.json")
    loaded = load_checkpoint(out)
    _assert_same_state(tiny.model, loaded.model)
    assert _lm_tied(loaded)


# ---------------------------------------------------------------------------------------------
# make_checkpoint determinism (two generations in this file)


def test_make_checkpoint_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_checkpoint("tiny", again, seed=0)
    assert (again / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    first, second = _read_all(tiny_dir), _read_all(again)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype, name
        assert tensor.numpy().tobytes() == second[name].numpy().tobytes(), name

    other = tmp_path / "other"
    make_checkpoint("tiny", other, seed=1)
    third = _read_all(other)
    assert json.loads((other / "config.json").read_text())["iomni_seed"] == 1
    assert not torch.equal(first[QKV], third[QKV])
    assert not torch.equal(
        first["language_model.model.embed_tokens.weight"],
        third["language_model.model.embed_tokens.weight"],
    )


# ---------------------------------------------------------------------------------------------
# Key reports and broken checkpoints


def test_missing_required_key_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    path = _copy(tiny_dir, tmp_path / "ckpt")
    _rewrite(path, lambda state: state.pop(QKV))
    with pytest.raises(CheckpointError, match="missing 1 required") as info:
        load_checkpoint(path)
    assert QKV in info.value.detail


def test_unexpected_keys_are_reported(tiny_dir: Path, tmp_path: Path) -> None:
    path = _copy(tiny_dir, tmp_path / "ckpt")

    def add(state: Tensors) -> None:
        state["voicelm.extra_head.weight"] = torch.zeros(2, 4)
        state["foo.bar"] = torch.ones(3)

    _rewrite(path, add)
    loaded = load_checkpoint(path)
    assert loaded.report.unexpected == ["foo.bar", "voicelm.extra_head.weight"]
    assert loaded.report.missing == []
    lines = loaded.report.lines()
    assert "unexpected keys: 2" in lines
    assert "  - foo.*: 1" in lines and "  - voicelm.*: 1" in lines
    assert _lm_tied(loaded)


def test_loading_some_parts_reports_the_rest_as_not_loaded(tiny_dir: Path) -> None:
    loaded = load_checkpoint(tiny_dir, parts=("vision",))
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    assert set(loaded.report.not_loaded) == {
        "mlp2",
        "audio_model",
        "language_model",
        "voicelm",
        "flow",
        "hifigan",
        "default_speaker_embedding",
    }
    assert not hasattr(loaded.model, "language_model")
    assert loaded.model.encode_images(torch.zeros(1, 3, 448, 448)).shape[1] == 256
    with pytest.raises(CheckpointError, match="did not load the llm part"):
        loaded.model.inputs_embeds(torch.tensor([1]), {})


def test_wrong_shape_is_an_error(tiny_dir: Path, tmp_path: Path) -> None:
    path = _copy(tiny_dir, tmp_path / "ckpt")

    def shrink(state: Tensors) -> None:
        state[QKV] = state[QKV][:-1].clone()

    _rewrite(path, shrink)
    with pytest.raises(CheckpointError, match="wrong shape") as info:
        load_checkpoint(path)
    assert QKV in info.value.detail


def _no_config(path: Path) -> None:
    (path / "config.json").unlink()


def _bad_json(path: Path) -> None:
    (path / "config.json").write_text("{not json")


def _no_weights(path: Path) -> None:
    for file in path.glob("*.safetensors"):
        file.unlink()
    (path / INDEX_FILE).unlink()


def _index_names_missing_shard(path: Path) -> None:
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"][QKV] = "model-00002-of-00002.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_no_config, "config.json"),
        (_bad_json, "not valid JSON"),
        (_no_weights, "has neither"),
        (_index_names_missing_shard, "model-00002-of-00002.safetensors, which does not exist"),
    ],
)
def test_broken_checkpoint_directory(
    tiny_dir: Path, tmp_path: Path, breakage: Callable[[Path], None], message: str
) -> None:
    path = _copy(tiny_dir, tmp_path / "ckpt")
    breakage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_nonexistent_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_index_naming_tensor_absent_from_shard(tiny_dir: Path, tmp_path: Path) -> None:
    path = _copy(tiny_dir, tmp_path / "ckpt")
    (shard,) = set(weight_files(path).values())
    state = load_file(shard)
    del state[QKV]
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=QKV):
        load_checkpoint(path)


def test_corrupt_shard_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    path = _copy(tiny_dir, tmp_path / "ckpt")
    (shard,) = set(weight_files(path).values())
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_config_that_is_not_an_object_is_a_checkpoint_error(tiny_dir: Path, tmp_path: Path) -> None:
    path = _copy(tiny_dir, tmp_path / "ckpt")
    (path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Config


def test_config_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    raw = preset_config("tiny")
    raw["my_field"] = 1
    raw["vision_config"]["extra"] = 2
    raw["llm_config"]["foo"] = "x"
    raw["flow_config"]["bar"] = [1]
    InteractiveOmniConfig(raw).save(tmp_path / "config.json")
    out = InteractiveOmniConfig.from_file(tmp_path / "config.json").to_dict()
    assert out["my_field"] == 1
    assert out["vision_config"]["extra"] == 2
    assert out["llm_config"]["foo"] == "x"
    assert out["flow_config"]["bar"] == [1]
    assert out["voicelm_config"] == raw["voicelm_config"]
    assert out["vision_config"]["hidden_size"] == raw["vision_config"]["hidden_size"]


def test_config_without_llm_config_is_an_error() -> None:
    raw = preset_config("tiny")
    del raw["llm_config"]
    with pytest.raises(CheckpointError, match="llm_config"):
        InteractiveOmniConfig(raw)


# ---------------------------------------------------------------------------------------------
# Parameter counts of the real sizes (meta device: no memory)


@pytest.mark.parametrize(
    ("size", "low", "high", "speech_low", "speech_high"),
    [("4b", 4.8e9, 5.2e9, 5.5e9, 5.9e9), ("8b", 9.0e9, 9.4e9, 9.6e9, 10.1e9)],
)
def test_preset_parameter_counts(
    size: str, low: float, high: float, speech_low: float, speech_high: float
) -> None:
    """4B: ~5.9 B params in the published 11.83 GB bf16 checkpoint (model.md)."""
    config = InteractiveOmniConfig(preset_config(size))
    understanding = expected_shapes(meta_model(config, ("vision", "audio", "llm")))
    assert TIED_LM_HEAD not in understanding or not config.llm_config.tie_word_embeddings
    prefixes = {name.split(".", 1)[0] for name in understanding}
    assert prefixes == {"vision_model", "mlp1", "audio_model", "mlp2", "language_model"}
    assert low < sum(math.prod(s) for s in understanding.values()) < high
    everything = expected_shapes(meta_model(config))
    assert speech_low < sum(math.prod(s) for s in everything.values()) < speech_high


# ---------------------------------------------------------------------------------------------
# random_tensor


def test_random_tensor_deterministic_and_order_independent() -> None:
    a, b = "mlp1.1.weight", "language_model.model.layers.0.mlp.up_proj.weight"
    first = [random_tensor(a, (8, 4), seed=3), random_tensor(b, (6, 5), seed=3)]
    second = [random_tensor(b, (6, 5), seed=3), random_tensor(a, (8, 4), seed=3)]
    assert torch.equal(first[0], second[1]) and torch.equal(first[1], second[0])
    assert not torch.equal(random_tensor(a, (8, 4), seed=4), first[0])
    assert not torch.equal(random_tensor("mlp1.3.weight", (8, 4), seed=3), first[0])
    assert 0.01 < first[0].std().item() < 0.04


POSITIONS = "audio_model.encoder.embed_positions.weight"


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    half = channels // 2
    inv = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def test_random_tensor_special_leaves() -> None:
    assert torch.equal(random_tensor("x.norm.weight", (7,), 0), torch.ones(7))
    assert torch.equal(random_tensor("x.layer_norm.bias", (7,), 0), torch.zeros(7))
    assert torch.equal(random_tensor("x.fc1.bias", (3, 2), 0), torch.zeros(3, 2))
    assert torch.equal(random_tensor("x.layers.0.ls1", (4,), 0), torch.full((4,), 0.1))
    table = random_tensor(POSITIONS, (10, 8), 5)
    assert torch.allclose(table, _sinusoids(10, 8))
    assert torch.equal(table, random_tensor(POSITIONS, (10, 8), 9))


def test_tiny_checkpoint_uses_random_tensor(tiny: LoadedCheckpoint) -> None:
    state = tiny.model.state_dict()
    for name in (POSITIONS, QKV, "vision_model.encoder.layers.0.norm1.weight"):
        assert torch.equal(state[name], random_tensor(name, tuple(state[name].shape), 0)), name
    assert torch.allclose(state[POSITIONS], _sinusoids(*state[POSITIONS].shape))


def test_cpu_load_prepacks_the_vocab_projection(tiny: LoadedCheckpoint) -> None:
    # oneDNN's packed GEMM serves every batch size: same values, same tie, same state dict.
    head = tiny.model.language_model.lm_head
    assert isinstance(head, PackedVocabProjection)
    assert _lm_tied(tiny)
    row_major = head.weight.detach().contiguous()
    vocab, hidden = row_major.shape
    generator = torch.Generator().manual_seed(0)
    for shape in ((hidden,), (1, hidden), (3, hidden), (2, 5, hidden), (16, hidden)):
        states = torch.randn(*shape, generator=generator)
        logits = head(states)
        assert logits.shape == (*shape[:-1], vocab)
        torch.testing.assert_close(logits, states @ row_major.t(), rtol=1e-5, atol=1e-4)
    ids = torch.tensor([0, 7, vocab - 1])
    assert torch.equal(tiny.model.language_model.model.embed_tokens(ids), row_major[ids])
    assert "language_model.lm_head.weight" in tiny.model.state_dict()


def test_a_load_that_cannot_pack_stores_the_projection_column_major(tiny_dir: Path) -> None:
    loaded = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    head = loaded.model.language_model.lm_head
    assert type(head) is torch.nn.Linear
    vocab, hidden = head.weight.shape
    assert head.weight.stride() == (1, vocab)
    assert _lm_tied(loaded)
    states = torch.randn(3, hidden, dtype=torch.bfloat16)
    expected = states.float() @ head.weight.detach().float().t()
    torch.testing.assert_close(head(states).float(), expected, rtol=2e-2, atol=2e-2)
