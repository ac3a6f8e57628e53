"""Decoding and preprocessing of user media: images, video and audio.

Everything here handles untrusted bytes, so every failure becomes `InvalidInput` with a message
the caller can act on. Preprocessing follows InternVL (image tiling, frame sampling) and
InternOmni (Whisper features, audio token counts) so features match what the model was trained on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image
from scipy.signal import resample_poly
from transformers import WhisperFeatureExtractor

from iomni.errors import CheckpointError, InvalidInput

MiB = 1024 * 1024


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    max_video_bytes: int = 200 * MiB
    max_video_seconds: float = 600
    max_audio_bytes: int = 100 * MiB
    max_audio_seconds: float = 600
    min_audio_seconds: float = 0.1


DEFAULT_LIMITS = MediaLimits()


def _check_size(data: bytes, kind: str, limit: int) -> None:
    if not data:
        raise InvalidInput(f"{kind} is empty; send the file's bytes")
    if len(data) > limit:
        raise InvalidInput(
            f"{kind} is {len(data) / MiB:.1f} MiB, over the {limit / MiB:.0f} MiB limit; "
            f"send a smaller {kind}"
        )


# ---------------------------------------------------------------------------------------------
# Images

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_UNDECODABLE_IMAGE = (
    "image could not be decoded (corrupt or unsupported format); send PNG, JPEG, WebP, GIF or BMP"
)


def _too_many_pixels(width: int, height: int, limits: MediaLimits) -> InvalidInput:
    return InvalidInput(
        f"image is {width}x{height} = {width * height} pixels, over the "
        f"{limits.max_image_pixels} pixel limit; downscale it before sending"
    )


def load_image(data: bytes, limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode image bytes into an RGB image (the first frame of an animation)."""
    _check_size(data, "image", limits.max_image_bytes)
    try:
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError as exc:
        raise InvalidInput(
            f"image has too many pixels, over the {limits.max_image_pixels} pixel limit; "
            "downscale it before sending"
        ) from exc
    except Exception as exc:  # PIL raises many unrelated types for bad bytes
        raise InvalidInput(_UNDECODABLE_IMAGE) from exc
    width, height = image.size
    # Checked on the header, before the pixels are decoded, so a bomb costs nothing.
    if width * height > limits.max_image_pixels:
        raise _too_many_pixels(width, height, limits)
    if width < 1 or height < 1:
        raise InvalidInput(f"image is {width}x{height}; it must be at least 1x1 pixels")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data
        raise InvalidInput(_UNDECODABLE_IMAGE) from exc


def _target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    # Built as a set and stably sorted exactly like InternVL: tie order decides some grids.
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(ratios, key=lambda r: r[0] * r[1])


def _closest_aspect_ratio(
    aspect: float, ratios: list[tuple[int, int]], width: int, height: int, tile_size: int
) -> tuple[int, int]:
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * ratio[0] * ratio[1]:
            # Large images prefer the grid with more tiles among equally good shapes.
            best = ratio
    return best


def tile_grid(
    width: int, height: int, *, tile_size: int = 448, min_num: int = 1, max_num: int = 12
) -> tuple[int, int]:
    """The (columns, rows) grid InternVL's dynamic_preprocess picks for an image of this size."""
    if tile_size < 1 or min_num < 1 or max_num < min_num:
        raise InvalidInput(
            f"bad tiling parameters tile_size={tile_size}, min_num={min_num}, max_num={max_num}; "
            "need tile_size >= 1 and 1 <= min_num <= max_num"
        )
    ratios = _target_ratios(min_num, max_num)
    return _closest_aspect_ratio(width / height, ratios, width, height, tile_size)


def dynamic_tiles(
    image: Image.Image,
    *,
    tile_size: int = 448,
    min_num: int = 1,
    max_num: int = 12,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split an image into tiles like InternVL's dynamic_preprocess, thumbnail last."""
    width, height = image.size
    cols, rows = tile_grid(width, height, tile_size=tile_size, min_num=min_num, max_num=max_num)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        left, top = (k % cols) * tile_size, (k // cols) * tile_size
        tiles.append(resized.crop((left, top, left + tile_size, top + tile_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tiles_to_tensor(tiles: list[Image.Image], tile_size: int = 448) -> torch.Tensor:
    """Stack tiles into a float32 (N, 3, tile_size, tile_size) ImageNet-normalised tensor."""
    if not tiles:
        raise ValueError("tiles_to_tensor needs at least one tile")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    arrays = []
    for tile in tiles:
        rgb = tile.convert("RGB")
        if rgb.size != (tile_size, tile_size):
            rgb = rgb.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
        pixels = np.asarray(rgb, dtype=np.float32) / 255.0
        arrays.append(((pixels - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))


# ---------------------------------------------------------------------------------------------
# Video

_UNDECODABLE_VIDEO = (
    "video could not be decoded (corrupt or unsupported format); send MP4, WebM, MOV or MKV"
)


def _too_long(kind: str, seconds: float, limit: float) -> InvalidInput:
    return InvalidInput(
        f"{kind} is {seconds:.1f} s long, over the {limit:g} s limit; send a shorter clip"
    )


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """InternVL's get_index without bounds: the middle frame of num_frames equal segments.

    InternVL measures segments over max_frame = total - 1 and rounds the segment start; both
    are kept so the sampled frames match the reference. With fewer frames than asked, all.
    """
    if num_frames < 1:
        raise InvalidInput(f"num_frames is {num_frames}; ask for at least 1 frame")
    if total <= num_frames:
        return list(range(total))
    seg_size = (total - 1) / num_frames
    indices = [int(seg_size / 2 + np.round(seg_size * k)) for k in range(num_frames)]
    return [min(max(i, 0), total - 1) for i in indices]


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise InvalidInput("file has no video stream; send a video with a picture track")
    return container.streams.video[0]


def _declared_seconds(container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    seconds = 0.0
    if container.duration is not None:
        seconds = container.duration / av.time_base
    if stream.duration is not None and stream.time_base is not None:
        seconds = max(seconds, float(stream.duration * stream.time_base))
    return seconds


def _frames(data: bytes, limits: MediaLimits) -> Iterator[av.VideoFrame]:
    """Decoded frames of the first video stream, enforcing the duration limit as it goes."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = _video_stream(container)
        declared = _declared_seconds(container, stream)
        if declared > limits.max_video_seconds:
            raise _too_long("video", declared, limits.max_video_seconds)
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or 30)
        for count, frame in enumerate(container.decode(stream), start=1):
            # Containers can under-report duration, so the decoded timeline is checked too.
            seconds = frame.time if frame.time is not None else count / fps
            if seconds > limits.max_video_seconds:
                raise _too_long("video", seconds, limits.max_video_seconds)
            yield frame


def _declared_frame_count(data: bytes) -> int:
    with av.open(io.BytesIO(data), mode="r") as container:
        return int(_video_stream(container).frames or 0)


def _pick_frames(
    data: bytes, wanted: set[int], limits: MediaLimits
) -> tuple[dict[int, Image.Image], int]:
    picked: dict[int, Image.Image] = {}
    total = 0
    for index, frame in enumerate(_frames(data, limits)):
        if index in wanted:
            picked[index] = frame.to_image().convert("RGB")
        total = index + 1
    return picked, total


def _decode_video(data: bytes, num_frames: int, limits: MediaLimits) -> list[Image.Image]:
    declared = _declared_frame_count(data)
    # One pass when the container's frame count is right, a second when it was wrong or absent.
    wanted = set(sample_frame_indices(declared, num_frames)) if declared else set()
    picked, total = _pick_frames(data, wanted, limits)
    if total == 0:
        raise InvalidInput("video has no frames; send a video with at least one frame")
    indices = sample_frame_indices(total, num_frames)
    if not set(indices) <= picked.keys():
        picked, total = _pick_frames(data, set(indices), limits)
        indices = sample_frame_indices(total, num_frames)
    return [picked[i] for i in indices]


def load_video_frames(
    data: bytes, num_frames: int, limits: MediaLimits = DEFAULT_LIMITS
) -> list[Image.Image]:
    """Decode a video and return num_frames RGB frames sampled like InternVL."""
    _check_size(data, "video", limits.max_video_bytes)
    if num_frames < 1:
        raise InvalidInput(f"num_frames is {num_frames}; ask for at least 1 frame")
    try:
        return _decode_video(data, num_frames, limits)
    except InvalidInput:
        raise
    except Exception as exc:  # FFmpeg and PyAV raise many types for bad bytes
        raise InvalidInput(_UNDECODABLE_VIDEO) from exc


def write_test_video(
    path: Path, seconds: float = 2.0, fps: int = 8, size: tuple[int, int] = (320, 240)
) -> None:
    """Write a small synthetic MP4 (mpeg4) of coloured shapes moving over a gradient."""
    width, height = size
    num_frames = max(1, round(seconds * fps))
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 96)],
        axis=-1,
    ).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(num_frames):
            frame = _shapes_frame(background, k, num_frames)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _shapes_frame(background: np.ndarray, k: int, num_frames: int) -> np.ndarray:
    frame = background.copy()
    height, width = frame.shape[:2]
    phase = k / max(num_frames - 1, 1)
    side = max(2, min(width, height) // 4)
    x = int(phase * (width - side))
    frame[height // 8 : height // 8 + side, x : x + side] = (230, 40, 40)
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = width - 1 - x - side // 2, height - height // 8 - side // 2
    frame[(xs - cx) ** 2 + (ys - cy) ** 2 < (side // 2) ** 2] = (40, 200, 60)
    return frame


# ---------------------------------------------------------------------------------------------
# Audio

AUDIO_RATE = 16_000
AUDIO_WINDOW_SAMPLES = 480_000  # 30 s at 16 kHz, Whisper's fixed input length
_HOP = 160
_SILENCE_PEAK = 1e-4
_UNDECODABLE_AUDIO = "audio could not be decoded (corrupt or unsupported format); " + (
    "send WAV, FLAC, OGG or MP3"
)


def _decode_soundfile(data: bytes, limits: MediaLimits) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        if f.samplerate > 0 and f.frames / f.samplerate > limits.max_audio_seconds:
            raise _too_long("audio", f.frames / f.samplerate, limits.max_audio_seconds)
        samples = f.read(dtype="float32", always_2d=True)
        return samples.T, f.samplerate


def _decode_pyav(data: bytes, limits: MediaLimits) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise InvalidInput(_UNDECODABLE_AUDIO)
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        if declared > limits.max_audio_seconds:
            raise _too_long("audio", declared, limits.max_audio_seconds)
        rate = stream.rate
        # Planar float keeps every channel; mixing down is done the same way for all decoders.
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        decoded = 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunk = out.to_ndarray()
                chunks.append(chunk)
                decoded += chunk.shape[1]
            if rate and decoded / rate > limits.max_audio_seconds:
                raise _too_long("audio", decoded / rate, limits.max_audio_seconds)
        chunks.extend(out.to_ndarray() for out in resampler.resample(None))
    if not chunks or not rate:
        return np.zeros((1, 0), dtype=np.float32), rate or AUDIO_RATE
    return np.concatenate(chunks, axis=1).astype(np.float32), rate


def _decode_audio(data: bytes, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 and the sample rate; soundfile first, PyAV for the rest."""
    try:
        return _decode_soundfile(data, limits)
    except InvalidInput:
        raise
    except Exception:  # not a libsndfile format; m4a, webm and friends go through FFmpeg
        pass
    try:
        return _decode_pyav(data, limits)
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(_UNDECODABLE_AUDIO) from exc


def _check_samples(channels: np.ndarray, rate: int, limits: MediaLimits) -> None:
    if channels.size == 0:
        raise InvalidInput("audio has no samples; send a recording of at least a few seconds")
    if not np.isfinite(channels).all():
        raise InvalidInput("audio contains NaN or infinite samples; re-encode it as PCM WAV")
    seconds = channels.shape[1] / rate
    if seconds > limits.max_audio_seconds:
        raise _too_long("audio", seconds, limits.max_audio_seconds)
    if seconds < limits.min_audio_seconds:
        raise InvalidInput(
            f"audio is {seconds:.3f} s long, shorter than the {limits.min_audio_seconds:g} s "
            "minimum; send a longer recording"
        )
    peak = float(np.abs(channels).max())
    if peak < _SILENCE_PEAK:
        raise InvalidInput(
            f"audio is silent (peak amplitude {peak:.2e}); check the microphone input"
        )


def load_audio(
    data: bytes, limits: MediaLimits = DEFAULT_LIMITS, target_rate: int = AUDIO_RATE
) -> np.ndarray:
    """Decode audio bytes into float32 mono samples in [-1, 1] at target_rate."""
    return load_audio_with_rate(data, limits, target_rate)[0]


def load_audio_with_rate(
    data: bytes, limits: MediaLimits = DEFAULT_LIMITS, target_rate: int = AUDIO_RATE
) -> tuple[np.ndarray, int]:
    """Like `load_audio`, also returning the sample rate the file was recorded at."""
    _check_size(data, "audio", limits.max_audio_bytes)
    channels, rate = _decode_audio(data, limits)
    if rate <= 0:
        raise InvalidInput(_UNDECODABLE_AUDIO)
    _check_samples(channels, rate, limits)
    mono = channels.mean(axis=0, dtype=np.float64)
    if rate != target_rate:
        g = math.gcd(target_rate, rate)
        mono = resample_poly(mono, target_rate // g, rate // g)
    # Resampling can overshoot near full scale; the encoder expects [-1, 1].
    return np.clip(mono, -1.0, 1.0).astype(np.float32), rate


def audio_token_count(num_samples: int) -> int:
    """AUDIO_CONTEXT tokens InternOmni spends on one window of num_samples (16 kHz) samples."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    mel_len = min(num_samples, AUDIO_WINDOW_SAMPLES) // _HOP
    len_after_cnn = (mel_len - 1) // 2 + 1
    return max(0, (len_after_cnn - 2) // 2 + 1)


def split_audio_windows(samples: np.ndarray) -> list[np.ndarray]:
    """Consecutive 30 s windows; a tail too short for one token is dropped unless it is all."""
    windows = [
        samples[start : start + AUDIO_WINDOW_SAMPLES]
        for start in range(0, len(samples), AUDIO_WINDOW_SAMPLES)
    ]
    if len(windows) > 1 and audio_token_count(len(windows[-1])) == 0:
        windows.pop()
    return windows


class AudioFeatureExtractor:
    """Whisper log-mel features for one window, trimmed to the window's length like InternOmni."""

    def __init__(self, extractor: WhisperFeatureExtractor | None = None) -> None:
        self._fe = extractor or WhisperFeatureExtractor(
            feature_size=128,
            sampling_rate=AUDIO_RATE,
            hop_length=_HOP,
            chunk_length=30,
            n_fft=400,
        )

    @classmethod
    def from_dir(cls, path: Path) -> AudioFeatureExtractor:
        path = Path(path)
        if not (path / "preprocessor_config.json").is_file():
            return cls()
        try:
            fe = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # a broken config is a checkpoint problem, not a request one
            raise CheckpointError(
                f"{path / 'preprocessor_config.json'} could not be loaded: {exc}"
            ) from exc
        return cls(fe)

    @property
    def sampling_rate(self) -> int:
        return int(self._fe.sampling_rate)

    @property
    def feature_size(self) -> int:
        return int(self._fe.feature_size)

    def window_features(self, window: np.ndarray) -> torch.Tensor:
        """float32 (feature_size, len(window) // hop) log-mel features of one window."""
        if not 0 < len(window) <= self._fe.n_samples:
            raise ValueError(
                f"window has {len(window)} samples; need 1..{self._fe.n_samples} (one 30 s window)"
            )
        mel_len = len(window) // self._fe.hop_length
        # The padded 30 s input is what Whisper normalises over; trimming comes after.
        features = self._fe(
            np.asarray(window, dtype=np.float32),
            sampling_rate=self._fe.sampling_rate,
            return_tensors="np",
        )["input_features"][0]
        return torch.from_numpy(np.ascontiguousarray(features[:, :mel_len], dtype=np.float32))

    def save(self, out_dir: Path) -> None:
        """Write preprocessor_config.json into out_dir."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._fe.save_pretrained(str(out_dir))
