"""Every config.pbtxt (both profiles) agrees with the tensor table in iomni.triton.tensors, and
docs/triton.md documents exactly that table."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from iomni.triton.repository import render
from iomni.triton.tensors import CONTRACTS, MODELS, TensorSpec

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def specs(tensors) -> list[TensorSpec]:  # type: ignore[no-untyped-def]
    return [
        TensorSpec(
            t.name,
            model_config_pb2.DataType.Name(t.data_type),
            tuple(t.dims),
            getattr(t, "optional", False),
        )
        for t in tensors
    ]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def repository(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    render(REPOSITORY, out, request.param)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_config_matches_the_tensor_table(repository: Path, model: str) -> None:
    config = parse(repository / model / "config.pbtxt")
    contract = CONTRACTS[model]
    assert config.name == model
    assert config.max_batch_size == contract.max_batch_size
    assert specs(config.input) == list(contract.inputs)
    assert [(s.name, s.dtype, s.dims) for s in specs(config.output)] == [
        (s.name, s.dtype, s.dims) for s in contract.outputs
    ]
    assert config.model_transaction_policy.decoupled == contract.decoupled
    controls = [c.name for c in config.sequence_batching.control_input]
    assert controls == list(contract.controls)


def test_profiles_differ_where_they_should(tmp_path: Path) -> None:
    render(REPOSITORY, tmp_path / "gpu", "gpu")
    for model in MODELS:
        cpu, gpu = (
            parse(REPOSITORY / model / "config.pbtxt"),
            parse(tmp_path / "gpu" / model / "config.pbtxt"),
        )
        assert {g.kind for g in cpu.instance_group} == {
            model_config_pb2.ModelInstanceGroup.KIND_CPU
        }
        assert {g.kind for g in gpu.instance_group} == {
            model_config_pb2.ModelInstanceGroup.KIND_GPU
        }
    vision = parse(tmp_path / "gpu" / "vision_encoder" / "config.pbtxt")
    assert vision.platform == "tensorrt_plan" and not vision.backend and not vision.parameters
    assert parse(tmp_path / "gpu" / "llm" / "config.pbtxt").backend == "python"
    assert (tmp_path / "gpu" / "llm" / "1" / "model.py").exists()
    assert not (tmp_path / "gpu" / "vision_encoder" / "1" / "model.py").exists()


def test_cpu_priorities_put_playing_audio_first() -> None:
    """On one saturated host the speech decoder outranks the llm (text runs ahead of audio),
    which outranks encoding uploads."""

    def nice(model: str) -> int:
        parameters = parse(REPOSITORY / model / "config.pbtxt").parameters
        return int(parameters["nice"].string_value) if "nice" in parameters else 0

    assert nice("speech_decoder") < nice("llm") < nice("vision_encoder")


def test_model_files_are_thin() -> None:
    for model in MODELS:
        source = (REPOSITORY / model / "1" / "model.py").read_text()
        assert f"from iomni.triton.models.{model} import TritonPythonModel" in source
        assert len([line for line in source.splitlines() if line.strip()]) <= 4


def test_docs_document_every_tensor() -> None:
    docs = (ROOT / "docs" / "triton.md").read_text()
    for model, contract in CONTRACTS.items():
        section = docs.split(f"### `{model}`", 1)[1].split("###", 1)[0]
        for spec in (*contract.inputs, *contract.outputs):
            dims = "[" + ", ".join(str(d) for d in spec.dims) + "]"
            row = f"| `{spec.name}` | {spec.dtype.removeprefix('TYPE_')} | {dims} |"
            assert row in section, f"{model}: docs/triton.md lacks {row}"
