"""Image tiling, video frame sampling, audio decoding and Whisper features."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from scipy.signal import resample_poly
from transformers import WhisperFeatureExtractor

from iomni.errors import InvalidInput
from iomni.model import media
from iomni.model.media import (
    AUDIO_WINDOW_SAMPLES,
    AudioFeatureExtractor,
    MediaLimits,
    audio_token_count,
    dynamic_tiles,
    load_audio,
    load_image,
    load_video_frames,
    sample_frame_indices,
    split_audio_windows,
    tiles_to_tensor,
    write_test_video,
)

# ---------------------------------------------------------------------------------------------
# InternVL's reference code, verbatim apart from style, to compare tiling against.


def _ref_closest(
    aspect_ratio: float,
    target_ratios: list[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif (
            ratio_diff == best_ratio_diff
            and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]
        ):
            best_ratio = ratio
    return best_ratio


def _ref_dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target = _ref_closest(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target[0]
    target_height = image_size * target[1]
    blocks = target[0] * target[1]
    resized_img = image.resize((target_width, target_height))
    processed = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed.append(resized_img.crop(box))
    if use_thumbnail and len(processed) != 1:
        processed.append(image.resize((image_size, image_size)))
    return processed


def _gradient(width: int, height: int) -> Image.Image:
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs % 256, ys % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _tone(seconds: float, rate: int = 16_000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize(
    ("size", "kwargs", "expected"),
    [
        ((448, 448), {}, 1),
        ((896, 448), {}, 3),
        ((1000, 300), {"max_num": 6}, 4),  # 3x1 grid + thumbnail
        ((4000, 100), {"max_num": 6}, 7),
        ((3000, 2000), {}, 7),  # exact 3x2 grid + thumbnail
        ((640, 480), {"use_thumbnail": False}, 12),
    ],
)
def test_tile_counts(size: tuple[int, int], kwargs: dict, expected: int) -> None:
    tiles = dynamic_tiles(_gradient(*size), **kwargs)
    assert len(tiles) == expected
    assert all(t.size == (448, 448) for t in tiles)


@pytest.mark.parametrize(
    "size", [(448, 448), (896, 448), (1000, 300), (300, 1000), (1234, 567), (50, 3000), (777, 777)]
)
@pytest.mark.parametrize("max_num", [1, 6, 12])
def test_tiles_match_internvl(size: tuple[int, int], max_num: int) -> None:
    image = _gradient(*size)
    ours = dynamic_tiles(image, max_num=max_num)
    ref = _ref_dynamic_preprocess(image, max_num=max_num, use_thumbnail=True)
    assert len(ours) == len(ref) <= max_num + 1
    for a, b in zip(ours, ref, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_tiling_parameters() -> None:
    with pytest.raises(InvalidInput, match="max_num"):
        dynamic_tiles(_gradient(10, 10), min_num=3, max_num=2)


def test_tensor_normalisation() -> None:
    image = Image.new("RGB", (448, 448), (255, 128, 0))
    tensor = tiles_to_tensor(dynamic_tiles(image))
    assert tensor.shape == (1, 3, 448, 448)
    assert tensor.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        assert torch.allclose(tensor[0, channel], torch.tensor(value), atol=1e-5)


def test_tensor_resizes_odd_tiles() -> None:
    tensor = tiles_to_tensor([Image.new("RGB", (100, 50), (0, 0, 0))] * 2, tile_size=64)
    assert tensor.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_load_image_formats(fmt: str) -> None:
    image = load_image(_encode(_gradient(64, 32), fmt))
    assert image.mode == "RGB" and image.size == (64, 32)


def test_load_image_rgba_becomes_rgb() -> None:
    image = load_image(_encode(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG"))
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"not an image at all",
    ],
)
def test_load_image_undecodable(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="image could not be decoded.*PNG, JPEG"):
        load_image(data)


def test_load_image_truncated() -> None:
    data = _encode(_gradient(256, 256), "PNG")
    with pytest.raises(InvalidInput, match="could not be decoded"):
        load_image(data[: len(data) // 2])


def test_load_image_unsupported_format() -> None:
    # TIFF decodes with PIL but is not an accepted upload format.
    with pytest.raises(InvalidInput, match="unsupported format"):
        load_image(_encode(_gradient(16, 16), "TIFF"))


def test_load_image_limits() -> None:
    data = _encode(_gradient(100, 100), "PNG")
    with pytest.raises(InvalidInput, match="MiB limit"):
        load_image(data, MediaLimits(max_image_bytes=100))
    with pytest.raises(InvalidInput, match="pixel limit"):
        load_image(data, MediaLimits(max_image_pixels=5_000))
    with pytest.raises(InvalidInput, match="image is empty"):
        load_image(b"")


# ---------------------------------------------------------------------------------------------
# Video


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_test_video(path, seconds=2.0, fps=8, size=(160, 120))
    return path.read_bytes()


def _all_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_sample_frame_indices() -> None:
    # InternVL: segments over max_frame = total - 1, middle of each, rounded segment starts.
    assert sample_frame_indices(16, 4) == [1, 5, 9, 12]
    assert sample_frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    assert sample_frame_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(1, 1) == [0]


def test_video_frames(video_bytes: bytes) -> None:
    reference = _all_frames(video_bytes)
    assert len(reference) == 16
    frames = load_video_frames(video_bytes, 4)
    assert len(frames) == 4
    for frame, index in zip(frames, [1, 5, 9, 12], strict=True):
        assert frame.mode == "RGB" and frame.size == (160, 120)
        assert np.array_equal(np.asarray(frame), reference[index])


def test_video_fewer_frames_than_requested(video_bytes: bytes) -> None:
    assert len(load_video_frames(video_bytes, 32)) == 16


def test_video_without_declared_frame_count(
    video_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Containers like WebM do not declare a frame count; the second pass must pick the same.
    monkeypatch.setattr(media, "_declared_frame_count", lambda data: 0)
    frames = load_video_frames(video_bytes, 4)
    reference = _all_frames(video_bytes)
    assert len(frames) == 4
    for frame, index in zip(frames, [1, 5, 9, 12], strict=True):
        assert np.array_equal(np.asarray(frame), reference[index])


def test_video_too_long(video_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInput, match="over the 1 s limit"):
        load_video_frames(video_bytes, 4, MediaLimits(max_video_seconds=1))
    # A container that under-reports its duration is still caught while decoding.
    monkeypatch.setattr(media, "_declared_seconds", lambda container, stream: 0.0)
    with pytest.raises(InvalidInput, match="over the 1 s limit"):
        load_video_frames(video_bytes, 4, MediaLimits(max_video_seconds=1))


def test_video_too_big(video_bytes: bytes) -> None:
    with pytest.raises(InvalidInput, match="MiB limit"):
        load_video_frames(video_bytes, 4, MediaLimits(max_video_bytes=1000))


@pytest.mark.parametrize("cut", [0.1, 0.5])
def test_video_corrupt(video_bytes: bytes, cut: float) -> None:
    with pytest.raises(InvalidInput, match="video could not be decoded"):
        load_video_frames(video_bytes[: int(len(video_bytes) * cut)], 4)
    with pytest.raises(InvalidInput, match="video could not be decoded"):
        load_video_frames(b"\x00\x01garbage" * 50, 4)


def test_video_without_video_stream() -> None:
    with pytest.raises(InvalidInput, match="no video stream"):
        load_video_frames(_wav(_tone(1.0), 16_000), 4)


def test_video_empty_and_bad_count(video_bytes: bytes) -> None:
    with pytest.raises(InvalidInput, match="video is empty"):
        load_video_frames(b"", 4)
    with pytest.raises(InvalidInput, match="at least 1 frame"):
        load_video_frames(video_bytes, 0)


# ---------------------------------------------------------------------------------------------
# Audio


def test_audio_resampled_to_mono_16k() -> None:
    rate = 44_100
    t = np.arange(2 * rate) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 300 * t)], 1)
    samples = load_audio(_wav(stereo, rate, subtype="FLOAT"))
    assert samples.dtype == np.float32 and samples.shape == (32_000,)
    expected = resample_poly(stereo.mean(axis=1), 160, 441)
    assert np.allclose(samples, expected, atol=1e-5)
    assert np.abs(samples).max() <= 1.0


def test_audio_flac_passthrough() -> None:
    tone = _tone(1.0)
    buf = io.BytesIO()
    sf.write(buf, tone, 16_000, format="FLAC")
    samples = load_audio(buf.getvalue())
    assert samples.shape == (16_000,)
    assert np.allclose(samples, tone, atol=1e-4)


@pytest.mark.parametrize("fmt", ["MP3", "OGG"])
def test_audio_compressed_formats(fmt: str) -> None:
    buf = io.BytesIO()
    sf.write(buf, _tone(1.0), 16_000, format=fmt)
    samples = load_audio(buf.getvalue())
    assert abs(len(samples) - 16_000) < 1_200
    assert 0.3 < np.abs(samples).max() <= 1.0


def test_audio_pyav_fallback(tmp_path: Path) -> None:
    path = tmp_path / "tone.m4a"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=48_000)
        frame = av.AudioFrame.from_ndarray(
            _tone(1.0, 48_000)[None, :].copy(), format="fltp", layout="mono"
        )
        frame.sample_rate = 48_000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    samples = load_audio(path.read_bytes())
    # AAC adds encoder priming, so the length is about, not exactly, one second.
    assert 15_000 <= len(samples) <= 17_500
    assert np.abs(samples).max() > 0.3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "audio is empty"),
        (b"this is not audio, just some text bytes " * 20, "audio could not be decoded"),
        (_wav(np.zeros(16_000, dtype=np.float32), 16_000), "audio is silent"),
        (_wav(_tone(0.05), 16_000), "shorter than the 0.1 s minimum"),
        (_wav(np.zeros(0, dtype=np.float32), 16_000), "no samples"),
    ],
)
def test_audio_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_audio(data)


def test_audio_too_long_and_too_big() -> None:
    data = _wav(_tone(2.0), 16_000)
    with pytest.raises(InvalidInput, match="over the 1 s limit"):
        load_audio(data, MediaLimits(max_audio_seconds=1))
    with pytest.raises(InvalidInput, match="MiB limit"):
        load_audio(data, MediaLimits(max_audio_bytes=1000))


def test_audio_non_finite() -> None:
    tone = _tone(1.0)
    tone[100] = np.nan
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        load_audio(_wav(tone, 16_000, subtype="FLOAT"))


def test_audio_token_count() -> None:
    assert audio_token_count(16_000) == 25
    assert audio_token_count(480_000) == 750
    assert audio_token_count(479_999) == 750  # 2999 mel frames still give 1500 after the CNN
    assert audio_token_count(478_880) == 748
    assert audio_token_count(960_000) == 750  # one window at most
    assert audio_token_count(480) == 1
    assert audio_token_count(479) == 0
    assert audio_token_count(0) == 0


def test_split_audio_windows() -> None:
    windows = split_audio_windows(np.zeros(65 * 16_000, dtype=np.float32))
    assert [len(w) for w in windows] == [480_000, 480_000, 80_000]
    # A 100-sample tail gives no token and is dropped; a lone short window is kept.
    assert len(split_audio_windows(np.zeros(AUDIO_WINDOW_SAMPLES + 100))) == 1
    assert [len(w) for w in split_audio_windows(np.zeros(100))] == [100]


def test_features_shape_and_values() -> None:
    extractor = AudioFeatureExtractor()
    window = _tone(1.0)
    features = extractor.window_features(window)
    assert features.shape == (128, 100) and features.dtype == torch.float32
    whisper = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16_000, hop_length=160, chunk_length=30, n_fft=400
    )
    padded = whisper(window, sampling_rate=16_000, return_tensors="np")["input_features"][0]
    assert padded.shape == (128, 3000)
    assert np.array_equal(features.numpy(), padded[:, :100])


def test_features_full_window() -> None:
    features = AudioFeatureExtractor().window_features(_tone(30.0))
    assert features.shape == (128, 3000)
    with pytest.raises(ValueError, match="one 30 s window"):
        AudioFeatureExtractor().window_features(np.zeros(AUDIO_WINDOW_SAMPLES + 1))


def test_feature_extractor_save_and_load(tmp_path: Path) -> None:
    assert AudioFeatureExtractor.from_dir(tmp_path).feature_size == 128  # default when absent
    AudioFeatureExtractor().save(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AudioFeatureExtractor.from_dir(tmp_path)
    assert loaded.feature_size == 128 and loaded.sampling_rate == 16_000
    window = _tone(0.5)
    assert torch.equal(
        loaded.window_features(window), AudioFeatureExtractor().window_features(window)
    )
