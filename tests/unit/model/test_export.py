"""ONNX exports of the encoders (the TensorRT engines' sources) match the PyTorch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from iomni.model.audio import tokens_after_pooling
from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.export import export_encoders, save_onnx

ATOL, RTOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def onnx_paths(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return export_encoders(tiny_dir, tmp_path_factory.mktemp("onnx"))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_matches(out: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
    # Tiny random weights give small activations: also bound the error against their scale,
    # so the absolute tolerance cannot hide a wrong graph.
    assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()


def test_export_writes_both_graphs_that_pass_the_checker(onnx_paths: dict[str, Path]) -> None:
    assert {name: path.name for name, path in onnx_paths.items()} == {
        "vision_encoder": "vision_encoder.onnx",
        "audio_encoder": "audio_encoder.onnx",
    }
    for path in onnx_paths.values():
        onnx.checker.check_model(str(path), full_check=True)
        assert not path.with_name(path.name + ".data").exists()  # tiny weights stay inline


def test_vision_graph_names_and_dynamic_batch(onnx_paths: dict[str, Path]) -> None:
    session = _session(onnx_paths["vision_encoder"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type) == ("PIXEL_VALUES", "tensor(float)")
    assert inp.shape[1:] == [3, 448, 448] and isinstance(inp.shape[0], str)
    assert out.name == "IMAGE_EMBEDS" and isinstance(out.shape[0], str)


def test_audio_graph_names_and_dynamic_axes(onnx_paths: dict[str, Path]) -> None:
    session = _session(onnx_paths["audio_encoder"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type) == ("MEL", "tensor(float)")
    assert inp.shape[1] == 128 and all(isinstance(inp.shape[i], str) for i in (0, 2))
    assert out.name == "AUDIO_EMBEDS" and all(isinstance(out.shape[i], str) for i in (0, 1))


@pytest.mark.parametrize("batch", [1, 3])  # the export traced batch 2
def test_vision_onnx_matches_pytorch(
    onnx_paths: dict[str, Path], tiny: LoadedCheckpoint, batch: int
) -> None:
    pixels = torch.randn(batch, 3, 448, 448, generator=torch.Generator().manual_seed(batch))
    ref = tiny.model.encode_images(pixels).numpy()
    (out,) = _session(onnx_paths["vision_encoder"]).run(None, {"PIXEL_VALUES": pixels.numpy()})
    assert out.shape == (batch, 256, tiny.config.llm_hidden_size) == ref.shape
    _assert_matches(out, ref)


# The export traced batch 2 at 400 frames; each case differs in batch, frames or both.
@pytest.mark.parametrize(("batch", "frames"), [(1, 200), (2, 3000), (1, 1000)])
def test_audio_onnx_matches_pytorch(
    onnx_paths: dict[str, Path], tiny: LoadedCheckpoint, batch: int, frames: int
) -> None:
    mel = torch.randn(batch, 128, frames, generator=torch.Generator().manual_seed(frames))
    ref = torch.stack(tiny.model.encode_audio(list(mel))).numpy()
    (out,) = _session(onnx_paths["audio_encoder"]).run(None, {"MEL": mel.numpy()})
    assert out.shape == (batch, tokens_after_pooling(frames), tiny.config.llm_hidden_size)
    assert out.shape == ref.shape
    _assert_matches(out, ref)


def test_external_weights_go_to_one_sidecar(onnx_paths: dict[str, Path], tmp_path: Path) -> None:
    # The >2 GiB path (Whisper-large-v3 in float32), forced on the tiny graph.
    out = save_onnx(onnx.load(str(onnx_paths["audio_encoder"])), tmp_path / "audio.onnx", True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.onnx", "audio.onnx.data"]
    mel = np.random.default_rng(0).standard_normal((1, 128, 600), dtype=np.float32)
    (inline,) = _session(onnx_paths["audio_encoder"]).run(None, {"MEL": mel})
    (external,) = _session(out).run(None, {"MEL": mel})
    np.testing.assert_array_equal(external, inline)
