"""Flow matching (CosyVoice2 `CausalMaskedDiffWithXvec`): layout, shapes, streaming equivalence."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from iomni.model.speech.flow import (
    NOISE_FRAMES,
    SMALL_FLOW_CONFIG,
    TINY_FLOW_CONFIG,
    CausalMaskedDiffWithXvec,
    FlowConfig,
    rel_shift,
)

INIT_STD = 0.05


def random_init(model: nn.Module, seed: int = 1, std: float = INIT_STD) -> nn.Module:
    """Normal(0, std) weights from a local generator; LayerNorms stay identity.

    std 0.05 rather than 0.02: with 0.02 the masks change the first chunk by only ~1e-3, too
    close to the tolerances below to prove that they matter.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm):
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    nn.init.normal_(param, std=std, generator=generator)
    return model.eval()


def tiny_model(seed: int = 1) -> CausalMaskedDiffWithXvec:
    return random_init(CausalMaskedDiffWithXvec(FlowConfig.from_dict(TINY_FLOW_CONFIG)), seed)


@pytest.fixture(scope="module")
def tiny() -> CausalMaskedDiffWithXvec:
    return tiny_model()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 6561, (1, 78), generator=generator)
    speaker = torch.randn(1, 192, generator=generator)
    return tokens, speaker


# Names and shapes from research/parts.md §2.3 and §2.5 (full CosyVoice2 size).
EXPECTED_SHAPES = {
    "input_embedding.weight": (6561, 512),
    "spk_embed_affine_layer.weight": (80, 192),
    "spk_embed_affine_layer.bias": (80,),
    "encoder.embed.out.0.weight": (512, 512),
    "encoder.embed.out.1.weight": (512,),
    "encoder.pre_lookahead_layer.conv1.weight": (512, 512, 4),
    "encoder.pre_lookahead_layer.conv2.weight": (512, 512, 3),
    "encoder.encoders.0.self_attn.linear_q.weight": (512, 512),
    "encoder.encoders.5.self_attn.linear_out.bias": (512,),
    "encoder.encoders.0.self_attn.linear_pos.weight": (512, 512),
    "encoder.encoders.0.self_attn.pos_bias_u": (8, 64),
    "encoder.encoders.0.self_attn.pos_bias_v": (8, 64),
    "encoder.encoders.0.feed_forward.w_1.weight": (2048, 512),
    "encoder.encoders.0.feed_forward.w_2.weight": (512, 2048),
    "encoder.encoders.0.norm_mha.weight": (512,),
    "encoder.encoders.0.norm_ff.bias": (512,),
    "encoder.up_layer.conv.weight": (512, 512, 5),
    "encoder.up_embed.out.0.weight": (512, 512),
    "encoder.up_encoders.3.self_attn.pos_bias_v": (8, 64),
    "encoder.after_norm.weight": (512,),
    "encoder_proj.weight": (80, 512),
    "decoder.estimator.time_mlp.linear_1.weight": (1024, 320),
    "decoder.estimator.time_mlp.linear_2.weight": (1024, 1024),
    "decoder.estimator.down_blocks.0.0.mlp.1.weight": (256, 1024),
    "decoder.estimator.down_blocks.0.0.block1.block.0.weight": (256, 320, 3),
    "decoder.estimator.down_blocks.0.0.block1.block.2.weight": (256,),
    "decoder.estimator.down_blocks.0.0.block2.block.0.weight": (256, 256, 3),
    "decoder.estimator.down_blocks.0.0.res_conv.weight": (256, 320, 1),
    "decoder.estimator.down_blocks.0.1.3.norm1.weight": (256,),
    "decoder.estimator.down_blocks.0.1.0.attn1.to_q.weight": (512, 256),
    "decoder.estimator.down_blocks.0.1.0.attn1.to_out.0.weight": (256, 512),
    "decoder.estimator.down_blocks.0.1.0.attn1.to_out.0.bias": (256,),
    "decoder.estimator.down_blocks.0.1.0.norm3.weight": (256,),
    "decoder.estimator.down_blocks.0.1.0.ff.net.0.proj.weight": (1024, 256),
    "decoder.estimator.down_blocks.0.1.0.ff.net.2.weight": (256, 1024),
    "decoder.estimator.down_blocks.0.2.weight": (256, 256, 3),
    "decoder.estimator.mid_blocks.11.0.res_conv.weight": (256, 256, 1),
    "decoder.estimator.mid_blocks.11.1.3.attn1.to_v.weight": (512, 256),
    "decoder.estimator.up_blocks.0.0.block1.block.0.weight": (256, 512, 3),
    "decoder.estimator.up_blocks.0.0.res_conv.weight": (256, 512, 1),
    "decoder.estimator.up_blocks.0.1.3.ff.net.2.bias": (256,),
    "decoder.estimator.up_blocks.0.2.weight": (256, 256, 3),
    "decoder.estimator.final_block.block.0.weight": (256, 256, 3),
    "decoder.estimator.final_block.block.2.weight": (256,),
    "decoder.estimator.final_proj.weight": (80, 256, 1),
}

KEY_PATTERN = (
    r"^(input_embedding\.weight|spk_embed_affine_layer\.(weight|bias)|encoder_proj\.(weight|bias)"
    r"|encoder\.(embed|up_embed)\.out\.[01]\.(weight|bias)"
    r"|encoder\.pre_lookahead_layer\.conv[12]\.(weight|bias)"
    r"|encoder\.(encoders|up_encoders)\.\d+\.(self_attn\.(linear_[qkvo]\w*\.(weight|bias)"
    r"|linear_pos\.weight|pos_bias_[uv])|feed_forward\.w_[12]\.(weight|bias)"
    r"|norm_(mha|ff)\.(weight|bias))"
    r"|encoder\.up_layer\.conv\.(weight|bias)|encoder\.after_norm\.(weight|bias)"
    r"|decoder\.estimator\.(time_mlp\.linear_[12]\.(weight|bias)"
    r"|(down_blocks\.0|mid_blocks\.\d+|up_blocks\.0)\.(0\.(mlp\.1|block[12]\.block\.[02]|res_conv)"
    r"\.(weight|bias)|1\.\d+\.(norm[13]\.(weight|bias)|attn1\.to_[qkv]\.weight"
    r"|attn1\.to_out\.0\.(weight|bias)|ff\.net\.(0\.proj|2)\.(weight|bias)))"
    r"|(down|up)_blocks\.0\.2\.(weight|bias)"
    r"|final_block\.block\.[02]\.(weight|bias)|final_proj\.(weight|bias)))$"
)


def test_config_round_trip_and_defaults() -> None:
    default = FlowConfig.from_dict({"unknown": 1, "decoder_config": {"cfm_params": {}}})
    assert default == FlowConfig()
    assert default.estimator.channels == (256,)
    assert default.cfm.n_timesteps == 10 and default.cfm.inference_cfg_rate == 0.7
    for raw in (TINY_FLOW_CONFIG, SMALL_FLOW_CONFIG):
        assert FlowConfig.from_dict(raw).to_dict() == raw
    assert FlowConfig.from_dict(FlowConfig().to_dict()) == FlowConfig()


def test_full_size_layout_on_meta_device() -> None:
    with torch.device("meta"):
        model = CausalMaskedDiffWithXvec(FlowConfig())
    state = model.state_dict()
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(112.55e6, rel=0.01)
    assert list(model.buffers()) == []
    for name, shape in EXPECTED_SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    bad = [k for k in state if not re.fullmatch(KEY_PATTERN, k)]
    assert bad == []
    # 6 + 4 conformer layers, 1 + 12 + 1 resnet stages with 4 transformers each.
    assert sum(k.endswith("pos_bias_u") for k in state) == 10
    assert sum(k.endswith("attn1.to_q.weight") for k in state) == 56
    assert not any("norm2" in k or "attn2" in k for k in state)


def test_rel_shift_indexes_relative_positions() -> None:
    length = 5
    x = torch.arange(length * (2 * length - 1), dtype=torch.float32).view(length, -1)
    out = rel_shift(x)
    for i in range(length):
        for j in range(length):
            assert out[i, j] == x[i, length - 1 - i + j]


@pytest.mark.parametrize(("finalize", "frames"), [(True, 2 * 78), (False, 2 * 75)])
def test_output_shape_and_determinism(
    tiny: CausalMaskedDiffWithXvec,
    inputs: tuple[torch.Tensor, torch.Tensor],
    finalize: bool,
    frames: int,
) -> None:
    tokens, speaker = inputs
    torch.manual_seed(123)
    first = tiny.inference(tokens, speaker, finalize=finalize)
    torch.manual_seed(456)
    second = tiny.inference(tokens, speaker, finalize=finalize)
    assert first.shape == (1, 80, frames) and first.dtype == torch.float32
    assert torch.equal(first, second)


def test_fixed_noise_is_seed_zero_and_global_rng_untouched(tiny: CausalMaskedDiffWithXvec) -> None:
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    noise = tiny.decoder.noise(NOISE_FRAMES, torch.device("cpu"), torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = torch.randn([1, 80, NOISE_FRAMES])
    assert torch.equal(noise, expected)


def test_streaming_chunks_match_one_shot(
    tiny: CausalMaskedDiffWithXvec, inputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Chunk k of 25 tokens (+3 look-ahead, finalize=False) equals frames [50(k-1), 50k) of the
    single finalize=True run over all 78 tokens, within atol 1e-4 (float32, rtol 0)."""
    tokens, speaker = inputs
    full = tiny.inference(tokens, speaker, finalize=True)
    noise = tiny.decoder.noise(full.shape[2], torch.device("cpu"), torch.float32)
    # Guard against a vacuous pass: the model must move the output well away from the noise.
    assert (full - noise).abs().max() > 0.1
    for k in (1, 2, 3):
        part = tiny.inference(tokens[:, : 25 * k + 3], speaker, finalize=False)
        assert part.shape == (1, 80, 50 * k)
        window = slice(50 * (k - 1), 50 * k)
        torch.testing.assert_close(part[:, :, window], full[:, :, window], atol=1e-4, rtol=0)


def test_masks_and_speaker_matter(
    tiny: CausalMaskedDiffWithXvec, inputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    tokens, speaker = inputs
    streaming = tiny.inference(tokens, speaker, finalize=True)
    full_attention = tiny.inference(tokens, speaker, finalize=True, streaming=False)
    # The first chunk sees later frames only without the chunk masks.
    assert (streaming - full_attention)[:, :, :50].abs().max() > 1e-3
    other = tiny.inference(tokens, torch.randn(1, 192, generator=torch.Generator()), finalize=True)
    assert (streaming - other).abs().max() > 1e-3
    # The x-vector is L2-normalised, so its scale does not matter.
    scaled = tiny.inference(tokens, 10.0 * speaker, finalize=True)
    torch.testing.assert_close(scaled, streaming, atol=1e-5, rtol=0)


def test_bfloat16_parameters(inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    tokens, speaker = inputs
    model = tiny_model().to(torch.bfloat16)
    full = model.inference(tokens, speaker, finalize=True)
    part = model.inference(tokens[:, :53], speaker, finalize=False)
    assert full.dtype == torch.float32 and torch.isfinite(full).all()
    torch.testing.assert_close(part, full[:, :, :100], atol=2e-2, rtol=0)
    reference = tiny_model().inference(tokens, speaker, finalize=True)
    assert (full - reference).abs().max() < 0.1


def test_meta_construction_with_assigned_weights(
    tiny: CausalMaskedDiffWithXvec, inputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    tokens, speaker = inputs
    with torch.device("meta"):
        model = CausalMaskedDiffWithXvec(FlowConfig.from_dict(TINY_FLOW_CONFIG))
    model.load_state_dict(tiny.state_dict(), assign=True)
    assert not any(p.is_meta for p in model.parameters())
    expected = tiny.inference(tokens[:, :28], speaker, finalize=False)
    assert torch.equal(model.inference(tokens[:, :28], speaker, finalize=False), expected)


def test_invalid_inputs(tiny: CausalMaskedDiffWithXvec) -> None:
    speaker = torch.zeros(1, 192)
    with pytest.raises(ValueError, match="exceed"):
        tiny.inference(
            torch.zeros(1, NOISE_FRAMES // 2 + 1, dtype=torch.long), speaker, finalize=True
        )
    with pytest.raises(ValueError, match="nothing to render"):
        tiny.inference(torch.zeros(1, 3, dtype=torch.long), speaker, finalize=False)
    with pytest.raises(ValueError, match="speaker"):
        tiny.inference(torch.zeros(1, 30, dtype=torch.long), torch.zeros(1, 80), finalize=True)
