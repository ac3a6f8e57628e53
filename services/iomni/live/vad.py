"""Voice activity on a live 16 kHz stream: Silero VAD (the `silero-vad` wheel's ONNX model) on
onnxruntime, one 32 ms frame at a time.

One ONNX session serves every stream of the process; each stream keeps its own recurrent state
and context in a `silero_vad` `OnnxWrapper` that borrows that session.
"""

from __future__ import annotations

import threading
from importlib.resources import files
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # what Silero takes at 16 kHz: 32 ms
FRAME_MS = FRAME_SAMPLES * 1000 // SAMPLE_RATE

_shared: dict[str, Any] = {}
_lock = threading.Lock()


def _wrapper_class() -> type:
    threads = torch.get_num_threads()
    try:
        from silero_vad.utils_vad import OnnxWrapper
    finally:
        torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread
    return OnnxWrapper


def _session() -> Any:
    """The process's one ONNX session (built by silero_vad's own wrapper, threads limited)."""
    with _lock:
        if "session" not in _shared:
            wrapper = _wrapper_class()
            path = str(files("silero_vad.data").joinpath("silero_vad.onnx"))
            _shared["class"] = wrapper
            _shared["session"] = wrapper(path, force_onnx_cpu=True).session
        return _shared["session"]


class VoiceActivity:
    """Speech probability per 32 ms frame of one stream. Feed 16 kHz float32 mono samples in
    chunks of any size; full frames come back with their probability, the rest waits."""

    def __init__(self) -> None:
        session = _session()
        model = _shared["class"].__new__(_shared["class"])
        model.session = session
        model.sample_rates = [SAMPLE_RATE]
        model.reset_states()
        self._model = model
        self._carry = np.zeros(0, dtype=np.float32)

    def push(self, samples: np.ndarray) -> list[tuple[np.ndarray, float]]:
        data = np.concatenate([self._carry, samples.astype(np.float32, copy=False)])
        count = len(data) // FRAME_SAMPLES
        self._carry = data[count * FRAME_SAMPLES :]
        out = []
        for i in range(count):
            frame = data[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]
            probability = float(self._model(torch.from_numpy(frame), SAMPLE_RATE).item())
            out.append((frame, probability))
        return out

    def reset(self) -> None:
        self._model.reset_states()
        self._carry = np.zeros(0, dtype=np.float32)
