"""Sampling parameters and next-token selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iomni.errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    """Per-turn decoding settings. `temperature == 0` means greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 256
    seed: int | None = None

    def validate(self, max_new_tokens_limit: int = 8192) -> SamplingParams:
        self._check_types()
        if not 0.0 <= self.temperature <= 5.0:
            raise InvalidInput(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidInput(
                f"max_new_tokens must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidInput(f"seed must be a non-negative 64-bit integer, got {self.seed}")
        return self

    def _check_types(self) -> None:
        """A raw client's JSON may carry "0.7" or true: refused here, not a TypeError later."""
        kinds = dict(
            temperature="number", top_p="number", top_k="integer", max_new_tokens="integer"
        )
        if self.seed is not None:
            kinds["seed"] = "integer"
        for name, kind in kinds.items():
            _check_type(name, getattr(self, name), kind)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_type(name: str, value: object, kind: str) -> None:
    allowed = (int, float) if kind == "number" else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise InvalidInput(
            f"{name} must be {'a' if kind == 'number' else 'an'} {kind}, got {value!r}"
        )


def make_generator(params: SamplingParams) -> torch.Generator:
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token id from (V,) logits: temperature, then top-k, then top-p."""
    if params.greedy:
        return int(torch.argmax(logits))
    # The generator lives on the CPU (seeded draws are the same on every device).
    scores = logits.float().cpu() / params.temperature
    # Work on the top-k candidates only: sorting the whole vocabulary each step is slow.
    k = min(params.top_k, scores.shape[-1]) if params.top_k else scores.shape[-1]
    candidates, ids = torch.topk(scores, k)  # sorted, descending
    probs = torch.softmax(candidates, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the crossing token included).
        keep = (probs.cumsum(-1) - probs) < params.top_p
        probs = probs * keep
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(ids[choice])
