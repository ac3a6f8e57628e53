"""HiFT vocoder: CosyVoice2's `HiFTGenerator` (80-bin mel at 50 Hz -> 24 kHz waveform).

Structure (parts.md §3): a `ConvRNNF0Predictor` estimates F0 per mel frame; a neural-source-filter
`SourceModuleHnNSF` with SineGen2 turns it into a sample-rate excitation; the generator upsamples
the mel (8x5x3), fuses the excitation's STFT at each stage, and predicts an 18-channel
magnitude/phase spectrogram that an iSTFT (n_fft 16, hop 4) turns into 480 samples per frame.

Module and parameter names match CosyVoice2's `hift.pt` (weight norm through
`torch.nn.utils.parametrizations`), so its state dict loads as is. There are no buffers: the
checkpoint loader builds the model on the meta device and assigns weights, so the STFT window is
made lazily on first use. `HiFTStreamer` is CosyVoice2's mel-cache / source-cache / cross-fade
glue for vocoding consecutive mel chunks (parts.md §3.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


@dataclass(frozen=True)
class F0PredictorConfig:
    """`ConvRNNF0Predictor` sizes (`hifigan_config["f0_predictor"]`)."""

    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> F0PredictorConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in (raw or {}).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _dilations(raw: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in row) for row in raw)


@dataclass(frozen=True)
class HiFTConfig:
    """`hifigan_config` in the checkpoint's config.json; defaults are CosyVoice2's 24 kHz HiFT."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16  # istft_params.n_fft
    hop_len: int = 4  # istft_params.hop_len
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = field(default_factory=F0PredictorConfig)

    def __post_init__(self) -> None:
        stages = len(self.upsample_rates)
        if len(self.upsample_kernel_sizes) != stages:
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.source_resblock_kernel_sizes) != stages:
            raise ValueError("need one source resblock per upsample stage")
        if len(self.source_resblock_dilation_sizes) != stages:
            raise ValueError("need one source resblock dilation list per upsample stage")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.base_channels % (2**stages):
            raise ValueError(f"base_channels must be divisible by 2^{stages}")
        if self.f0_predictor.in_channels != self.in_channels:
            raise ValueError("f0_predictor.in_channels must equal in_channels")

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame: prod(upsample_rates) * hop_len (480 at 24 kHz)."""
        return math.prod(self.upsample_rates) * self.hop_len

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HiFTConfig:
        """Read the JSON layout; unknown keys are ignored, missing ones take CosyVoice2 values."""
        kw: dict[str, Any] = {}
        for name in ("in_channels", "base_channels", "nb_harmonics", "sampling_rate"):
            if name in raw:
                kw[name] = int(raw[name])
        for name in ("nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope"):
            if name in raw:
                kw[name] = float(raw[name])
        if "audio_limit" in raw:
            kw["audio_limit"] = float(raw["audio_limit"])
        for name in (
            "upsample_rates",
            "upsample_kernel_sizes",
            "resblock_kernel_sizes",
            "source_resblock_kernel_sizes",
        ):
            if name in raw:
                kw[name] = tuple(int(v) for v in raw[name])
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            if name in raw:
                kw[name] = _dilations(raw[name])
        istft = raw.get("istft_params") or {}
        if "n_fft" in istft:
            kw["n_fft"] = int(istft["n_fft"])
        if "hop_len" in istft:
            kw["hop_len"] = int(istft["hop_len"])
        if "f0_predictor" in raw:
            kw["f0_predictor"] = F0PredictorConfig.from_dict(raw["f0_predictor"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout `from_dict` reads (lists, nested `istft_params` and `f0_predictor`)."""
        return {
            "in_channels": self.in_channels,
            "base_channels": self.base_channels,
            "nb_harmonics": self.nb_harmonics,
            "sampling_rate": self.sampling_rate,
            "nsf_alpha": self.nsf_alpha,
            "nsf_sigma": self.nsf_sigma,
            "nsf_voiced_threshold": self.nsf_voiced_threshold,
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "istft_params": {"n_fft": self.n_fft, "hop_len": self.hop_len},
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "source_resblock_kernel_sizes": list(self.source_resblock_kernel_sizes),
            "source_resblock_dilation_sizes": [
                list(d) for d in self.source_resblock_dilation_sizes
            ],
            "lrelu_slope": self.lrelu_slope,
            "audio_limit": self.audio_limit,
            "f0_predictor": self.f0_predictor.to_dict(),
        }


# Test-sized vocoders. Both keep everything that fixes the audio/mel alignment (80 bins, 24 kHz,
# 8x5x3 upsampling, n_fft 16 / hop 4 -> 480 samples per frame) and three source resblocks.
TINY_HIFT_CONFIG = HiFTConfig(
    base_channels=32,
    resblock_kernel_sizes=(3,),
    resblock_dilation_sizes=((1, 3, 5),),
    f0_predictor=F0PredictorConfig(cond_channels=32),
)
SMALL_HIFT_CONFIG = HiFTConfig(
    base_channels=64,
    resblock_kernel_sizes=(3, 7),
    resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
    f0_predictor=F0PredictorConfig(cond_channels=64),
)


def _padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding for an odd kernel."""
    return (kernel_size * dilation - dilation) // 2


def _default_generator() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(0)


class Snake(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha, per-channel alpha on a linear scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        # The 1e-9 guards alpha == 0, as in CosyVoice; the reciprocal is per channel, so cheap.
        return torch.addcmul(x, torch.sin(x * alpha).square(), 1.0 / (alpha + 1e-9))


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations: x += conv2(snake(conv1_d(snake(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(
                nn.Conv1d(
                    channels, channels, kernel_size, dilation=d, padding=_padding(kernel_size, d)
                )
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=_padding(kernel_size)))
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """Five weight-normed k=3 convs with ELU, then |Linear| -> non-negative F0 in Hz per frame."""

    def __init__(self, config: F0PredictorConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = config.in_channels
        for _ in range(5):
            layers.append(weight_norm(nn.Conv1d(channels, config.cond_channels, 3, padding=1)))
            layers.append(nn.ELU())
            channels = config.cond_channels
        self.condnet = nn.Sequential(*layers)  # keys condnet.{0,2,4,6,8}
        self.classifier = nn.Linear(config.cond_channels, config.num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 80, T) -> (B, T)."""
        x = self.condnet(mel).transpose(1, 2)
        return self.classifier(x).squeeze(-1).abs()


def sine_excitation(
    f0: torch.Tensor, sampling_rate: int, upsample: int, harmonics: int
) -> torch.Tensor:
    """SineGen2's harmonic sines (unit amplitude) for frame-level F0 (B, T) -> (B, T*up, H).

    CosyVoice nearest-upsamples F0 to samples, adds a random initial phase to sample 0, then
    linearly downsamples the per-sample phase increment by 1/up. That downsample reads samples
    up*k + up/2 - 1 and up*k + up/2 of block k, which both hold frame k's value, and never
    sample 0, so it equals the frame-level increment and the random phase is discarded. We
    therefore work on frames directly (480x less cumsum work), then upsample the accumulated
    phase linearly exactly as CosyVoice does.
    """
    multiples = torch.arange(1, harmonics + 1, device=f0.device, dtype=f0.dtype)
    rad = (f0[..., None] * multiples / sampling_rate) % 1  # cycles per sample, (B, T, H)
    phase = torch.cumsum(rad, dim=1) * (2 * math.pi)
    phase = F.interpolate(phase.transpose(1, 2) * upsample, scale_factor=upsample, mode="linear")
    return torch.sin(phase).transpose(1, 2)


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise excitation: SineGen2 sines (+ noise), merged by Linear and tanh."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.config = config
        self.l_linear = nn.Linear(config.nb_harmonics + 1, 1)

    def sine_gen(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Frame F0 (B, T) float32 -> SineGen2 output (B, T*480, H): voiced sines plus noise."""
        c = self.config
        up = c.samples_per_frame
        sines = sine_excitation(f0, c.sampling_rate, up, c.nb_harmonics + 1) * c.nsf_alpha
        uv = (f0 > c.nsf_voiced_threshold).to(f0.dtype).repeat_interleave(up, dim=1)[..., None]
        # Voiced samples get faint noise, unvoiced ones noise at a third of the sine amplitude.
        noise_amp = uv * c.nsf_sigma + (1 - uv) * (c.nsf_alpha / 3)
        noise = torch.randn(sines.shape, generator=generator, device=generator.device)
        return sines * uv + noise_amp * noise.to(sines.device)

    def forward(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Frame F0 (B, T) -> excitation (B, 1, T*480) float32."""
        harmonics = self.sine_gen(f0.float(), generator)
        merged = torch.tanh(self.l_linear(harmonics.to(self.l_linear.weight.dtype)))
        return merged.float().transpose(1, 2)


class HiFTGenerator(nn.Module):
    """CosyVoice2's HiFT: mel (B, 80, T) at 50 Hz -> waveform (B, 480*T) at 24 kHz."""

    def __init__(self, config: HiFTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or HiFTConfig()
        self.m_source = SourceModuleHnNSF(config)
        self.conv_pre = weight_norm(nn.Conv1d(config.in_channels, config.base_channels, 7, 1, 3))
        self.ups = nn.ModuleList(self._upsample_layers(config))
        self.source_downs = nn.ModuleList(self._source_down_layers(config))
        self.source_resblocks = nn.ModuleList(
            ResBlock(self._stage_channels(i), k, d)
            for i, (k, d) in enumerate(
                zip(
                    config.source_resblock_kernel_sizes,
                    config.source_resblock_dilation_sizes,
                    strict=True,
                )
            )
        )
        self.resblocks = nn.ModuleList(
            ResBlock(self._stage_channels(i), k, d)
            for i in range(len(config.upsample_rates))
            for k, d in zip(
                config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True
            )
        )
        last = self._stage_channels(len(config.upsample_rates) - 1)
        self.conv_post = weight_norm(nn.Conv1d(last, config.n_fft + 2, 7, 1, 3))
        self.f0_predictor = ConvRNNF0Predictor(config.f0_predictor)
        # Plain attribute, not a buffer: built on first use on the input's device (meta-safe).
        self._window: torch.Tensor | None = None

    def _stage_channels(self, stage: int) -> int:
        return self.config.base_channels // 2 ** (stage + 1)

    def _upsample_layers(self, config: HiFTConfig) -> list[nn.Module]:
        return [
            weight_norm(
                nn.ConvTranspose1d(
                    config.base_channels // 2**i,
                    self._stage_channels(i),
                    k,
                    u,
                    padding=(k - u) // 2,
                )
            )
            for i, (u, k) in enumerate(
                zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)
            )
        ]

    def _source_down_layers(self, config: HiFTConfig) -> list[nn.Module]:
        """Plain convs taking the source STFT (n_fft+2 channels) down to each stage's rate."""
        # Stage i runs at prod(rates[:i+1]) x the mel rate; the STFT at prod(rates); the stride
        # is the ratio (15, 3, 1 at 24 kHz), with kernel 2*stride and padding stride//2.
        rates = config.upsample_rates
        strides = [math.prod(rates[i + 1 :]) for i in range(len(rates))]
        layers: list[nn.Module] = []
        for i, stride in enumerate(strides):
            out = self._stage_channels(i)
            if stride == 1:
                layers.append(nn.Conv1d(config.n_fft + 2, out, 1))
            else:
                layers.append(
                    nn.Conv1d(config.n_fft + 2, out, 2 * stride, stride, padding=stride // 2)
                )
        return layers

    def _stft_window(self, device: torch.device) -> torch.Tensor:
        # Periodic Hann == scipy get_window("hann", n_fft); float32 because STFT runs in float32.
        window = self._window
        if window is None or window.device != device:
            window = torch.hann_window(self.config.n_fft, periodic=True, device=device)
            self._window = window
        return window

    def _stft(self, source: torch.Tensor) -> torch.Tensor:
        """Excitation (B, 1, L) -> [real; imag] (B, n_fft+2, L/hop + 1), center=True."""
        n_fft, hop = self.config.n_fft, self.config.hop_len
        window = self._stft_window(source.device)
        spec = torch.stft(
            source.squeeze(1).float(), n_fft, hop, n_fft, window=window, return_complex=True
        )
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.config.n_fft, self.config.hop_len
        magnitude = magnitude.clamp(max=1e2)  # exp() of a wild logit must not blow up
        spec = torch.polar(magnitude, phase)
        window = self._stft_window(magnitude.device)
        return torch.istft(spec, n_fft, hop, n_fft, window=window)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Mel (B, 80, T) and excitation (B, 1, 480T) -> waveform (B, 480T) float32, clamped."""
        dtype = self.conv_pre.parametrizations.weight.original1.dtype
        s_stft = self._stft(source).to(dtype)
        x = self.conv_pre(mel.to(dtype))
        stages = len(self.ups)
        kernels = len(self.config.resblock_kernel_sizes)
        for i in range(stages):
            x = F.leaky_relu(x, self.config.lrelu_slope)
            x = self.ups[i](x)
            if i == stages - 1:
                # One extra frame on the left so the length matches the STFT's L/hop + 1.
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = sum(self.resblocks[i * kernels + j](x) for j in range(kernels)) / kernels
        x = F.leaky_relu(x)  # default slope 0.01 here, as in CosyVoice
        x = self.conv_post(x).float()
        bins = self.config.n_fft // 2 + 1
        # sin() of the phase logit is redundant for an angle but is what the checkpoint expects.
        speech = self._istft(torch.exp(x[:, :bins]), torch.sin(x[:, bins:]))
        limit = self.config.audio_limit
        return speech.clamp(-limit, limit)

    @torch.inference_mode()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel (B, 80, T) -> (speech (B, 480T) float32, excitation (B, 1, 480T) float32).

        `cache_source` (B, 1, n) replaces the first n excitation samples, as CosyVoice2 does to
        keep the sine phase continuous across streamed chunks. All randomness comes from
        `generator` (default: a fresh one seeded 0), never from the global RNG.
        """
        generator = generator if generator is not None else _default_generator()
        f0 = self.f0_predictor(mel.to(self.f0_predictor.classifier.weight.dtype))
        source = self.m_source(f0, generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            if n > source.shape[-1]:
                raise ValueError(
                    f"cache_source has {n} samples, the excitation only {source.shape[-1]}"
                )
            source[..., :n] = cache_source.to(source)
        return self.decode(mel, source), source


class HiFTStreamer:
    """CosyVoice2's HiFT streaming for consecutive mel chunks of one utterance (parts.md §3.5).

    Each chunk is vocoded with the previous chunk's last 8 mel frames prepended and their
    excitation forced in (`cache_source`), so the overlap sees the same excitation as before
    (after it the chunk's own sine phase restarts, exactly as in CosyVoice2); the first 3840
    samples are cross-faded (Hamming) against the 3840 samples held back from the last push.
    """

    mel_cache_len = 8

    def __init__(self, hift: HiFTGenerator, generator: torch.Generator | None = None) -> None:
        self.hift = hift
        self.generator = generator if generator is not None else _default_generator()
        self.source_cache_len = self.mel_cache_len * hift.config.samples_per_frame  # 3840
        self.window = torch.from_numpy(np.hamming(2 * self.source_cache_len)).float()
        self._reset()

    def _reset(self) -> None:
        self._mel: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._speech: torch.Tensor | None = None

    def _fade(self, speech: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Fade the new chunk in over the held-back tail of the previous one."""
        n = self.source_cache_len
        window = self.window.to(speech.device)
        speech = speech.clone()
        speech[..., :n] = speech[..., :n] * window[:n] + previous[..., -n:] * window[n:]
        return speech

    def push(self, mel_chunk: torch.Tensor, final: bool) -> torch.Tensor:
        """Mel chunk (1, 80, T) -> waveform samples (1, n) ready to emit.

        A non-final push holds back its last 3840 samples for the next cross-fade; the final
        push emits everything and resets the streamer for a new utterance.
        """
        mel = mel_chunk
        if self._mel is not None:
            mel = torch.cat([self._mel.to(mel_chunk), mel_chunk], dim=2)
        if mel.shape[-1] == 0:
            self._reset()
            return mel_chunk.new_zeros(1, 0, dtype=torch.float32)
        if not final and mel.shape[-1] < self.mel_cache_len:
            raise ValueError(f"a non-final first chunk needs >= {self.mel_cache_len} mel frames")
        speech, source = self.hift.inference(mel, self._source, self.generator)
        if self._speech is not None:
            speech = self._fade(speech, self._speech)
        if final:
            self._reset()
            return speech
        self._mel = mel[..., -self.mel_cache_len :]
        self._source = source[..., -self.source_cache_len :]
        self._speech = speech[..., -self.source_cache_len :]
        return speech[..., : -self.source_cache_len]
