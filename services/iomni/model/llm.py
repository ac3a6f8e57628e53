"""The LLM: transformers' Qwen3 driven through `inputs_embeds`, with media spliced in.

We call the decoder body (`model.model`) and apply `lm_head` only to the last position: a
prefill never needs logits for the whole prompt, and the speech decoder needs the post-norm
hidden state of the position that predicted each token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from iomni.errors import Internal


def build_language_model(config: Qwen3Config) -> Qwen3ForCausalLM:
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config)


def splice_media(
    language_model: Qwen3ForCausalLM,
    input_ids: torch.Tensor,
    media: Mapping[int, torch.Tensor],
) -> torch.Tensor:
    """Token embeddings with placeholder rows overwritten, in order, by media embeddings.

    `input_ids` is (L,); `media` maps a placeholder id (e.g. <IMG_CONTEXT>) to (n, H) rows.
    Returns (1, L, H).
    """
    embeds = language_model.get_input_embeddings()(input_ids.unsqueeze(0))
    for token_id, rows in media.items():
        mask = input_ids == token_id
        expected = int(mask.sum())
        if expected != rows.shape[0]:
            raise Internal(
                f"prompt has {expected} placeholders for token {token_id} "
                f"but {rows.shape[0]} media embeddings were produced"
            )
        if expected:
            embeds[0, mask] = rows.to(embeds.dtype)
    return embeds


@dataclass
class StepOutput:
    logits: torch.Tensor  # (V,) float32, for the next token
    hidden: torch.Tensor  # (H,) post-norm hidden state of the position that predicts it


def forward(
    language_model: Qwen3ForCausalLM,
    inputs_embeds: torch.Tensor,
    cache: DynamicCache | None,
) -> tuple[StepOutput, DynamicCache]:
    """Run (1, L, H) embeddings on top of `cache`; return next-token logits and hidden."""
    cache = cache if cache is not None else DynamicCache(config=language_model.config)
    out = language_model.model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True)
    hidden = out.last_hidden_state[0, -1]
    logits = language_model.lm_head(hidden).float()
    return StepOutput(logits=logits, hidden=hidden), out.cache


def embed_token(language_model: Qwen3ForCausalLM, token_id: int) -> torch.Tensor:
    ids = torch.tensor([[token_id]], device=language_model.device)
    return language_model.get_input_embeddings()(ids)
