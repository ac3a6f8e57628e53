"""Token counts, placeholder splicing, pixel shuffle order, KV-cache equivalence, seeding."""

from __future__ import annotations

import pytest
import torch

from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.config import InteractiveOmniConfig
from iomni.model.interactive_omni import InteractiveOmniModel
from iomni.model.llm import embed_token, forward
from iomni.model.presets import preset_config
from iomni.model.sampling import SamplingParams, make_generator, sample_next
from iomni.model.vision import pixel_shuffle


@pytest.mark.parametrize(("ratio", "tokens"), [(0.5, 256), (0.25, 64)])
def test_one_448_tile_gives_expected_tokens(ratio: float, tokens: int) -> None:
    raw = preset_config("tiny")
    raw["downsample_ratio"] = ratio
    config = InteractiveOmniConfig(raw)
    torch.manual_seed(0)
    model = InteractiveOmniModel(config).eval()
    out = model.encode_images(torch.randn(1, 3, 448, 448))
    assert config.num_image_token == tokens
    assert out.shape == (1, tokens, config.llm_hidden_size)


@pytest.mark.parametrize(("frames", "tokens"), [(100, 25), (3000, 750), (1000, 250)])
def test_audio_window_token_count(tiny: LoadedCheckpoint, frames: int, tokens: int) -> None:
    (out,) = tiny.model.encode_audio([torch.randn(128, frames)])
    assert out.shape == (tokens, tiny.config.llm_hidden_size)


def test_audio_windows_of_different_lengths_match_single_encoding(tiny: LoadedCheckpoint) -> None:
    a, b = torch.randn(128, 3000), torch.randn(128, 500)
    together = tiny.model.encode_audio([a, b, a])
    alone = tiny.model.encode_audio([b])
    assert [t.shape[0] for t in together] == [750, 125, 750]
    torch.testing.assert_close(together[1], alone[0])
    torch.testing.assert_close(together[0], together[2])


def test_pixel_shuffle_v2_is_row_major_with_documented_channel_order() -> None:
    rows = cols = 4
    grid = torch.arange(rows * cols, dtype=torch.float32).reshape(1, rows, cols, 1)
    out = pixel_shuffle(grid, 0.5, "v2")
    assert out.shape == (1, 2, 2, 4)
    # Channel index = dr * (C / r) + dc * C + c with C = 1, r = 0.5.
    for r in range(2):
        for c in range(2):
            expected = [grid[0, 2 * r + dr, 2 * c + dc, 0] for dr in (0, 1) for dc in (0, 1)]
            assert out[0, r, c].tolist() == [float(v) for v in expected]
    v1 = pixel_shuffle(grid, 0.5, "v1")
    assert torch.equal(v1, out.permute(0, 2, 1, 3))


def test_media_embeddings_land_exactly_at_placeholders(tiny: LoadedCheckpoint) -> None:
    model = tiny.model
    hidden = tiny.config.llm_hidden_size
    img, aud = 151671, 151680
    ids = torch.tensor([10, img, img, 11, aud, 12, img])
    image_rows = torch.randn(3, hidden)
    audio_rows = torch.randn(1, hidden)
    embeds = model.inputs_embeds(ids, {img: image_rows, aud: audio_rows})[0]
    table = model.language_model.get_input_embeddings().weight
    torch.testing.assert_close(embeds[[1, 2, 6]], image_rows)
    torch.testing.assert_close(embeds[4], audio_rows[0])
    for position in (0, 3, 5):
        torch.testing.assert_close(embeds[position], table[ids[position]])


def test_placeholder_count_mismatch_is_an_error(tiny: LoadedCheckpoint) -> None:
    ids = torch.tensor([151671, 151671])
    with pytest.raises(Exception, match="2 placeholders"):
        tiny.model.inputs_embeds(ids, {151671: torch.randn(3, tiny.config.llm_hidden_size)})


@torch.inference_mode()
def test_kv_cached_decoding_matches_full_recomputation(tiny: LoadedCheckpoint) -> None:
    lm = tiny.model.language_model
    prompt = torch.tensor([[100, 2000, 30000, 400, 151644, 77]])
    step, cache = forward(lm, lm.get_input_embeddings()(prompt), None)
    tokens = prompt[0].tolist()
    for _ in range(6):
        token = int(torch.argmax(step.logits))
        tokens.append(token)
        full_step, _ = forward(lm, lm.get_input_embeddings()(torch.tensor([tokens[:-1]])), None)
        torch.testing.assert_close(step.logits, full_step.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step.hidden, full_step.hidden, atol=1e-5, rtol=1e-4)
        step, cache = forward(lm, embed_token(lm, token), cache)


def test_same_seed_same_samples_and_greedy_is_argmax() -> None:
    logits = torch.randn(151936, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=200, seed=42)

    def draw(p: SamplingParams) -> list[int]:
        generator = make_generator(p)
        return [sample_next(logits, p, generator) for _ in range(20)]

    assert draw(params) == draw(params)
    assert draw(params) != draw(SamplingParams(temperature=1.0, top_p=0.95, top_k=200, seed=43))
    greedy = SamplingParams(temperature=0.0)
    assert sample_next(logits, greedy, make_generator(greedy)) == int(torch.argmax(logits))


def test_top_k_and_top_p_restrict_candidates() -> None:
    logits = torch.full((1000,), -10.0)
    logits[[5, 6, 7]] = torch.tensor([5.0, 4.0, 3.0])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, seed=0)
    generator = make_generator(params)
    assert {sample_next(logits, params, generator) for _ in range(200)} == {5, 6}
    nucleus = SamplingParams(temperature=1.0, top_k=0, top_p=0.5, seed=0)
    generator = make_generator(nucleus)
    assert {sample_next(logits, nucleus, generator) for _ in range(100)} == {5}


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-2),
        dict(max_new_tokens=0),
        dict(seed=-5),
        dict(temperature="0.7"),  # a raw Triton client's JSON parameters
        dict(max_new_tokens=2.5),
        dict(top_k=True),
        dict(seed="7"),
    ],
)
def test_invalid_sampling_params_are_rejected(bad: dict) -> None:
    from iomni.errors import InvalidInput

    with pytest.raises(InvalidInput):
        SamplingParams(**bad).validate()
