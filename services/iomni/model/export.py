"""ONNX exports of the vision and audio encoders, the inputs of the GPU profile's TensorRT engines.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. torch 2.13 still ships
it, it needs no onnxscript, and its tracer records tensor sizes as graph values, so the audio
graph's frame-dependent arithmetic (position-table slice, `tokens_after_pooling` truncation)
stays symbolic and one graph serves every window length up to 30 s. Python-side checks that the
tracer freezes (the 30 s limit, transformers' `is_causal` test) are constant for every legal
input; the TensorRT profile's max shape enforces the 30 s limit on GPU.

Graphs (float32 in and out, whatever the checkpoint's dtype; `trtexec --fp16` picks precision):

- `vision_encoder.onnx`: `PIXEL_VALUES` [batch, 3, 448, 448] -> `IMAGE_EMBEDS`
  [batch, num_image_token, H]: ViT up to `select_layer`, pixel shuffle, `mlp1`
  (= `InteractiveOmniModel.encode_images`).
- `audio_encoder.onnx`: `MEL` [batch, 128, frames] -> `AUDIO_EMBEDS`
  [batch, tokens_after_pooling(frames), H]: Whisper encoder, 2x pooling, `mlp2`
  (= `encode_audio` on a batch of equal-length windows).

Graphs whose weights exceed protobuf's 2 GiB (Whisper-large-v3's encoder in float32) keep their
weights in one `<name>.onnx.data` file beside the graph; trtexec and onnxruntime read it from there.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from iomni.model.checkpoint import load_checkpoint
from iomni.model.config import InteractiveOmniConfig
from iomni.model.vision import encode_tiles

VISION_INPUT, VISION_OUTPUT = "PIXEL_VALUES", "IMAGE_EMBEDS"
AUDIO_INPUT, AUDIO_OUTPUT = "MEL", "AUDIO_EMBEDS"
IMAGE_SIZE = 448
MEL_BINS = 128
MAX_MEL_FRAMES = 3000  # one 30 s Whisper window
ONNX_FILES = {"vision_encoder": "vision_encoder.onnx", "audio_encoder": "audio_encoder.onnx"}
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
_INLINE_WEIGHT_LIMIT = (2 << 30) - (64 << 20)


class VisionEncoder(nn.Module):
    """`encode_images` as a module; attribute names keep the checkpoint's keys in the graph."""

    def __init__(self, vision_model: nn.Module, mlp1: nn.Module, config: InteractiveOmniConfig):
        super().__init__()
        self.vision_model = vision_model
        self.mlp1 = mlp1
        self.config = config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_tiles(self.vision_model, self.mlp1, self.config, pixel_values)


class AudioEncoder(nn.Module):
    """`encode_audio` for one batch of equal-length windows (what `encode_windows` batches)."""

    def __init__(self, audio_model: nn.Module, mlp2: nn.Module):
        super().__init__()
        self.audio_model = audio_model
        self.mlp2 = mlp2

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.mlp2(self.audio_model(mel))


def export_vision_onnx(checkpoint_dir: Path, out: Path, opset: int = 17) -> Path:
    """Write the vision encoder graph to `out`; returns `out`."""
    model = load_checkpoint(checkpoint_dir, dtype=torch.float32, parts=("vision",)).model
    module = VisionEncoder(model.vision_model, model.mlp1, model.config).eval()
    # Batch 2, not 1: a traced batch of 1 invites size-1 specialisation in exported ops.
    example = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    axes = {VISION_INPUT: {0: "batch"}, VISION_OUTPUT: {0: "batch"}}
    return _export(module, example, out, VISION_INPUT, VISION_OUTPUT, axes, opset)


def export_audio_onnx(checkpoint_dir: Path, out: Path, opset: int = 17) -> Path:
    """Write the audio encoder graph to `out`; returns `out`."""
    model = load_checkpoint(checkpoint_dir, dtype=torch.float32, parts=("audio",)).model
    module = AudioEncoder(model.audio_model, model.mlp2).eval()
    # A frame count that matches no model dimension, so no size is mistaken for a constant.
    example = torch.randn(2, MEL_BINS, 400)
    axes = {AUDIO_INPUT: {0: "batch", 2: "frames"}, AUDIO_OUTPUT: {0: "batch", 1: "tokens"}}
    return _export(module, example, out, AUDIO_INPUT, AUDIO_OUTPUT, axes, opset)


def export_encoders(checkpoint_dir: Path, out_dir: Path, opset: int = 17) -> dict[str, Path]:
    """Both encoders into `out_dir` under the names the TensorRT build script expects."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "vision_encoder": export_vision_onnx(
            checkpoint_dir, out_dir / ONNX_FILES["vision_encoder"], opset
        ),
        "audio_encoder": export_audio_onnx(
            checkpoint_dir, out_dir / ONNX_FILES["audio_encoder"], opset
        ),
    }


def _export(
    module: nn.Module,
    example: torch.Tensor,
    out: Path,
    input_name: str,
    output_name: str,
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Export into a scratch dir: a >2 GiB export scatters one file per tensor, with generic
    # names that would collide between the two encoders; `save_onnx` then writes one sidecar.
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch, warnings.catch_warnings():
        # Frozen Python checks are intended (see module docstring); the legacy exporter's
        # deprecation notice is known.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = Path(scratch) / out.name
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        save_onnx(onnx.load(str(raw)), out)
    return out


def save_onnx(model: onnx.ModelProto, out: Path, external: bool | None = None) -> Path:
    """Save `model`; weights go to one `<out>.data` file when they would not fit inline
    (`external=None`) or when asked."""
    out = Path(out)
    if external is None:
        external = _weight_bytes(model) > _INLINE_WEIGHT_LIMIT
    sidecar = out.with_name(out.name + ".data")
    sidecar.unlink(missing_ok=True)  # onnx appends to an existing sidecar
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=sidecar.name,
    )
    return out


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iomni.model.export",
        description="Export the vision and audio encoders of a checkpoint to ONNX.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="where to write the .onnx files")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    for name, path in export_encoders(args.checkpoint, args.out_dir, args.opset).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
