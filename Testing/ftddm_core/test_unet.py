"""Tests of the FTDDM UNet (reference §3) and its v2 use as the SR encoder: shapes, conditioning on t and s,
parameter counts, gradients, input checking, bf16 autocast, channels_last, batch independence, attention,
per-pixel norm and embedding against references, any input size, and exact invariance to zero padding."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ftddm_core.config import preset
from ftddm_core.nnutil import count_parameters
from ftddm_core.unet import AttentionBlock, ChannelNorm, ResBlock, UNet, timestep_embedding

N = 64  # training tile size of every preset
COND = preset("tiny").unet.cond_channels  # [LR_zf, M, T1, FLAIR, x̂0 of the encoder]


def perturbed(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Add small seeded noise to every parameter so the zero-initialised layers stop hiding the input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(batch: int = 2, seed: int = 1, cond_channels: int = COND, size: int = N, width: int | None = None):
    """Random (x_t, t, cond, s) with distinct timesteps and scales per item."""
    gen = torch.Generator().manual_seed(seed)
    width = width or size
    x = torch.randn(batch, 1, size, width, generator=gen)
    cond = torch.rand(batch, cond_channels, size, width, generator=gen)
    t = torch.arange(batch) * 37 + 5
    s = torch.linspace(2.0, 8.0, batch)
    return x, t, cond, s


@pytest.fixture(scope="module")
def tiny() -> UNet:
    torch.manual_seed(0)
    return perturbed(UNet(preset("tiny").unet))


# --- shapes and initial state ------------------------------------------------------------------------
def test_output_shape_equals_input_shape(tiny):
    x, t, cond, s = inputs(3)
    with torch.no_grad():
        assert tiny(x, t, cond, s).shape == x.shape


def test_compact_preset_output_shape():
    model = UNet(preset("compact").unet).eval()
    x, t, cond, s = inputs(1)
    with torch.no_grad():
        assert model(x, t, cond, s).shape == x.shape


def test_fresh_model_predicts_zero_because_output_conv_is_zero_initialised():
    model = UNet(preset("tiny").unet)
    with torch.no_grad():
        out = model(*inputs(2))
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(b.conv2.weight) == 0 for b in model.modules() if hasattr(b, "conv2"))


def test_perturbed_output_is_not_trivial(tiny):
    with torch.no_grad():
        out = tiny(*inputs(2))
    assert torch.isfinite(out).all() and out.std() > 1e-3


# --- conditioning --------------------------------------------------------------------------------------
def test_changing_scale_changes_output(tiny):
    x, t, cond, _ = inputs(2)
    with torch.no_grad():
        a = tiny(x, t, cond, torch.tensor([2.0, 2.0]))
        b = tiny(x, t, cond, torch.tensor([8.0, 8.0]))
        again = tiny(x, t, cond, torch.tensor([2.0, 2.0]))
    assert torch.equal(a, again)  # deterministic in eval mode, so the difference below is caused by s
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


def test_changing_timestep_changes_output(tiny):
    x, _, cond, s = inputs(2)
    with torch.no_grad():
        a = tiny(x, torch.tensor([10, 10]), cond, s)
        b = tiny(x, torch.tensor([90, 90]), cond, s)
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


def test_integer_and_float_timesteps_agree(tiny):
    x, t, cond, s = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(tiny(x, t, cond, s), tiny(x, t.float(), cond, s))


def test_condition_channels_are_used(tiny):
    x, t, cond, s = inputs(2)
    with torch.no_grad():
        a = tiny(x, t, cond, s)
        b = tiny(x, t, cond.flip(1), s)
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


# --- parameter counts ----------------------------------------------------------------------------------
def test_count_parameters_matches_hand_count():
    module = nn.Sequential(nn.Linear(3, 4), nn.Conv2d(2, 5, 3))  # (3·4+4) + (2·5·9+5)
    assert count_parameters(module) == 16 + 95


def test_paper_parameter_count_is_near_published_size():
    count = count_parameters(UNet(preset("paper").unet))
    print(f"\npaper UNet parameters: {count:,} ({count / 1e6:.2f} M; reference 30.3 M)")
    assert abs(count - 30.3e6) <= 0.15 * 30.3e6


def test_compact_parameter_count_printed():
    count = count_parameters(UNet(preset("compact").unet))
    print(f"\ncompact UNet parameters: {count:,} ({count / 1e6:.2f} M)")
    assert 1e6 < count < count_parameters(UNet(preset("paper").unet))


# --- gradients -----------------------------------------------------------------------------------------
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = perturbed(UNet(preset("tiny").unet)).train()
    model(*inputs(2)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert missing == []


def test_gradcheck_against_finite_differences():
    """Autograd of the whole network (inputs x_t and s) agrees with central differences in float64."""
    cfg = dataclasses.replace(preset("tiny").unet, image_size=8, attention_resolutions=(8, 4))
    torch.manual_seed(0)
    model = perturbed(UNet(cfg), std=0.1).double()
    x, t, cond, s = inputs(1, size=8)
    x, cond, s = x.double().requires_grad_(), cond.double(), s.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, s_: model(x_, t, cond, s_), (x, s), eps=1e-6, atol=1e-5)


# --- input checking ------------------------------------------------------------------------------------
def _bad_inputs():
    x, t, cond, s = inputs(2)
    return {
        "x_t rank 3": (x[:, 0], t, cond, s),
        "x_t two channels": (torch.cat([x, x], 1), t, cond, s),
        "cond wrong channels": (x, t, cond[:, :3], s),
        "cond rank 3": (x, t, cond[0], s),
        "size not a multiple of 8": (x[..., :60, :60], t, cond[..., :60, :60], s),
        "width not a multiple of 8": (x[..., :, :36], t, cond[..., :, :36], s),
        "smaller than the multiple": (x[..., :4, :4], t, cond[..., :4, :4], s),
        "cond size differs": (x, t, cond[..., :32, :32], s),
        "x_t None for a UNet with image input": (None, t, cond, s),
        "valid wrong shape": (x, t, cond, s, torch.ones(2, 1, 32, 32)),
        "t batch": (x, t[:1], cond, s),
        "t rank 2": (x, t[:, None], cond, s),
        "t scalar": (x, t[0], cond, s),
        "cond batch": (x, t, cond[:1], s),
        "scale batch": (x, t, cond, s[:1]),
        "scale rank 0": (x, t, cond, torch.tensor(4.0)),
        "scale not a tensor": (x, t, cond, 4.0),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_value_error(tiny, case):
    with pytest.raises(ValueError, match="expected|must"):
        tiny(*_bad_inputs()[case])


@pytest.mark.parametrize(
    "change",
    [
        {"image_channels": 0, "cond_channels": 0},
        {"image_channels": -1},
        {"image_size": 60},  # not a multiple of 2**3
        {"num_heads": 3},
        {"channels": ()},
        {"num_res_blocks": 0},
        {"dropout": 1.0},
    ],
)
def test_bad_config_raises_value_error(change):
    with pytest.raises(ValueError):
        UNet(dataclasses.replace(preset("tiny").unet, **change))


# --- precision, memory format, batching -----------------------------------------------------------------
def test_bf16_autocast_is_close_to_fp32(tiny):
    x, t, cond, s = inputs(2)
    with torch.no_grad():
        ref = tiny(x, t, cond, s)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = tiny(x, t, cond, s)
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_channels_last_matches_contiguous(tiny):
    x, t, cond, s = inputs(2)
    model_cl = copy.deepcopy(tiny).to(memory_format=torch.channels_last)
    assert model_cl.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = tiny(x, t, cond, s)
        out = model_cl(x.to(memory_format=torch.channels_last), t, cond.to(memory_format=torch.channels_last), s)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_batch_output_equals_per_item_outputs(tiny):
    x, t, cond, s = inputs(3)
    with torch.no_grad():
        batched = tiny(x, t, cond, s)
        single = torch.cat([tiny(x[i : i + 1], t[i : i + 1], cond[i : i + 1], s[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


# --- building blocks against independent references ---------------------------------------------------
def test_attention_block_matches_torch_multihead_attention():
    torch.manual_seed(0)
    c, heads = 24, 4  # head_dim 6 ≠ heads, so a transposed head split cannot pass by symmetry
    block = perturbed(AttentionBlock(c, heads))
    mha = nn.MultiheadAttention(c, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight.reshape(3 * c, c))
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight.reshape(c, c))
        mha.out_proj.bias.copy_(block.proj.bias)
        x = torch.randn(2, c, 5, 6)
        seq = block.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        ref = x + mha(seq, seq, seq, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-4)


def _layer_norm_over_channels(x, weight, bias, eps=1e-5):
    """Reference per-pixel norm: mean and biased variance over the channel axis only."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def test_channel_norm_normalises_each_pixel_over_channels():
    norm = perturbed(ChannelNorm(6), std=0.3)
    x = 3.0 + 2.0 * torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), _layer_norm_over_channels(x, norm.weight, norm.bias))
        # no statistics over space: a pixel's output ignores every other pixel
        y = x.clone()
        y[..., 1:, :] = 100.0
        torch.testing.assert_close(norm(y)[..., 0, :], norm(x)[..., 0, :])


def test_residual_block_applies_one_plus_scale_and_shift_after_channel_norm():
    """With a constant embedding projection (scale a, shift b) the block is x + conv2(SiLU(N(h)·(1+a)+b))."""
    torch.manual_seed(0)
    block = perturbed(ResBlock(8, 12, emb_dim=5, dropout=0.0))
    a, b = torch.randn(12), torch.randn(12)
    with torch.no_grad():
        block.emb_proj.weight.zero_()
        block.emb_proj.bias.copy_(torch.cat([a, b]))
        x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 5)
        h = block.conv1(F.silu(_layer_norm_over_channels(x, block.norm1.weight, block.norm1.bias)))
        h = _layer_norm_over_channels(h, block.norm2.weight, block.norm2.bias) * (1 + a[:, None, None]) + b[:, None, None]
        ref = block.skip(x) + block.conv2(F.silu(h))
        torch.testing.assert_close(block(x, emb), ref)


def test_attention_with_valid_mask_matches_multihead_attention_with_key_padding_mask():
    torch.manual_seed(0)
    c, heads = 12, 3
    block = perturbed(AttentionBlock(c, heads))
    mha = nn.MultiheadAttention(c, heads, batch_first=True)
    valid = torch.zeros(2, 1, 4, 6)
    valid[0, :, :3, :5] = 1
    valid[1, :, :4, :2] = 1
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight.reshape(3 * c, c))
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight.reshape(c, c))
        mha.out_proj.bias.copy_(block.proj.bias)
        x = torch.randn(2, c, 4, 6) * valid
        seq = block.norm(x).flatten(2).transpose(1, 2)
        attended = mha(seq, seq, seq, key_padding_mask=valid.flatten(1) == 0, need_weights=False)[0]
        ref = (x + attended.transpose(1, 2).reshape(x.shape)) * valid
        torch.testing.assert_close(block(x, valid), ref, atol=1e-5, rtol=1e-4)


def test_timestep_embedding_matches_diffusers():
    diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 1.0, 99.0, 999.0, 12.5])
    ref = diffusers_embeddings.get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 32), ref)


def test_model_config_is_kept_and_default_embed_width_is_four_times_base_channels():
    cfg = preset("tiny").unet
    model = UNet(cfg)
    assert model.config == cfg and cfg.embed_dim == 0
    assert model.time_mlp[0].out_features == 4 * cfg.channels[0]
    assert model.scale_mlp[0].in_features == 1
    wide = UNet(dataclasses.replace(cfg, embed_dim=24))
    assert wide.time_mlp[-1].out_features == 24 and wide.scale_mlp[-1].out_features == 24


# --- any image size, exact zero-padding invariance (FTDDM v2, real-acquisitions issue) -----------------------
@pytest.fixture(scope="module")
def tiny_encoder() -> UNet:
    torch.manual_seed(1)
    return perturbed(UNet(preset("tiny").encoder), seed=4)


def _pad_bottom_right(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))


def _valid(batch: int, h: int, w: int, height: int, width: int) -> torch.Tensor:
    return _pad_bottom_right(torch.ones(batch, 1, h, w), height, width)


def test_encoder_has_no_image_input_and_refuses_one(tiny_encoder):
    cfg = tiny_encoder.config
    assert cfg.image_channels == 0 and tiny_encoder.input_conv.in_channels == cfg.cond_channels == 4
    x, t, cond, s = inputs(2, cond_channels=4, size=16, width=24)
    with torch.no_grad():
        out, features = tiny_encoder.forward_features(None, torch.zeros_like(t), cond, s)
    assert out.shape == (2, 1, 16, 24)
    # decoder features per level: level i at 1/2**i with the config's channel count
    assert [tuple(f.shape) for f in features] == [(2, c, 16 // 2**i, 24 // 2**i) for i, c in enumerate(cfg.channels)]
    with pytest.raises(ValueError, match="x_t=None"):
        tiny_encoder(x, t, cond, s)


@pytest.mark.parametrize("network", ["tiny", "tiny_encoder"])
def test_zero_padded_input_with_valid_mask_gives_the_unpadded_result(network, request):
    """The 24×40 image alone and inside a 40×64 zero canvas (top-left) agree inside, features too."""
    model = request.getfixturevalue(network)
    channels = model.config.cond_channels
    x, t, cond, s = inputs(2, cond_channels=channels, size=24, width=40)
    x_in = x if model.config.image_channels else None
    pad_x = None if x_in is None else _pad_bottom_right(x, 40, 64)
    valid = _valid(2, 24, 40, 40, 64)
    with torch.no_grad():
        ref, ref_features = model.forward_features(x_in, t, cond, s)
        out, features = model.forward_features(pad_x, t, _pad_bottom_right(cond, 40, 64), s, valid)
    assert out.shape == (2, 1, 40, 64)
    torch.testing.assert_close(out[..., :24, :40], ref, rtol=0, atol=1e-5)
    assert torch.count_nonzero(out * (1 - valid)) == 0  # the padding stays zero
    for level, (f, f_ref) in enumerate(zip(features, ref_features)):
        h, w = f_ref.shape[-2:]
        torch.testing.assert_close(f[..., :h, :w], f_ref, rtol=0, atol=1e-5, msg=f"level {level}")
    # without the mask the padding's nonzero activations leak in: the mask is what makes this exact
    with torch.no_grad():
        leaky = model(pad_x, t, _pad_bottom_right(cond, 40, 64), s)
    assert (leaky[..., :24, :40] - ref).abs().max() > 1e-4


def test_valid_mask_of_a_non_multiple_image_matches_a_larger_canvas(tiny):
    """A 20×28 image needs padding either way; padded to 24×32 or to 40×48 it gives the same result inside."""
    x, t, cond, s = inputs(2, size=20, width=28)
    outs = []
    for height, width in ((24, 32), (40, 48)):
        with torch.no_grad():
            outs.append(tiny(_pad_bottom_right(x, height, width), t, _pad_bottom_right(cond, height, width), s,
                             _valid(2, 20, 28, height, width))[..., :20, :28])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_parameters_do_not_depend_on_the_input_size_and_run_on_rectangles():
    """No position-tied parameters: the same weights (built for 64×64 tiles) run on 16×16, 64×64 and 128×168,
    and running changes no parameter or buffer (image_size only picks the attention levels)."""
    model = perturbed(UNet(preset("tiny").unet))
    before = {n: v.clone() for n, v in model.state_dict().items()}
    for height, width in ((16, 16), (64, 64), (128, 168)):
        x, t, cond, s = inputs(1, size=height, width=width)
        with torch.no_grad():
            out = model(x, t, cond, s)
        assert out.shape == (1, 1, height, width) and torch.isfinite(out).all()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
