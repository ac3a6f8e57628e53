"""Vision encoder: InternViT-300M-style ViT, pixel shuffle and the `mlp1` projector.

Parameter names follow InternVL's `modeling_intern_vit.py` so that `vision_model.*` keys of a
real checkpoint load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iomni.model.config import InteractiveOmniConfig, InternVisionConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: InternVisionConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "rms_norm":
        return RMSNorm(dim, config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))

    def _patch_positions(self, rows: int, cols: int) -> torch.Tensor:
        table = self.position_embedding[:, 1:]
        if rows == self.grid and cols == self.grid:
            return table
        # Other resolutions: bicubic resample of the trained grid, in float32 as InternViT does.
        dim = table.shape[-1]
        grid = table.float().reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        batch, _, rows, cols = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, -1, -1).to(patches.dtype)
        positions = torch.cat(
            [self.position_embedding[:, :1], self._patch_positions(rows, cols)], dim=1
        )
        return torch.cat([cls, patches], dim=1) + positions.to(patches.dtype)


class InternAttention(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        if config.qk_normalization:
            self.q_norm = make_norm(config)
            self.k_norm = make_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, dim).unbind(2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (
            t.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = make_norm(config)
        self.norm2 = make_norm(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x).to(x.dtype)) * self.ls1
        return x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )


class InternVisionModel(nn.Module):
    """InternViT without pooler; `forward` returns the hidden state `select_layer` picks."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        # hidden_states[k] is the output after k layers (0 = embeddings), as in HF's tuple.
        num_layers = len(self.encoder.layers)
        stop = num_layers if select_layer == -1 else num_layers + 1 + select_layer
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        return x


def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """Fold (1/scale)x(1/scale) neighbouring patches into channels (InternVL's exact order)."""
    n, rows, cols, c = x.shape
    x = x.reshape(n, rows, int(cols * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(cols * scale), int(rows * scale), int(c / (scale * scale)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """`mlp1` / `mlp2`: LayerNorm -> Linear -> GELU -> Linear (keys .0, .1, .3)."""
    return nn.Sequential(
        nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
    )


def vision_projector(config: InteractiveOmniConfig) -> nn.Sequential:
    width = int(config.vision_config.hidden_size / config.downsample_ratio**2)
    return projector(width, config.llm_hidden_size)


def encode_tiles(
    vision_model: InternVisionModel,
    mlp1: nn.Module,
    config: InteractiveOmniConfig,
    pixel_values: torch.Tensor,
) -> torch.Tensor:
    """(tiles, 3, H, W) pixels -> (tiles, num_image_token, llm_hidden) embeddings."""
    features = vision_model(pixel_values, config.select_layer)[:, 1:, :]
    n, tokens, c = features.shape
    side = int(tokens**0.5)
    features = features.reshape(n, side, side, c)
    features = pixel_shuffle(features, config.downsample_ratio, config.ps_version)
    features = features.reshape(n, -1, features.shape[-1])
    return mlp1(features)
