"""Shared fixtures: one generated `tiny` checkpoint per test session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from iomni.model.checkpoint import LoadedCheckpoint, load_checkpoint
from iomni.model.generate import make_checkpoint
from iomni.model.processor import Processor


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint("tiny", path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> LoadedCheckpoint:
    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def processor(tiny_dir: Path) -> Processor:
    return Processor.from_checkpoint(tiny_dir)


def png_bytes(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wav_bytes(
    seconds: float = 1.0, rate: int = 16000, amplitude: float = 0.3, channels: int = 1
) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format="WAV")
    return buffer.getvalue()
