"""HiFT vocoder: structure vs CosyVoice2's hift.pt, output contract, randomness, streaming."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from iomni.model.speech.hift import (
    SMALL_HIFT_CONFIG,
    TINY_HIFT_CONFIG,
    HiFTConfig,
    HiFTGenerator,
    HiFTStreamer,
    sine_excitation,
)

SPF = 480  # samples per 50 Hz mel frame at 24 kHz
CACHE = 8 * SPF  # held-back / cross-faded samples per seam


def _rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mel(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=_seeded(seed))


def _random_hift(config: HiFTConfig, gained: bool, gain: float = 0.8) -> HiFTGenerator:
    """Random weights: every parameter ~ N(0, 0.02) from a local generator.

    `gained` then sets every weight-norm gain g to `gain` (filters of norm 0.8, like a trained
    net rather than 0.02), Snake alpha to its init 1, and the F0 head to ~150 Hz with a mel-
    dependent spread (130-166 Hz), so the voiced path runs. Plain N(0, 0.02) weights give a weak
    (RMS ~0.005) periodic output that hardly depends on the mel (another mel changes it by
    < 0.01 %), which would hide streaming misalignment; the gained net changes by > 100 %.
    """
    model = HiFTGenerator(config).eval()
    generator = _seeded(0)
    with torch.no_grad():
        for param in model.parameters():
            torch.nn.init.normal_(param, std=0.02, generator=generator)
        if gained:
            for name, param in model.named_parameters():
                if name.endswith("original0"):
                    param.fill_(gain)
                elif name.endswith("alpha"):
                    param.fill_(1.0)
            model.f0_predictor.classifier.bias.fill_(150.0)
            model.f0_predictor.classifier.weight.mul_(300.0)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # These tensors are tiny: with 2 OpenMP threads on a busy 2-core box the file ran 100x
    # slower (1.6 s vs 14 ms per tiny 1 s vocode) from thread contention; 1 thread is steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gained() -> HiFTGenerator:
    return _random_hift(TINY_HIFT_CONFIG, gained=True)


# ---------------------------------------------------------------- config and structure


def test_config_round_trip_and_defaults() -> None:
    assert HiFTConfig.from_dict({}) == HiFTConfig()
    raw = HiFTConfig().to_dict()
    assert raw["istft_params"] == {"n_fft": 16, "hop_len": 4}
    assert raw["f0_predictor"] == {"num_class": 1, "in_channels": 80, "cond_channels": 512}
    assert raw["upsample_rates"] == [8, 5, 3]
    assert HiFTConfig.from_dict({**raw, "unknown_key": 1}) == HiFTConfig()
    for config in (TINY_HIFT_CONFIG, SMALL_HIFT_CONFIG):
        assert HiFTConfig.from_dict(config.to_dict()) == config
        assert config.samples_per_frame == SPF
        assert config.in_channels == 80 and config.sampling_rate == 24000
        assert len(config.source_resblock_kernel_sizes) == 3
    assert TINY_HIFT_CONFIG.base_channels == 32
    assert TINY_HIFT_CONFIG.resblock_kernel_sizes == (3,)
    assert TINY_HIFT_CONFIG.f0_predictor.cond_channels == 32
    with pytest.raises(ValueError):
        HiFTConfig(base_channels=36)


def test_full_size_structure_matches_cosyvoice2_hift_pt() -> None:
    with torch.device("meta"):
        model = HiFTGenerator()
    state = model.state_dict()
    assert len(state) == 328
    assert sum(t.numel() for t in state.values()) == 20_821_295
    assert not list(model.buffers())
    shapes = {
        "conv_pre.parametrizations.weight.original1": (512, 80, 7),
        "ups.0.parametrizations.weight.original1": (512, 256, 16),
        "ups.0.parametrizations.weight.original0": (512, 1, 1),  # ConvTranspose: g over in
        "ups.2.parametrizations.weight.original1": (128, 64, 7),
        "source_downs.0.weight": (256, 18, 30),
        "source_downs.1.weight": (128, 18, 6),
        "source_downs.2.weight": (64, 18, 1),
        "source_resblocks.2.convs1.2.parametrizations.weight.original1": (64, 64, 11),
        "source_resblocks.0.activations2.1.alpha": (256,),
        "resblocks.8.convs2.0.parametrizations.weight.original0": (64, 1, 1),
        "resblocks.1.convs1.0.bias": (256,),
        "conv_post.parametrizations.weight.original1": (18, 64, 7),
        "m_source.l_linear.weight": (1, 9),
        "f0_predictor.condnet.0.parametrizations.weight.original1": (512, 80, 3),
        "f0_predictor.condnet.8.bias": (512,),
        "f0_predictor.classifier.weight": (1, 512),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("source_downs" in k and "parametrizations" in k for k in state)


# ---------------------------------------------------------------- output contract


@pytest.mark.parametrize("frames", [1, 7, 50])
def test_output_length_and_dtype(gained: HiFTGenerator, frames: int) -> None:
    speech, source = gained.inference(_mel(frames))
    assert speech.shape == (1, SPF * frames) and speech.dtype == torch.float32
    assert source.shape == (1, 1, SPF * frames) and source.dtype == torch.float32
    assert torch.isfinite(speech).all()


def test_output_is_clamped() -> None:
    loud = _random_hift(TINY_HIFT_CONFIG, gained=True, gain=1.0)  # saturates a few % samples
    speech, _ = loud.inference(_mel(20))
    assert speech.abs().max().item() == pytest.approx(0.99)
    assert (speech.abs() >= 0.99).float().mean() > 0.001


def test_deterministic_and_seed_only_changes_noise(gained: HiFTGenerator) -> None:
    mel = _mel(50)
    state = torch.random.get_rng_state()
    first, source = gained.inference(mel, generator=_seeded(3))
    again, _ = gained.inference(mel, generator=_seeded(3))
    assert torch.equal(first, again)
    assert torch.equal(gained.inference(mel)[0], gained.inference(mel, generator=_seeded(0))[0])
    other, other_source = gained.inference(mel, generator=_seeded(4))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    # Voiced F0: seeds differ only in noise of std 0.003 against sines of 0.1. Measured:
    # 0.3 % relative RMS on the waveform; bound 2 %.
    assert 0 < _rms(first - other) < 0.02 * _rms(first)
    assert 0 < (source - other_source).abs().max() < 0.05


def test_sine_excitation_equals_cosyvoice_sample_level_sinegen2() -> None:
    """Our frame-level SineGen2 equals the literal CosyVoice steps, random initial phase too."""
    generator = _seeded(7)
    f0 = 80 + 200 * torch.rand(2, 12, generator=generator)
    f0[:, 5] = 0.0  # an unvoiced frame in between
    harmonics, sr = 9, 24000
    fn = F.interpolate(f0[:, None], scale_factor=SPF).transpose(1, 2) * torch.arange(1, 10)
    rad = (fn / sr) % 1
    initial = torch.rand(2, harmonics, generator=generator)
    initial[:, 0] = 0
    rad[:, 0, :] = rad[:, 0, :] + initial
    rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / SPF, mode="linear").transpose(1, 2)
    phase = torch.cumsum(rad, dim=1) * 2 * math.pi
    phase = F.interpolate(phase.transpose(1, 2) * SPF, scale_factor=SPF, mode="linear")
    reference = torch.sin(phase).transpose(1, 2)
    ours = sine_excitation(f0, sr, SPF, harmonics)
    assert ours.shape == reference.shape == (2, 12 * SPF, harmonics)
    # float32 phases reach ~2e3 rad, so sin() agrees to ~1e-4.
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=0)


def test_cache_source_overwrites_excitation_start(gained: HiFTGenerator) -> None:
    cache = torch.full((1, 1, CACHE), 0.25)
    _, source = gained.inference(_mel(20), cache_source=cache)
    assert torch.equal(source[..., :CACHE], cache)
    assert not torch.equal(source[..., CACHE : 2 * CACHE], cache)


def test_meta_construction_and_assign_load_give_identical_output(gained: HiFTGenerator) -> None:
    with torch.device("meta"):
        model = HiFTGenerator(TINY_HIFT_CONFIG)
    model.load_state_dict(gained.state_dict(), assign=True)
    model.eval()
    assert parametrize.is_parametrized(model.conv_pre, "weight")
    assert parametrize.is_parametrized(model.ups[0], "weight")
    assert not any(p.is_meta for p in model.parameters())
    assert model.conv_pre.weight.device.type == "cpu"  # the parametrization recomputes on CPU
    mel = _mel(30)
    expected, _ = gained.inference(mel, generator=_seeded(5))
    actual, _ = model.inference(mel, generator=_seeded(5))
    assert torch.equal(actual, expected)


def test_bfloat16_weights_still_give_float32_audio(gained: HiFTGenerator) -> None:
    model = _random_hift(TINY_HIFT_CONFIG, gained=True).to(torch.bfloat16)
    mel = _mel(20)
    speech, _ = model.inference(mel)
    reference, _ = gained.inference(mel)
    assert speech.dtype == torch.float32 and speech.shape == reference.shape
    assert _rms(speech - reference) < 0.5 * _rms(reference)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunks", [[30, 20, 10], [13, 25, 7, 0], [8, 1, 12], [20]])
def test_streamer_emits_exactly_480_samples_per_frame(
    gained: HiFTGenerator, chunks: list[int]
) -> None:
    mel = _mel(sum(chunks))
    streamer = HiFTStreamer(gained)
    emitted, start = [], 0
    for index, size in enumerate(chunks):
        final = index == len(chunks) - 1
        out = streamer.push(mel[..., start : start + size], final=final)
        expected = SPF * size + (CACHE if final else 0) - (CACHE if index == 0 else 0)
        assert out.shape == (1, expected)
        emitted.append(out)
        start += size
    assert torch.cat(emitted, dim=-1).shape[-1] == SPF * sum(chunks)


def test_streamer_rejects_a_too_short_first_chunk(gained: HiFTGenerator) -> None:
    with pytest.raises(ValueError):
        HiFTStreamer(gained).push(_mel(5), final=False)


@pytest.fixture(scope="module")
def streamed_pairs() -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """(streamed in 3 chunks of 50 frames, one-shot) for a 150-frame mel, per weight kind."""
    pairs = {}
    mel = _mel(150, seed=2)
    for gained_weights in (False, True):
        model = _random_hift(TINY_HIFT_CONFIG, gained=gained_weights)
        one_shot = model.inference(mel, generator=_seeded(0))[0][0]
        streamer = HiFTStreamer(model, generator=_seeded(0))
        parts = [streamer.push(mel[..., i : i + 50], final=i == 100) for i in (0, 50, 100)]
        assert [p.shape[-1] for p in parts] == [50 * SPF - CACHE, 50 * SPF, 50 * SPF + CACHE]
        pairs[gained_weights] = (torch.cat(parts, dim=-1)[0], one_shot)
    return pairs


# Bounds from measurements over 4 mel seeds (relative RMS of streamed - one-shot):
#   plain N(0, 0.02): total 2.6 %, away from the cross-fades 0.03 %, inside them 8.0 % (the
#     Hamming pair sums to 1.08, not 1, so the overlap is 8 % loud where both chunks agree);
#   gained: total 6.5-7.0 %, away 5.5-6.0 %, inside 10-17 %. Away from the seams the streamed
#     chunk restarts the sine phase after its 3840 cached source samples (as CosyVoice2 does)
#     and draws other noise, so it is not sample-equal to one-shot; a misaligned cache would
#     give ~100 % (another mel changes the gained net's output by > 100 %).
STREAM_BOUNDS = {False: (0.05, 0.01, 0.12), True: (0.12, 0.10, 0.25)}


@pytest.mark.parametrize("gained_weights", [False, True], ids=["plain", "gained"])
def test_streaming_matches_one_shot(
    streamed_pairs: dict[bool, tuple[torch.Tensor, torch.Tensor]], gained_weights: bool
) -> None:
    streamed, one_shot = streamed_pairs[gained_weights]
    assert streamed.shape == one_shot.shape == (150 * SPF,)
    assert _rms(one_shot) > 1e-4
    total_bound, away_bound, fade_bound = STREAM_BOUNDS[gained_weights]
    diff = streamed - one_shot
    fades = [50 * SPF - CACHE, 100 * SPF - CACHE]  # where each cross-fade starts
    away = torch.ones_like(diff, dtype=torch.bool)
    for start in fades:
        away[start : start + CACHE] = False
        assert _rms(diff[start : start + CACHE]) < fade_bound * _rms(
            one_shot[start : start + CACHE]
        )
    # The first chunk before its cross-fade is vocoded exactly as in one shot.
    torch.testing.assert_close(streamed[: fades[0] - SPF], one_shot[: fades[0] - SPF])
    assert _rms(diff) < total_bound * _rms(one_shot)
    assert _rms(diff[away]) < away_bound * _rms(one_shot[away])


@pytest.mark.parametrize("gained_weights", [False, True], ids=["plain", "gained"])
def test_streaming_has_no_clicks_at_seams(
    streamed_pairs: dict[bool, tuple[torch.Tensor, torch.Tensor]], gained_weights: bool
) -> None:
    streamed, _ = streamed_pairs[gained_weights]
    steps = (streamed[1:] - streamed[:-1]).abs()  # steps[i] = |x[i+1] - x[i]|
    # Seams: where each push's output begins, and where each cross-fade ends.
    fade_starts = [50 * SPF - CACHE, 100 * SPF - CACHE]
    for seam in fade_starts + [s + CACHE for s in fade_starts]:
        jump = steps[seam - 1]
        neighbours = torch.cat([steps[seam - SPF : seam - 2], steps[seam : seam + SPF]])
        # Measured jump / median neighbouring step <= 1.9 (gained), 0.24 (plain); bound 4.
        assert jump <= 4 * neighbours.median(), seam
        assert jump <= neighbours.max(), seam


def test_streamer_passes_mel_and_source_caches(
    gained: HiFTGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    inference = gained.inference

    def spy(
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        speech, source = inference(mel, cache_source, generator)
        calls.append((mel, cache_source, source))
        return speech, source

    monkeypatch.setattr(gained, "inference", spy)
    mel = _mel(60)
    streamer = HiFTStreamer(gained)
    streamer.push(mel[..., :30], final=False)
    streamer.push(mel[..., 30:], final=True)
    (mel0, cache0, source0), (mel1, cache1, _) = calls
    assert cache0 is None and torch.equal(mel0, mel[..., :30])
    assert torch.equal(mel1, mel[..., 22:])  # 8 cached frames + the new chunk
    assert cache1 is not None and torch.equal(cache1, source0[..., -CACHE:])
