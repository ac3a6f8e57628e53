"""Flow matching: CosyVoice2's `CausalMaskedDiffWithXvec` (speech tokens + x-vector -> 80-bin mel).

Pipeline (research/parts.md §2): token embedding -> `UpsampleConformerEncoder` (25 Hz tokens to
50 Hz frames) -> `encoder_proj` gives `mu` -> `CausalConditionalCFM`, 10 Euler steps of a causal
U-Net-like estimator with classifier-free guidance, starting from a fixed noise tensor.

Streaming works by recomputation: every call runs over all tokens so far. Attention is
chunk-causal (25 tokens in `encoders`, 50 frames in `up_encoders` and the estimator), every
convolution is causal except the look-ahead one, and the noise is fixed, so frames of finished
chunks come out the same as in a single run over the whole utterance.

The module registers no buffers: models are built on the meta device and get their weights with
`load_state_dict(assign=True)`, so everything derived (noise, position tables, time-embedding
frequencies) is computed on first use and cached as a plain attribute per device and dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NOISE_FRAMES = 15000  # CosyVoice2's fixed noise covers 300 s of mel at 50 Hz
NOISE_SEED = 0
ESTIMATOR_MASK_BIAS = -1.0e10  # CosyVoice2's `mask_to_bias` value for blocked positions


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class EncoderConfig:
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4
    static_chunk_size: int = 25  # tokens


@dataclass
class CFMParams:
    sigma_min: float = 1e-6  # training only
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10


@dataclass
class EstimatorConfig:
    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    static_chunk_size: int = 50  # mel frames


def _pick(cls: type, raw: dict[str, Any] | None) -> Any:
    """Build dataclass `cls` from the keys of `raw` it knows; others are ignored."""
    raw = raw or {}
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in raw.items() if k in known}
    if "channels" in kwargs:
        kwargs["channels"] = tuple(int(c) for c in kwargs["channels"])
    return cls(**kwargs)


@dataclass
class FlowConfig:
    """Flow settings in the layout of IO's flow config; defaults are CosyVoice2's yaml."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    cfm: CFMParams = field(default_factory=CFMParams)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FlowConfig:
        top = {k: v for k, v in raw.items() if k not in ("encoder_config", "decoder_config")}
        decoder = raw.get("decoder_config") or {}
        config = _pick(cls, top)
        config.encoder = _pick(EncoderConfig, raw.get("encoder_config"))
        config.cfm = _pick(CFMParams, decoder.get("cfm_params"))
        config.estimator = _pick(EstimatorConfig, decoder.get("estimator"))
        return config

    def to_dict(self) -> dict[str, Any]:
        top = {f.name: getattr(self, f.name) for f in fields(self)}
        for nested in ("encoder", "cfm", "estimator"):
            top.pop(nested)
        estimator = asdict(self.estimator)
        estimator["channels"] = list(self.estimator.channels)
        return {
            **top,
            "encoder_config": asdict(self.encoder),
            "decoder_config": {"cfm_params": asdict(self.cfm), "estimator": estimator},
        }

    def validate(self) -> None:
        """Reject settings this implementation (or CosyVoice2's layout) cannot build."""
        est, enc = self.estimator, self.encoder
        if est.in_channels != 4 * self.output_size or est.out_channels != self.output_size:
            raise ValueError(
                "estimator in/out channels must be 4x / 1x output_size (x|mu|spk|cond)"
            )
        if len(est.channels) != 1:
            raise ValueError("only a single estimator stage (channels=[C]) is supported")
        if enc.output_size % enc.attention_heads:
            raise ValueError("encoder output_size must be divisible by attention_heads")
        if self.cfm.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"unknown t_scheduler {self.cfm.t_scheduler!r}")


# CosyVoice2 widths shrunk for unit tests (~0.75 M parameters, mostly the token embedding).
TINY_FLOW_CONFIG: dict[str, Any] = {
    "input_size": 64,
    "output_size": 80,
    "spk_embed_dim": 192,
    "vocab_size": 6561,
    "input_frame_rate": 25,
    "token_mel_ratio": 2,
    "pre_lookahead_len": 3,
    "encoder_config": {
        "output_size": 64,
        "attention_heads": 2,
        "linear_units": 128,
        "num_blocks": 1,
        "num_up_blocks": 1,
        "static_chunk_size": 25,
    },
    "decoder_config": {
        "cfm_params": {
            "sigma_min": 1e-6,
            "t_scheduler": "cosine",
            "inference_cfg_rate": 0.7,
            "n_timesteps": 10,
        },
        "estimator": {
            "in_channels": 320,
            "out_channels": 80,
            "channels": [32],
            "attention_head_dim": 16,
            "n_blocks": 1,
            "num_mid_blocks": 1,
            "num_heads": 2,
            "static_chunk_size": 50,
        },
    },
}

# A CPU-friendly size for demos and integration tests (~7 M parameters).
SMALL_FLOW_CONFIG: dict[str, Any] = {
    **TINY_FLOW_CONFIG,
    "input_size": 192,
    "encoder_config": {
        "output_size": 192,
        "attention_heads": 4,
        "linear_units": 768,
        "num_blocks": 3,
        "num_up_blocks": 2,
        "static_chunk_size": 25,
    },
    "decoder_config": {
        "cfm_params": dict(TINY_FLOW_CONFIG["decoder_config"]["cfm_params"]),
        "estimator": {
            "in_channels": 320,
            "out_channels": 80,
            "channels": [128],
            "attention_head_dim": 32,
            "n_blocks": 1,
            "num_mid_blocks": 4,
            "num_heads": 4,
            "static_chunk_size": 50,
        },
    },
}


# ---------------------------------------------------------------------------------------------
# Shared helpers


def chunk_mask(size: int, chunk: int, device: torch.device) -> torch.Tensor:
    """(size, size) bool, True = may attend: i sees every j < (i // chunk + 1) * chunk.

    Full left context: CosyVoice2's current `subsequent_chunk_mask` ignores `num_left_chunks`.
    """
    idx = torch.arange(size, device=device)
    return idx[None, :] < (idx[:, None] // chunk + 1) * chunk


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL shift: (..., L, 2L-1) scores per table row -> (..., L, L) per (i, j).

    Row r of the ESPnet table is relative position L-1-r, so out[i, j] = x[i, L-1-i+j], the
    score for relative position i-j.
    """
    *lead, length, width = x.shape
    padded = F.pad(x, (1, 0)).reshape(*lead, width + 1, length)
    return padded[..., 1:, :].reshape(*lead, length, width)[..., : width // 2 + 1]


@functools.cache
def _cpu_noise(channels: int) -> torch.Tensor:
    """CosyVoice2's `rand_noise`: the first randn after seeding 0, drawn on CPU in float32.

    A private generator gives the same numbers as `set_all_random_seed(0)` without touching
    the global RNG.
    """
    with torch.inference_mode(False):
        generator = torch.Generator(device="cpu").manual_seed(NOISE_SEED)
        return torch.randn([1, channels, NOISE_FRAMES], generator=generator, device="cpu")


class Transpose(nn.Module):
    """Swap two dims; a module so that `Sequential` indices match CosyVoice2's keys."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dims = (dim0, dim1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(*self.dims)


# ---------------------------------------------------------------------------------------------
# Encoder: UpsampleConformerEncoder


class LinearEmbed(nn.Module):
    """`LinearNoSubsampling` + `EspnetRelPositionalEncoding`: Linear, LayerNorm, x * sqrt(d)."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.dim = odim
        self.xscale = math.sqrt(odim)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale

    def rel_pos(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """(1, 2L-1, d) sinusoidal table for relative positions L-1 ... -(L-1)."""
        key = (like.device, like.dtype)
        table = self._tables.get(key)
        if table is None or table.shape[1] < 2 * length - 1:
            # Grow in powers of two; rows only depend on the relative position, so any slice
            # of a larger table equals the table built for that length.
            size = max(256, 1 << (length - 1).bit_length())
            table = self._build(size).to(device=like.device, dtype=like.dtype)
            self._tables[key] = table
        center = table.shape[1] // 2
        return table[:, center - length + 1 : center + length]

    def _build(self, size: int) -> torch.Tensor:
        with torch.inference_mode(False):
            position = torch.arange(size, dtype=torch.float32)[:, None]
            step = torch.arange(0, self.dim, 2, dtype=torch.float32)
            div_term = torch.exp(step * -(math.log(10000.0) / self.dim))
            positive = torch.zeros(size, self.dim)
            negative = torch.zeros(size, self.dim)
            positive[:, 0::2] = torch.sin(position * div_term)
            positive[:, 1::2] = torch.cos(position * div_term)
            negative[:, 0::2] = torch.sin(-position * div_term)
            negative[:, 1::2] = torch.cos(-position * div_term)
            return torch.cat([positive.flip(0), negative[1:]], dim=0)[None]


class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet/WeNet relative-position self-attention with learned biases u and v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d_k = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_k)

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, L, d), pos_emb (1, 2L-1, d), mask (L, L) bool or None -> (B, L, d)."""
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x)).transpose(1, 2)
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self._heads(self.linear_pos(pos_emb)).transpose(1, 2)
        content = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
        position = rel_shift((q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1))
        scores = (content + position) / math.sqrt(self.d_k)
        if mask is None:
            attn = scores.softmax(dim=-1)
        else:
            blocked = ~mask
            attn = scores.masked_fill(blocked, -math.inf).softmax(dim=-1).masked_fill(blocked, 0)
        out = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerEncoderLayer(nn.Module):
    """Pre-LN block without macaron FFN or conv module: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(dim, heads)
        self.feed_forward = PositionwiseFeedForward(dim, hidden)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_emb, mask)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Each token sees the next `lookahead` tokens once (conv1), then a causal conv (conv2)."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, C); context (B, lookahead, C) embedded look-ahead tokens, or None = zeros."""
        out = x.transpose(1, 2)
        if context is not None:
            out = torch.cat([out, context.transpose(1, 2)], dim=2)
        # Pad to L + lookahead so conv1 yields L outputs; a final chunk is padded with zeros.
        out = F.pad(out, (0, x.shape[1] + self.lookahead - out.shape[2]))
        out = F.leaky_relu(self.conv1(out), negative_slope=0.01)
        out = self.conv2(F.pad(out, (self.conv2.kernel_size[0] - 1, 0)))
        return out.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest-neighbour x`stride` along time, then a causal conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, C, stride*L)."""
        out = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(out, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, input_size: int, config: EncoderConfig, lookahead: int, stride: int) -> None:
        super().__init__()
        dim, heads, hidden = config.output_size, config.attention_heads, config.linear_units
        self.chunk = config.static_chunk_size
        self.stride = stride
        self.embed = LinearEmbed(input_size, dim)
        self.pre_lookahead_layer = PreLookaheadLayer(dim, lookahead)
        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(dim, heads, hidden) for _ in range(config.num_blocks)
        )
        self.up_layer = Upsample1D(dim, stride)
        self.up_embed = LinearEmbed(dim, dim)
        self.up_encoders = nn.ModuleList(
            ConformerEncoderLayer(dim, heads, hidden) for _ in range(config.num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(dim, eps=1e-5)

    @staticmethod
    def _run(
        layers: nn.ModuleList, x: torch.Tensor, pos: torch.Tensor, chunk: int, streaming: bool
    ) -> torch.Tensor:
        # Batch rows have equal length here, so the padding mask is all ones and only the
        # chunk mask (streaming) restricts attention.
        mask = chunk_mask(x.shape[1], chunk, x.device) if streaming and chunk > 0 else None
        for layer in layers:
            x = layer(x, pos, mask)
        return x

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None, streaming: bool
    ) -> torch.Tensor:
        """x (B, L, input_size) token embeddings; context (B, 3, input_size) or None.

        Returns (B, stride*L, d).
        """
        x = self.embed(x)
        if context is not None:
            context = self.embed(context)
        pos = self.embed.rel_pos(x.shape[1], x)
        x = self.pre_lookahead_layer(x, context)
        x = self._run(self.encoders, x, pos, self.chunk, streaming)
        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        x = self.up_embed(x)
        pos = self.up_embed.rel_pos(x.shape[1], x)
        x = self._run(self.up_encoders, x, pos, self.chunk * self.stride, streaming)
        return self.after_norm(x)


# ---------------------------------------------------------------------------------------------
# Estimator: CausalConditionalDecoder


class CausalConv1d(nn.Conv1d):
    """Conv1d that left-pads kernel-1 zeros so frame t never sees frames after t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalBlock1D(nn.Module):
    """Causal conv k3 -> LayerNorm over channels -> Mish (keys `block.0`, `block.2`)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3),
            Transpose(1, 2),
            nn.LayerNorm(dim_out),
            Transpose(1, 2),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class CausalResnetBlock1D(nn.Module):
    """block1 -> + time embedding -> block2, plus a 1x1 residual projection."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.mlp(time_emb)[:, :, None]
        return self.block2(h) + self.res_conv(x)


class Attention(nn.Module):
    """diffusers `Attention` as used here: bias-free q/k/v, `to_out.0` with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, dim); bias (T, T) additive (0 or -1e10) or None."""
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELUProj(nn.Module):
    """diffusers `GELU`: Linear then exact GELU (key `proj`)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # Index 1 is diffusers' dropout slot; kept so the last Linear is `net.2`.
        self.net = nn.Sequential(
            GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention + FFN, pre-LN; no cross-attention, so no `norm2`/`attn2`."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConditionalDecoder(nn.Module):
    """The CFM vector field v(x, mu, spk, cond, t): one down, N mid and one up stage."""

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        (ch,) = config.channels
        time_dim = 4 * ch
        self.time_channels = config.in_channels
        self.chunk = config.static_chunk_size
        self._freqs: dict[torch.device, torch.Tensor] = {}
        self.time_mlp = TimestepEmbedding(config.in_channels, time_dim)

        def transformers() -> nn.ModuleList:
            return nn.ModuleList(
                BasicTransformerBlock(ch, config.num_heads, config.attention_head_dim)
                for _ in range(config.n_blocks)
            )

        down = CausalResnetBlock1D(config.in_channels, ch, time_dim)
        self.down_blocks = nn.ModuleList(
            [nn.ModuleList([down, transformers(), CausalConv1d(ch, ch, 3)])]
        )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(ch, ch, time_dim), transformers()])
            for _ in range(config.num_mid_blocks)
        )
        up = CausalResnetBlock1D(2 * ch, ch, time_dim)
        self.up_blocks = nn.ModuleList(
            [nn.ModuleList([up, transformers(), CausalConv1d(ch, ch, 3)])]
        )
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, config.out_channels, 1)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Matcha `SinusoidalPosEmb` of 1000*t, computed in float32: (B,) -> (B, in_channels)."""
        freqs = self._freqs.get(t.device)
        if freqs is None:
            half = self.time_channels // 2
            with torch.inference_mode(False):
                steps = torch.arange(half, device=t.device, dtype=torch.float32)
                freqs = torch.exp(steps * -(math.log(10000.0) / (half - 1)))
            self._freqs[t.device] = freqs
        arg = 1000.0 * t.float()[:, None] * freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)

    @staticmethod
    def _stage(blocks: nn.ModuleList, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, streaming: bool) -> torch.Tensor:
        """x (B, in_channels, T) = [x | mu | spks | cond]; t (B,) -> velocity (B, out, T).

        Rows have equal length, so CosyVoice2's padding mask is all ones and omitted.
        """
        dtype = self.final_proj.weight.dtype
        t_emb = self.time_mlp(self.time_embedding(t).to(dtype))
        bias = None
        if streaming and self.chunk > 0:
            allowed = chunk_mask(x.shape[2], self.chunk, x.device)
            bias = (~allowed).to(dtype) * ESTIMATOR_MASK_BIAS
        ((resnet, blocks, down),) = self.down_blocks
        x = self._stage(blocks, resnet(x, t_emb), bias)
        skip = x  # saved before the (non-)downsampling conv, as in CosyVoice2
        x = down(x)
        for resnet, blocks in self.mid_blocks:
            x = self._stage(blocks, resnet(x, t_emb), bias)
        ((resnet, blocks, up),) = self.up_blocks
        x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
        x = up(self._stage(blocks, resnet(x, t_emb), bias))
        return self.final_proj(self.final_block(x))


# ---------------------------------------------------------------------------------------------
# CFM solver and the full flow


class CausalConditionalCFM(nn.Module):
    """Euler ODE solver with classifier-free guidance over the fixed CosyVoice2 noise."""

    def __init__(self, params: CFMParams, estimator: EstimatorConfig) -> None:
        super().__init__()
        self.params = params
        self.channels = estimator.out_channels
        self.estimator = CausalConditionalDecoder(estimator)
        self._noise: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def noise(self, frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`rand_noise[:, :, :frames]`, cached per device and dtype."""
        if frames > NOISE_FRAMES:
            raise ValueError(f"{frames} mel frames exceed the fixed noise ({NOISE_FRAMES})")
        key = (device, dtype)
        if key not in self._noise:
            with torch.inference_mode(False):
                self._noise[key] = _cpu_noise(self.channels).to(device=device, dtype=dtype)
        return self._noise[key][:, :, :frames]

    def time_grid(self, steps: int | None = None) -> list[float]:
        """t_0 = 0 ... t_n = 1 (n = `steps`, default the checkpoint's n_timesteps), optionally
        warped by 1 - cos(t*pi/2) (denser near t = 0)."""
        n = steps or self.params.n_timesteps
        grid = [i / n for i in range(n + 1)]
        if self.params.t_scheduler == "cosine":
            grid = [1.0 - math.cos(t * 0.5 * math.pi) for t in grid]
        return grid

    def forward(
        self, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, streaming: bool
    ) -> torch.Tensor:
        """mu, cond (1, C, T), spks (1, C) in the parameters' dtype -> mel (1, C, T) float32."""
        dtype, frames = mu.dtype, mu.shape[2]
        # The ODE state is carried in float32 (the estimator still runs in `dtype`): it costs
        # nothing and avoids accumulating bf16 rounding over the steps.
        x = self.noise(frames, mu.device, torch.float32)
        # Row 0 is conditional, row 1 unconditional (mu, speaker and cond zeroed) for CFG.
        static = torch.cat([mu, spks[:, :, None].expand(-1, -1, frames), cond], dim=1)
        static = torch.cat([static, torch.zeros_like(static)], dim=0)
        rate = self.params.inference_cfg_rate
        grid = self.time_grid()
        for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
            x_in = torch.cat([x, x], dim=0).to(dtype)
            t = torch.full((2,), t0, device=mu.device, dtype=torch.float32)
            v = self.estimator(torch.cat([x_in, static], dim=1), t, streaming).float()
            x = x + (t1 - t0) * ((1.0 + rate) * v[:1] - rate * v[1:])
        return x


class CausalMaskedDiffWithXvec(nn.Module):
    """CosyVoice2 flow: speech tokens (25 Hz) + speaker x-vector -> mel (50 Hz)."""

    def __init__(self, config: FlowConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FlowConfig()
        config.validate()
        enc = config.encoder
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = UpsampleConformerEncoder(
            config.input_size, enc, config.pre_lookahead_len, config.token_mel_ratio
        )
        self.encoder_proj = nn.Linear(enc.output_size, config.output_size)
        self.decoder = CausalConditionalCFM(config.cfm, config.estimator)

    def _check(self, tokens: torch.Tensor, speaker: torch.Tensor, finalize: bool) -> int:
        """Validate inputs; return the number of tokens rendered (N')."""
        cfg = self.config
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"tokens must have shape (1, N), got {tuple(tokens.shape)}")
        if tuple(speaker.shape) != (1, cfg.spk_embed_dim):
            raise ValueError(f"speaker must have shape (1, {cfg.spk_embed_dim})")
        rendered = tokens.shape[1] - (0 if finalize else cfg.pre_lookahead_len)
        if rendered < 1:
            raise ValueError(f"{tokens.shape[1]} tokens leave nothing to render")
        if rendered * cfg.token_mel_ratio > NOISE_FRAMES:
            raise ValueError(f"{rendered * cfg.token_mel_ratio} mel frames exceed {NOISE_FRAMES}")
        if int(tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"speech token ids must be < {cfg.vocab_size}")
        return rendered

    @torch.inference_mode()
    def inference(
        self,
        tokens: torch.LongTensor,
        speaker: torch.Tensor,
        *,
        finalize: bool,
        streaming: bool = True,
    ) -> torch.Tensor:
        """Render speech tokens as a log-mel spectrogram.

        tokens: (1, N) speech token ids (< vocab_size; negatives are clamped to 0).
        speaker: (1, spk_embed_dim) raw CAM++ x-vector; it is L2-normalised here.
        finalize: False withholds the last `pre_lookahead_len` tokens as look-ahead context
            for the others (N' = N - 3); True renders all N tokens with zero right-padding.
        streaming: True uses the chunk-causal attention masks, so a call over tokens[:25k + 3]
            reproduces the first 50k frames of a single call over all tokens; False attends
            over everything.

        There is no zero-shot prompt (no prompt tokens or prompt mel, T_p = 0): the condition
        channels are all zeros. Computes in the parameters' dtype; returns (1, 80, 2*N') float32.
        """
        rendered = self._check(tokens, speaker, finalize)
        weight = self.input_embedding.weight
        device, dtype = weight.device, weight.dtype
        tokens = tokens.to(device).clamp(min=0)
        embedded = self.input_embedding(tokens)
        context = None if finalize else embedded[:, rendered:]
        h = self.encoder(embedded[:, :rendered], context, streaming)
        mu = self.encoder_proj(h).transpose(1, 2)
        spks = F.normalize(speaker.to(device=device, dtype=torch.float32), p=2, dim=1)
        spks = self.spk_embed_affine_layer(spks.to(dtype))
        cond = torch.zeros_like(mu)  # the prompt-mel channels; no prompt here
        return self.decoder(mu, spks, cond, streaming)
