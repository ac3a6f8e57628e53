"""Speech to talk to the platform with: espeak-ng's voice, as a microphone would send it."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile as sf
import soxr

RATE = 24000  # what the Realtime protocol and the playground use


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def spoken(text: str, rate: int = RATE, words_per_minute: int = 160) -> np.ndarray:
    """espeak-ng's speech of `text` as float32 mono at `rate`, its padding silence cut."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed; run `make setup` (it installs it)")
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", str(words_per_minute), "--stdout", text],
        capture_output=True,
        check=True,
    ).stdout
    samples, source = sf.read(io.BytesIO(wav), dtype="float32")
    voiced = np.flatnonzero(np.abs(samples) > 1e-3)
    samples = samples[voiced[0] : voiced[-1] + 1]
    return soxr.resample(samples, source, rate).astype(np.float32)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


def pcm(samples: np.ndarray) -> bytes:
    """PCM16 little-endian bytes."""
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
