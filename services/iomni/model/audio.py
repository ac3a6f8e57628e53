"""Audio encoder: Whisper-large-v3 encoder, 2x average pooling to 25 tokens/s, `mlp2`.

The encoder's modules are transformers' own `WhisperEncoder` (so `audio_model.encoder.*` keys
match InternOmni / HF Whisper naming), but the forward is ours: like InternOmni we truncate the
30 s padded features to the real length before attention, which also makes short clips cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from iomni.model.config import InteractiveOmniConfig
from iomni.model.vision import projector


def tokens_after_pooling(mel_frames: int) -> int:
    """LLM tokens for one window of `mel_frames` 100 Hz frames (InternOmni's formula)."""
    after_cnn = (mel_frames - 1) // 2 + 1
    return (after_cnn - 2) // 2 + 1


class AudioWhisperModel(nn.Module):
    """Holds `encoder` so keys read `audio_model.encoder.*`."""

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 128, T) log-mel of equal length T -> (B, tokens, d_model)."""
        enc = self.encoder
        dtype = enc.conv1.weight.dtype
        x = F.gelu(enc.conv1(features.to(dtype)))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        length = x.shape[1]
        if length > enc.embed_positions.weight.shape[0]:
            raise ValueError(f"audio window of {length} frames exceeds the encoder's 30 s")
        x = x + enc.embed_positions.weight[:length].to(x.dtype)
        for layer in enc.layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        x = enc.layer_norm(x)
        # InternOmni order: layer_norm, then AvgPool1d(2, 2) over time.
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)
        return x[:, : tokens_after_pooling(features.shape[-1])]


def audio_projector(config: InteractiveOmniConfig) -> nn.Sequential:
    return projector(config.audio_config.d_model, config.llm_hidden_size)


def encode_windows(
    audio_model: AudioWhisperModel, mlp2: nn.Module, windows: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Encode 30 s windows (each (128, T_i)); windows of equal length share one batch."""
    out: list[torch.Tensor | None] = [None] * len(windows)
    by_length: dict[int, list[int]] = {}
    for index, window in enumerate(windows):
        by_length.setdefault(window.shape[-1], []).append(index)
    for indices in by_length.values():
        batch = torch.stack([windows[i] for i in indices])
        embeddings = mlp2(audio_model(batch))
        for i, emb in zip(indices, embeddings, strict=True):
            out[i] = emb
    return [e for e in out if e is not None]
