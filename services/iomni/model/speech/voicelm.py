"""The speech-token LM ("VoiceLM"): a Qwen2 backbone that turns text into 25 Hz speech tokens.

Bistream decoding as in CosyVoice2's `Qwen2LM.inference_bistream`, at InteractiveOmni's 5:25
ratio: every 5 text tokens (LLM text-token ids + the LLM's hidden states, fused by an adaptor)
are followed by up to 25 speech tokens; a forced `fill` token asks for the next 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from iomni.model.kv_cache import BatchCache

SOS, TASK_ID, FILL_MARKER = 0, 1, 2  # rows of `llm_embedding`
IGNORE = -1


@dataclass
class RasConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass
class VoiceLMConfig:
    llm_input_size: int = 896
    llm_output_size: int = 896
    speech_token_size: int = 6561
    text_hidden_size: int = 2560
    mix_ratio: tuple[int, int] = (5, 25)
    sampling: RasConfig = field(default_factory=RasConfig)
    llm_config: dict[str, Any] = field(default_factory=dict)
    max_tail_ratio: int = 20  # speech tokens per text token, cap for the final phase

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VoiceLMConfig:
        sampling = raw.get("sampling_config") or {}
        return cls(
            llm_input_size=raw.get("llm_input_size", 896),
            llm_output_size=raw.get("llm_output_size", 896),
            speech_token_size=raw.get("speech_token_size", 6561),
            text_hidden_size=raw.get("text_hidden_size", 2560),
            mix_ratio=tuple(raw.get("mix_ratio", (5, 25))),  # type: ignore[arg-type]
            sampling=RasConfig(
                **{k: v for k, v in sampling.items() if k in RasConfig.__dataclass_fields__}
            ),
            llm_config=dict(raw.get("llm_config") or {}),
        )

    @property
    def eos(self) -> int:
        return self.speech_token_size

    @property
    def fill(self) -> int:
        return self.speech_token_size + 2


class Qwen2Encoder(nn.Module):
    """Holds the backbone as `model` so keys read `voicelm.llm.model.model.*` like CosyVoice2."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        config._attn_implementation = "sdpa"
        self.model = Qwen2ForCausalLM(config)

    def step(
        self, embeds: torch.Tensor, cache: DynamicCache | None
    ) -> tuple[torch.Tensor, DynamicCache]:
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        out = self.model.model(inputs_embeds=embeds, cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1], out.cache


class TextAdaptor(nn.Module):
    """LLM hidden states + text-token embeddings -> VoiceLM input (gated fusion).

    The real adaptor's layout is unknown; this follows the public LLaMA-Omni2 design: project
    the hidden state, then gate it against the backbone's own embedding of the text token.
    """

    def __init__(self, text_hidden: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(text_hidden, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)
        )
        self.gate = nn.Linear(2 * width, width)

    def forward(self, hidden: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        h = self.proj(hidden)
        g = torch.sigmoid(self.gate(torch.cat([h, text_embeds], dim=-1)))
        return g * h + (1 - g) * text_embeds


class VoiceLM(nn.Module):
    def __init__(self, config: VoiceLMConfig) -> None:
        super().__init__()
        self.config = config
        width = config.llm_input_size
        self.llm_embedding = nn.Embedding(3, width)
        self.speech_embedding = nn.Embedding(config.speech_token_size + 3, width)
        self.llm = Qwen2Encoder(Qwen2Config(**config.llm_config))
        self.llm_decoder = nn.Linear(config.llm_output_size, config.speech_token_size + 3)
        self.adaptor = TextAdaptor(config.text_hidden_size, width)

    def embed_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> torch.Tensor:
        """(n,) LLM token ids + (n, H_llm) hidden states -> (1, n, width)."""
        table = self.llm.model.get_input_embeddings()
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=table.weight.device)
        text = table(ids)
        return self.adaptor(hidden.to(text), text).unsqueeze(0)  # text's device and dtype

    def marker(self, index: int) -> torch.Tensor:
        return self.llm_embedding.weight[index].reshape(1, 1, -1)

    def speech(self, token: int) -> torch.Tensor:
        return self.speech_embedding.weight[token].reshape(1, 1, -1)

    def log_probs(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.llm_decoder(last_hidden).float(), dim=-1)[0]


def ras_sample(
    logp: torch.Tensor,
    recent: Sequence[int],
    config: RasConfig,
    generator: torch.Generator,
    forbid: Sequence[int] = (),
) -> int:
    """Repetition-aware sampling (CosyVoice2): nucleus draw, redraw from the full
    distribution when the token already appears in the recent window."""
    logp = logp.cpu()  # the generator lives on the CPU, whatever the device
    # The nucleus lies in the top-k of what is allowed: the k + len(forbid) best hold it.
    best, order = logp.topk(min(config.top_k + len(forbid), logp.numel()))
    allowed = [i for i, token in enumerate(order.tolist()) if token not in forbid][: config.top_k]
    top, order = best[allowed].exp(), order[allowed]
    keep = (top.cumsum(0) - top) < config.top_p
    keep[0] = True
    nucleus = top[keep]  # a prefix: the cumulative sum only grows
    # CosyVoice's `multinomial(1)` over the nucleus, as torch draws it: argmax(p / q) with
    # q ~ Exp(1), one per nucleus entry, from the same generator. (Drawing q for the whole
    # vocabulary, as this did before, gave the same distribution at 100 us a token.)
    q = torch.empty_like(nucleus).exponential_(1, generator=generator)
    token = int(order[torch.argmax(nucleus / q)])
    window = list(recent)[-config.win_size :]
    if window.count(token) >= config.win_size * config.tau_r:
        probs = logp.exp()
        probs[[*forbid, token]] = 0.0  # HEAD behaviour: the repeated id cannot be redrawn
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token


class BistreamDecoder:
    """One utterance: push text groups, get speech tokens as soon as they exist."""

    def __init__(self, lm: VoiceLM, generator: torch.Generator) -> None:
        self.lm = lm
        self.generator = generator
        self.text_per_group, self.speech_per_group = lm.config.mix_ratio
        self.pending: torch.Tensor | None = None  # adapted text embeddings not yet fed
        self.cache: DynamicCache | None = None
        self.history: list[int] = []  # speech tokens and fills, for the RAS window
        self.started = False
        self.finished = False

    @torch.inference_mode()
    def push_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> list[int]:
        self.add_text(token_ids, hidden)
        out: list[int] = []
        while self.has_group():
            out += decode_groups([self])[0]
        return out

    @torch.inference_mode()
    def add_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> None:
        """Queue text for `decode_groups` (nothing is decoded here)."""
        if not token_ids:
            return
        embeds = self.lm.embed_text(token_ids, hidden)
        self.pending = embeds if self.pending is None else torch.cat([self.pending, embeds], 1)

    def speech_tokens_for(self, text_tokens: int) -> int:
        """Speech tokens the groups of the first `text_tokens` text tokens decode to."""
        return text_tokens // self.text_per_group * self.speech_per_group

    def has_group(self) -> bool:
        return self.pending is not None and self.pending.shape[1] >= self.text_per_group

    def _begin_group(self) -> int:
        """Feed the next text group (after <sos> if first; it replaces the fill, which is never
        fed) and sample the group's first speech token."""
        assert self.pending is not None
        group = self.pending[:, : self.text_per_group]
        rest = self.pending[:, self.text_per_group :]
        self.pending = rest if rest.shape[1] else None
        lm_input = torch.cat([self.lm.marker(SOS), group], 1) if not self.started else group
        self.started = True
        last, self.cache = self.lm.llm.step(lm_input, self.cache)
        return self._sample(self.lm.log_probs(last))

    def _sample(self, logp: torch.Tensor) -> int:
        config = self.lm.config
        forbid = (config.eos, config.eos + 1, config.fill)
        token = ras_sample(logp, self.history, config.sampling, self.generator, forbid=forbid)
        self.history.append(token)
        return token

    @torch.inference_mode()
    def finish(self) -> list[int]:
        """Remaining text + <task_id>, then decode until eos (capped)."""
        if self.finished:
            return []
        self.finished = True
        config = self.lm.config
        parts = [] if self.started else [self.lm.marker(SOS)]
        remaining = 0
        if self.pending is not None:
            parts.append(self.pending)
            remaining = self.pending.shape[1]
        parts.append(self.lm.marker(TASK_ID))
        lm_input = torch.cat(parts, 1)
        cap = min(config.max_tail_ratio * max(remaining, 1), 2 * self.speech_per_group)
        out: list[int] = []
        while len(out) < cap:
            last, self.cache = self.lm.llm.step(lm_input, self.cache)
            logp = self.lm.log_probs(last)
            token = ras_sample(
                logp,
                self.history,
                config.sampling,
                self.generator,
                forbid=(config.eos + 1, config.fill),
            )
            if token == config.eos:
                break
            self.history.append(token)
            out.append(token)
            lm_input = self.lm.speech(token)
        return out


@torch.inference_mode()
def decode_groups(decoders: Sequence[BistreamDecoder]) -> list[list[int]]:
    """Decode one text group of each decoder (each `has_group()`), in lockstep: a group is its
    text fed alone, then `speech_per_group` single-token steps that all decoders share, one
    forward for the batch (the steps are per-call overhead on small models: 8 rows cost about
    1.5x one). Each decoder samples from its own generator and history, as if alone."""
    lm = decoders[0].lm
    tokens = [[d._begin_group()] for d in decoders]
    batch = BatchCache.pack(decoders) if len(decoders) > 1 else None
    per_group = lm.config.mix_ratio[1]
    for step in range(per_group):
        fed = torch.tensor([[out[-1]] for out in tokens], device=lm.speech_embedding.weight.device)
        embeds = lm.speech_embedding(fed)
        if batch is None:
            last, decoders[0].cache = lm.llm.step(embeds, decoders[0].cache)
        else:
            out = lm.llm.model.model(
                inputs_embeds=embeds,
                attention_mask=batch.grow_mask(),
                position_ids=batch.positions(),
                cache=batch.cache,
                use_cache=True,
            )
            batch.cache, last = out.cache, out.last_hidden_state[:, -1]
        if step + 1 == per_group:
            break  # the group's last token is fed, not followed: a forced fill asks for text
        # All rows to the host in one copy (sampling runs there): one wait for a GPU per step.
        logp = F.log_softmax(lm.llm_decoder(last).float(), dim=-1).cpu()
        for row, decoder in enumerate(decoders):
            tokens[row].append(decoder._sample(logp[row]))
    if batch is not None:
        batch.unpack()
    for decoder in decoders:
        decoder.history.append(lm.config.fill)
    return tokens
