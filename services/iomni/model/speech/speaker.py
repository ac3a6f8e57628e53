"""Speaker embeddings: the checkpoint's default voice, or a voice cloned from a reference WAV.

Cloning runs the CAM++ x-vector model (`campplus.onnx` in the checkpoint directory) on
onnxruntime over 80-bin Kaldi fbank features, as CosyVoice's frontend does.
"""

from __future__ import annotations

from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import torch

from iomni.errors import CheckpointError, InvalidInput
from iomni.model.media import MediaLimits, load_audio_with_rate

CAMPPLUS_FILE = "campplus.onnx"
SPEAKER_DIM = 192
REFERENCE_RATE = 16000
MIN_REFERENCE_SECONDS = 1.0
REFERENCE_LIMITS = MediaLimits(max_audio_seconds=60.0, min_audio_seconds=0.0)


def kaldi_fbank(samples: np.ndarray) -> np.ndarray:
    """(T, 80) log-mel fbank, Kaldi defaults, no dither, mean-normalised over time."""
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = REFERENCE_RATE
    options.frame_opts.dither = 0.0
    options.mel_opts.num_bins = 80
    computer = knf.OnlineFbank(options)
    # Kaldi's features are computed on 16-bit integer scale samples.
    computer.accept_waveform(REFERENCE_RATE, (samples * 32768.0).tolist())
    computer.input_finished()
    frames = np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])
    return (frames - frames.mean(axis=0, keepdims=True)).astype(np.float32)


def load_reference(data: bytes) -> np.ndarray:
    """16 kHz mono samples of a speaker reference, with reasons when it cannot be used."""
    try:
        samples, rate = load_audio_with_rate(data, REFERENCE_LIMITS, REFERENCE_RATE)
    except InvalidInput as exc:
        raise InvalidInput(f"speaker reference: {exc.detail}") from exc
    if rate < REFERENCE_RATE:
        raise InvalidInput(
            f"speaker reference is sampled at {rate} Hz; voice cloning needs at least "
            f"{REFERENCE_RATE} Hz audio"
        )
    seconds = len(samples) / REFERENCE_RATE
    if seconds < MIN_REFERENCE_SECONDS:
        raise InvalidInput(
            f"speaker reference is {seconds:.2f} s long; send at least "
            f"{MIN_REFERENCE_SECONDS:.0f} s of clear speech (3-10 s works best)"
        )
    return samples


class SpeakerEncoder:
    """CAM++ on onnxruntime: reference audio -> (192,) x-vector."""

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def from_checkpoint(cls, path: Path) -> SpeakerEncoder:
        onnx_path = path / CAMPPLUS_FILE
        if not onnx_path.exists():
            raise CheckpointError(
                f"voice cloning needs the CAM++ speaker model {CAMPPLUS_FILE} in {path}; it is "
                "not there. Use the default speaker, or add the file from the model release"
            )
        return cls(onnx_path)

    def embed(self, reference: bytes) -> torch.Tensor:
        features = kaldi_fbank(load_reference(reference))[None]
        (embedding,) = self.session.run(None, {self.input_name: features})
        return torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(SPEAKER_DIM))


def write_standin_campplus(path: Path, seed: int = 0) -> None:
    """A random stand-in with CAM++'s contract ((1, T, 80) fbank -> (1, 192)) for generated
    checkpoints: mean and std pooling over time, then a random projection. It is not CAM++."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((160, SPEAKER_DIM)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["input", "mean_b"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "axes"], ["var"], keepdims=0),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Unsqueeze", ["mean", "axes"], ["mean_b"]),
        helper.make_node("Concat", ["mean", "std"], ["stats"], axis=1),
        helper.make_node("MatMul", ["stats", "weight"], ["output"]),
    ]
    nodes = [nodes[0], nodes[5], *nodes[1:5], *nodes[6:]]
    graph = helper.make_graph(
        nodes,
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, SPEAKER_DIM])],
        initializer=[
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
