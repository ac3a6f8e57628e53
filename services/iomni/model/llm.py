"""The LLM: transformers' Qwen3 driven through `inputs_embeds`, with media spliced in.

We call the decoder body (`model.model`) and apply `lm_head` only to the last position: a
prefill never needs logits for the whole prompt, and the speech decoder needs the post-norm
hidden state of the position that predicted each token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

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


class PackedVocabProjection(torch.nn.Module):
    """`lm_head` on CPU through oneDNN's prepacked GEMM (same weight, same values).

    Measured on `small` (hidden 256, vocabulary 151936, one core): 4.7 ms for one row and
    7.1 ms for eight, against 5.3 and 17-19 ms for `F.linear` over the best plain layout (and
    12 and 19 ms over the row-major one); the projection is most of a CPU decode step, so this
    is what lets eight streams share a step. The packed copy costs one more vocabulary matrix
    of memory (155 MB on `small`). `weight` stays the module's parameter, shared with a tied
    embedding; anything but a float32 CPU input (a GPU move, an export trace) takes the plain
    `F.linear`.
    """

    def __init__(self, linear: torch.nn.Linear, packed: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed = packed  # not a buffer: the state dict stays the checkpoint's

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self._can_pack(hidden):
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        rows = hidden.reshape(-1, self.in_features)
        logits = torch.ops.mkldnn._linear_pointwise(rows, self._packed, self.bias, "none", [], "")
        return logits.reshape(*hidden.shape[:-1], self.out_features)

    def _can_pack(self, hidden: torch.Tensor) -> bool:
        plain = torch.jit.is_tracing() or torch.compiler.is_compiling()
        cpu = hidden.device.type == "cpu" and self.weight.device.type == "cpu"
        return not plain and cpu and hidden.dtype == self.weight.dtype == torch.float32


# The batch size oneDNN is told to pack for: measured, packing for 8 rows serves 1 to 16 rows
# as fast as packing for each (packing for 1 makes 8 rows 1.7x slower).
PACK_ROWS = 8


def pack_vocab_projection(language_model: Qwen3ForCausalLM) -> bool:
    """Give a float32 CPU model the prepacked projection; False (and the model unchanged)
    where this torch build cannot pack."""
    head = language_model.lm_head
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return False
    if head.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(head.weight.detach(), PACK_ROWS)
    except (AttributeError, RuntimeError):
        return False
    language_model.lm_head = PackedVocabProjection(head, packed)
    return True


def embed_token(language_model: Qwen3ForCausalLM, token_id: int) -> torch.Tensor:
    ids = torch.tensor([[token_id]], device=language_model.device)
    return language_model.get_input_embeddings()(ids)


@dataclass
class TokenGroup:
    """Tokens that attend within one KV cache: one decoding sequence's next token, a decode
    batch (B rows of one token, their caches left-padded into one), or a chunk of one prompt
    (1 row of n tokens)."""

    embeds: torch.Tensor  # (B, n, H)
    cache: DynamicCache
    positions: torch.Tensor  # (B, n) rotary positions
    # (B, 1, n, keys after this update) True where a query may attend. None: causal within
    # the group, which for n > 1 needs an empty cache (`prefix_causal_mask` decides).
    mask: torch.Tensor | None = None


def prefix_causal_mask(cached: int, new: int, device: torch.device) -> torch.Tensor | None:
    """Mask for `new` tokens appended after `cached` ones: each sees the prefix and itself
    (None where SDPA's own causal mask says the same, which lets it skip masked blocks)."""
    if new == 1 or cached == 0:
        return None
    return torch.ones(new, cached + new, dtype=torch.bool, device=device).tril(cached)[None, None]


def forward_groups(body: Qwen3Model, groups: Sequence[TokenGroup]) -> list[torch.Tensor]:
    """One pass of the decoder for several groups of tokens, each attending only within its
    own cache; returns each group's post-norm hidden states (B, n, H).

    The linear layers (projections, MLP, norms) run once over every group's tokens, so their
    weights are read once; only attention runs per group. This is how a prompt's prefill
    chunk rides along with the running streams' decode step instead of a forward of its own:
    transformers has no forward for such a mixed batch. The arithmetic is Qwen3's decoder
    layer (q/k norms, rotary embedding, grouped-query SDPA) on the module's own weights;
    sliding-window layers are not handled (`ContinuousBatcher` refuses such a model)."""
    sizes = [g.embeds.shape[0] * g.embeds.shape[1] for g in groups]
    hidden = torch.cat([g.embeds.reshape(-1, g.embeds.shape[-1]) for g in groups])
    positions = torch.cat([g.positions.reshape(-1) for g in groups])
    cos, sin = body.rotary_emb(hidden, positions[None])
    rotary = (cos[0], sin[0])  # (tokens, head_dim)
    for layer in body.layers:
        attention = _grouped_attention(
            layer.self_attn, layer.input_layernorm(hidden), rotary, groups, sizes
        )
        hidden = hidden + attention
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = body.norm(hidden)
    return [
        part.reshape(g.embeds.shape) for part, g in zip(hidden.split(sizes), groups, strict=True)
    ]


def _grouped_attention(
    attention: torch.nn.Module,
    hidden: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    groups: Sequence[TokenGroup],
    sizes: list[int],
) -> torch.Tensor:
    tokens, head_dim = hidden.shape[0], attention.head_dim
    query = attention.q_norm(attention.q_proj(hidden).view(tokens, -1, head_dim))
    key = attention.k_norm(attention.k_proj(hidden).view(tokens, -1, head_dim))
    value = attention.v_proj(hidden).view(tokens, -1, head_dim)
    query, key = apply_rotary_pos_emb(query, key, *rotary, unsqueeze_dim=1)
    outputs = []
    for g, q, k, v in zip(
        groups, query.split(sizes), key.split(sizes), value.split(sizes), strict=True
    ):
        rows, length = g.embeds.shape[:2]
        q, k, v = (t.view(rows, length, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        keys, values = g.cache.update(k, v, attention.layer_idx)
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=g.mask,
            is_causal=g.mask is None and length > 1,
            scale=attention.scaling,
            enable_gqa=True,
        )
        outputs.append(out.transpose(1, 2).reshape(rows * length, -1))
    return attention.o_proj(torch.cat(outputs))
