"""The speech-token LM: key layout, RAS sampling, 5:25 bistream decoding."""

from __future__ import annotations

import pytest
import torch

from iomni.model.speech.voicelm import (
    BistreamDecoder,
    RasConfig,
    VoiceLM,
    VoiceLMConfig,
    decode_groups,
    ras_sample,
)

TEXT_HIDDEN = 48


def tiny_voicelm(seed: int = 0) -> VoiceLM:
    config = VoiceLMConfig.from_dict(
        {
            "llm_input_size": 32,
            "llm_output_size": 32,
            "speech_token_size": 6561,
            "text_hidden_size": TEXT_HIDDEN,
            "mix_ratio": [5, 25],
            "llm_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "vocab_size": 151936,
                "tie_word_embeddings": True,
            },
        }
    )
    torch.manual_seed(seed)
    return VoiceLM(config).eval()


def text(n: int, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151000, (n,), generator=g).tolist(), torch.randn(
        n, TEXT_HIDDEN, generator=g
    )


def test_key_layout_follows_cosyvoice2() -> None:
    shapes = {k: tuple(v.shape) for k, v in tiny_voicelm().state_dict().items()}
    assert shapes["llm_embedding.weight"] == (3, 32)
    assert shapes["speech_embedding.weight"] == (6564, 32)
    assert shapes["llm_decoder.weight"] == (6564, 32)
    assert shapes["llm_decoder.bias"] == (6564,)
    assert shapes["llm.model.model.embed_tokens.weight"] == (151936, 32)
    assert "llm.model.model.layers.0.self_attn.q_proj.bias" in shapes  # Qwen2: q/k/v bias
    assert shapes["adaptor.proj.0.weight"] == (64, TEXT_HIDDEN)


def test_every_five_text_tokens_give_exactly_25_speech_tokens() -> None:
    decoder = BistreamDecoder(tiny_voicelm(), torch.Generator().manual_seed(1))
    ids, hidden = text(12)
    assert decoder.push_text(ids[:3], hidden[:3]) == []
    first = decoder.push_text(ids[3:7], hidden[3:7])
    assert len(first) == 25
    second = decoder.push_text(ids[7:12], hidden[7:12])
    assert len(second) == 25
    tail = decoder.finish()
    assert 1 <= len(tail) <= 50
    assert all(0 <= t < 6561 for t in first + second + tail)
    assert decoder.finish() == []


def test_same_seed_same_speech_tokens() -> None:
    lm = tiny_voicelm()
    ids, hidden = text(10)

    def run(seed: int) -> list[int]:
        decoder = BistreamDecoder(lm, torch.Generator().manual_seed(seed))
        return decoder.push_text(ids, hidden) + decoder.finish()

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_text_shorter_than_a_group_still_speaks() -> None:
    decoder = BistreamDecoder(tiny_voicelm(), torch.Generator().manual_seed(0))
    ids, hidden = text(2)
    assert decoder.push_text(ids, hidden) == []
    assert 1 <= len(decoder.finish()) <= 40


def test_ras_redraws_a_token_seen_in_the_window() -> None:
    logp = torch.full((100,), -30.0)
    logp[7] = 0.0  # nucleus is token 7 alone
    logp[[20, 21]] = -3.0
    config = RasConfig()
    generator = torch.Generator().manual_seed(0)
    assert ras_sample(logp.log_softmax(0), [1, 2], config, generator) == 7
    redrawn = {ras_sample(logp.log_softmax(0), [7], config, generator) for _ in range(50)}
    assert 7 not in redrawn and redrawn <= {20, 21}


def test_ras_never_returns_a_forbidden_token() -> None:
    logp = torch.full((10,), -30.0)
    logp[3] = 0.0
    generator = torch.Generator().manual_seed(0)
    picks = {
        ras_sample(logp.log_softmax(0), [], RasConfig(), generator, forbid=[3]) for _ in range(30)
    }
    assert 3 not in picks


@pytest.mark.parametrize("top_k", [1, 3])
def test_ras_respects_top_k(top_k: int) -> None:
    logp = torch.linspace(0, -5, 50).log_softmax(0)
    generator = torch.Generator().manual_seed(0)
    config = RasConfig(top_p=1.0, top_k=top_k, win_size=10, tau_r=0.1)
    picks = {ras_sample(logp, [], config, generator) for _ in range(100)}
    assert picks <= set(range(top_k))


def nucleus_by_sorting(
    logp: torch.Tensor, config: RasConfig, generator: torch.Generator, forbid: list[int]
) -> int:
    """The reference draw (CosyVoice2's `nucleus_sampling`): sort the vocabulary, keep the
    nucleus, one multinomial over the nucleus alone."""
    probs = logp.clone()
    probs[forbid] = float("-inf")
    probs = probs.exp()
    ordered, order = probs.sort(descending=True, stable=True)
    keep = (ordered.cumsum(0) - ordered) < config.top_p
    keep[config.top_k :] = False
    keep[0] = True
    return int(order[keep][torch.multinomial(ordered[keep], 1, generator=generator)])


def test_ras_draws_the_token_a_multinomial_over_the_sorted_nucleus_draws() -> None:
    config = RasConfig(top_p=0.8, top_k=25, win_size=10, tau_r=100.0)  # no redraws
    mine, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    scores = torch.Generator().manual_seed(6)
    forbid = [6561, 6562, 6563]
    for sharpness in [0.5, 1.0, 3.0, 8.0] * 50:
        logp = (torch.randn(6564, generator=scores) * sharpness).log_softmax(0)
        expected = nucleus_by_sorting(logp, config, reference, forbid)
        assert ras_sample(logp, [], config, mine, forbid=forbid) == expected


def test_replies_decoded_together_get_the_tokens_each_gets_alone() -> None:
    lm = tiny_voicelm()
    texts = [text(n, seed=reply) for reply, n in enumerate([12, 11, 15])]

    def decoder(reply: int) -> BistreamDecoder:
        return BistreamDecoder(lm, torch.Generator().manual_seed(10 + reply))

    alone, alone_decoders = [], []
    for reply, (ids, hidden) in enumerate(texts):
        d = decoder(reply)
        alone.append(d.push_text(ids[:3], hidden[:3]) + d.push_text(ids[3:], hidden[3:]))
        alone[-1] += d.finish()
        alone_decoders.append(d)
    together = [decoder(reply) for reply in range(3)]
    for d, (ids, hidden) in zip(together, texts, strict=True):
        d.add_text(ids, hidden)
    # Reply 0 starts a group earlier, so the batched caches differ in length (padding).
    out: list[list[int]] = [decode_groups(together[:1])[0], [], []]
    batch_sizes = []
    while ready := [r for r, d in enumerate(together) if d.has_group()]:
        batch_sizes.append(len(ready))
        for reply, tokens in zip(ready, decode_groups([together[r] for r in ready]), strict=True):
            out[reply] += tokens
    for reply, d in enumerate(together):
        out[reply] += d.finish()
    assert batch_sizes == [3, 2, 1]
    assert out == alone
    # Tokens alone can hide a wrong position or mask (a near-flat random model samples the
    # same): the states each reply cached must match too.
    for mine, reference in zip(together, alone_decoders, strict=True):
        for layer, expected in zip(mine.cache.layers, reference.cache.layers, strict=True):
            torch.testing.assert_close(layer.keys, expected.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.values, expected.values, atol=1e-5, rtol=1e-4)
