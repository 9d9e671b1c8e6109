"""Tests of FTDDM v2's conditional normalizing flow (reference §4): exact invertibility, log-det against the
autograd Jacobian (also on a zero-padded canvas with a valid mask), the conditional prior against
torch.distributions, sampling with τ and generators, exact invariance to zero padding, any image size,
actnorm data initialisation and its state_dict round trip, parameter counts, gradients and input checking."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftddm_core.config import FlowConfig, preset
from ftddm_core.flow import ActNorm, ConditionalFlow, InvertibleConv1x1, latent_shapes, valid_pyramid
from ftddm_core.nnutil import count_parameters

N = 64  # training tile size of every preset
PAPER_FLOW_PARAMS = 17.6e6  # published size of the flow (reference §4)
COND = preset("tiny").flow.cond_channels  # [LR_zf, M, T1, FLAIR, x̂0 of the encoder]


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Default layer initialisation draws from the global RNG: seed it so each test sees the same model."""
    torch.manual_seed(0)


def perturbed(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Add small seeded noise to every parameter, so the zero-initialised layers stop being the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def inputs(batch: int = 2, seed: int = 1, size: int = N, width: int | None = None, dtype=torch.float32,
           cfg: FlowConfig | None = None):
    """Random (x, cond, encoder features): x like a noisy residual, cond like [LR_zf, M, T1, FLAIR, x̂0_enc] in
    [0, 1], features like the SR encoder's (one (B, C_l, H/2**l, W/2**l) tensor per flow level)."""
    cfg = cfg or preset("tiny").flow
    width = width or size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, width, generator=gen, dtype=dtype)
    cond = torch.rand(batch, cfg.cond_channels, size, width, generator=gen, dtype=dtype)
    features = [torch.randn(batch, c, size // 2**level, width // 2**level, generator=gen, dtype=dtype)
                for level, c in enumerate(cfg.feature_channels)] or None
    return x, cond, features


def small_config(**changes) -> FlowConfig:
    """8×8 flow with two levels (z = 2·4² + 8·2² = 64 dims), small enough for a full Jacobian, with the v2
    conditioning: 5 condition channels and encoder features at every level."""
    base = FlowConfig(image_size=8, levels=2, steps_per_level=2, hidden_channels=8, cond_hidden=4,
                      feature_channels=(3, 4, 5))
    return dataclasses.replace(base, **changes)


def pad_to(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad at the bottom/right (as FTDDM.pad does)."""
    return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))


def padded_inputs(x, cond, features, height: int, width: int):
    """(x, cond, features, valid) of the same image on a larger zero canvas (features at each level's size)."""
    h, w = cond.shape[-2:]
    feats = None if features is None else [pad_to(f, height // 2**l, width // 2**l) for l, f in enumerate(features)]
    valid = pad_to(torch.ones(cond.shape[0], 1, h, w, dtype=cond.dtype), height, width)
    return pad_to(x, height, width), pad_to(cond, height, width), feats, valid


def pieces_of(flow: ConditionalFlow, z: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
    return flow._unflatten(z, height, width)


def crop_pieces(pieces, like) -> list[torch.Tensor]:
    return [p[..., : q.shape[-2], : q.shape[-1]] for p, q in zip(pieces, like)]


# ---------------------------------------------------------------------------------------------- sizes
def test_latent_dimension_equals_image_dimension_on_any_size():
    cfg = preset("tiny").flow
    assert latent_shapes(cfg, N, N) == [(1, 2, 32, 32), (2, 4, 16, 16), (3, 16, 8, 8)]
    assert latent_shapes(cfg, 16, 24) == [(1, 2, 8, 12), (2, 4, 4, 6), (3, 16, 2, 3)]
    flow = ConditionalFlow(cfg).eval()
    assert flow.z_dim() == 2 * 32**2 + 4 * 16**2 + 16 * 8**2 == N * N
    for height, width in ((N, N), (16, 24), (8, 40)):
        x, cond, feats = inputs(batch=2, size=height, width=width)
        with torch.no_grad():
            z, logdet = flow(x, cond, feats)
        assert z.shape == (2, height * width) == (2, flow.z_dim(height, width)) and logdet.shape == (2,)


def test_paper_parameter_count_matches_publication():
    count = count_parameters(ConditionalFlow(preset("paper").flow))
    print(f"paper flow parameters: {count:,} (published ~17.6 M)")
    assert abs(count - PAPER_FLOW_PARAMS) / PAPER_FLOW_PARAMS < 0.15


def test_compact_parameter_count_is_printed_and_smaller():
    compact = count_parameters(ConditionalFlow(preset("compact").flow))
    tiny = count_parameters(ConditionalFlow(preset("tiny").flow))
    print(f"compact flow parameters: {compact:,}; tiny: {tiny:,}")
    assert tiny < compact < PAPER_FLOW_PARAMS


def test_no_position_tied_parameters():
    """The parameters (names and shapes) are the same whatever the training tile size, and one set of weights
    runs on 16×16, 64×64 and 128×168 without changing any parameter or buffer."""
    cfg = preset("tiny").flow
    shapes = {n: v.shape for n, v in ConditionalFlow(cfg).state_dict().items()}
    for size in (16, 128):
        other = ConditionalFlow(dataclasses.replace(cfg, image_size=size)).state_dict()
        assert {n: v.shape for n, v in other.items()} == shapes
    flow = perturbed(ConditionalFlow(cfg))
    before = {n: v.clone() for n, v in flow.state_dict().items()}
    for height, width in ((16, 16), (64, 64), (128, 168)):
        _, cond, feats = inputs(batch=1, size=height, width=width)
        with torch.no_grad():
            out = flow.sample(cond, tau=0.9, generator=torch.Generator().manual_seed(0), enc_features=feats)
        assert out.shape == (1, 1, height, width) and torch.isfinite(out).all()
    assert all(torch.equal(before[n], v) for n, v in flow.state_dict().items())


# ---------------------------------------------------------------------------------------------- invertibility
@pytest.mark.parametrize("name, batch", [("tiny", 2), ("compact", 2), ("paper", 1)])
def test_inverse_of_forward_is_identity_for_presets(name, batch):
    cfg = preset(name).flow
    x, cond, feats = inputs(batch=batch, size=32, width=48, cfg=cfg)
    with torch.no_grad():
        flow = ConditionalFlow(cfg).eval()
        z_identity_init, _ = flow(x, cond, feats)
        perturbed(flow)
        z, logdet = flow(x, cond, feats)
        x_back = flow.inverse(z, cond, feats)
    # the perturbed flow really transforms: z moved and the volume changed
    assert (z - z_identity_init).abs().max() > 0.1
    assert logdet.abs().min() > 1.0
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "compact"])
def test_forward_of_inverse_is_identity(name):
    cfg = preset(name).flow
    flow = perturbed(ConditionalFlow(cfg), seed=3)
    _, cond, feats = inputs(batch=2, seed=4, size=N, cfg=cfg)
    z = torch.randn(2, flow.z_dim(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z_back, _ = flow(flow.inverse(z, cond, feats), cond, feats)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-4)


def test_identity_initialised_flow_preserves_volume():
    """At initialisation every injector/coupling is the identity and W is orthogonal, so log|det| = 0."""
    flow = ConditionalFlow(preset("tiny").flow).eval()
    x, cond, feats = inputs(batch=2)
    z, logdet = flow(x, cond, feats)
    torch.testing.assert_close(logdet, torch.zeros(2), rtol=0, atol=1e-3)
    assert z.norm(dim=1).sub(x.flatten(1).norm(dim=1)).abs().max() < 1e-3  # orthogonal map keeps the norm


def test_encoder_features_condition_the_flow_and_are_required():
    flow = perturbed(ConditionalFlow(preset("tiny").flow), std=0.05)
    x, cond, feats = inputs(batch=1, size=16)
    with torch.no_grad():
        z, _ = flow(x, cond, feats)
        z_other, _ = flow(x, cond, [f.flip(-1) for f in feats])
    assert (z - z_other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="enc_features"):
        flow(x, cond)


# ---------------------------------------------------------------------------------------------- log-det
def _jacobian_logdet(flow, x, cond, feats, valid=None, x_index=None, z_index=None):
    """log|det ∂z/∂x| by autograd (float64), optionally restricted to the image's pixels and latent entries."""
    x_index = torch.arange(x.numel()) if x_index is None else x_index
    z_index = slice(None) if z_index is None else z_index

    def z_of(x_part: torch.Tensor) -> torch.Tensor:
        full = x.flatten().clone()
        full[x_index] = x_part
        return flow(full.reshape(x.shape), cond, feats, valid)[0][0][z_index]

    jacobian = torch.autograd.functional.jacobian(z_of, x.flatten()[x_index])
    assert jacobian.shape[0] == jacobian.shape[1] == len(x_index)
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    return log_abs_det.item()


@pytest.mark.parametrize("levels, steps", [(2, 2), (1, 1)])
def test_logdet_equals_log_abs_det_of_autograd_jacobian(levels, steps):
    cfg = small_config(levels=levels, steps_per_level=steps, feature_channels=(3, 4, 5)[: levels + 1])
    flow = perturbed(ConditionalFlow(cfg).double(), std=0.1)
    x, cond, feats = inputs(batch=1, size=16, width=8, dtype=torch.float64, cfg=cfg)
    _, logdet = flow(x, cond, feats)
    assert abs(logdet.item()) > 0.5  # non-trivial
    assert logdet.item() == pytest.approx(_jacobian_logdet(flow, x, cond, feats), abs=1e-8)


def _valid_latent_index(cfg: FlowConfig, valid: torch.Tensor) -> torch.Tensor:
    """Indices of the flat z entries whose cell holds image pixels."""
    h, w = valid.shape[-2:]
    valids = valid_pyramid(valid, cfg.levels + 1)
    marks = [valids[level][:, :1].expand(-1, c, -1, -1).flatten(1) for level, c, _, _ in latent_shapes(cfg, h, w)]
    return torch.cat(marks, dim=1)[0].nonzero().flatten()


def test_logdet_with_a_valid_mask_is_that_of_the_image_part():
    """On a zero-padded canvas the flow maps the image's pixels to the image's latent entries: logdet is
    log|det| of that square block of the autograd Jacobian (8×8 image in a 16×12 canvas)."""
    cfg = small_config()
    flow = perturbed(ConditionalFlow(cfg).double(), std=0.1)
    x, cond, feats = inputs(batch=1, size=8, dtype=torch.float64, cfg=cfg)
    px, pcond, pfeats, valid = padded_inputs(x, cond, feats, 16, 12)
    _, logdet = flow(px, pcond, pfeats, valid)
    x_index = valid.flatten().nonzero().flatten()
    z_index = _valid_latent_index(cfg, valid)
    expected = _jacobian_logdet(flow, px, pcond, pfeats, valid, x_index, z_index)
    assert abs(expected) > 0.5
    assert logdet.item() == pytest.approx(expected, abs=1e-8)
    assert logdet.item() == pytest.approx(flow(x, cond, feats)[1].item(), abs=1e-8)  # the unpadded image's


def test_invertible_conv_logdet_and_orthogonal_init():
    conv = InvertibleConv1x1(8, torch.Generator().manual_seed(0)).double()
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)
    with torch.no_grad():
        conv.log_s.add_(0.3 * torch.randn(8, dtype=torch.float64))
        conv.lower.add_(0.3 * torch.randn(8, 8, dtype=torch.float64))
    _, ref = torch.linalg.slogdet(conv.weight())
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    y, logdet = conv(x, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(logdet, torch.full((2,), 15 * ref.item(), dtype=torch.float64))
    # a 1×1 convolution is the matrix product over channels at every pixel
    torch.testing.assert_close(y, torch.einsum("oc,bchw->bohw", conv.weight(), x))
    torch.testing.assert_close(conv.inverse(y), x)


# ---------------------------------------------------------------------------------------------- conditional prior
def _prior_normals(flow, cond, feats, height, width):
    """The prior of each latent piece from the prior networks applied to the condition features by hand."""
    features, _ = flow.context(cond, feats)
    normals = []
    for net, (level, _, _, _) in zip(flow.prior_nets, latent_shapes(flow.config, height, width)):
        mean, log_std = net(features[level]).chunk(2, dim=1)
        normals.append(torch.distributions.Normal(mean, log_std.exp()))
    return normals


def perturbed_prior(flow: ConditionalFlow, seed: int = 8, std: float = 0.1) -> ConditionalFlow:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.prior_nets.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow


def test_prior_starts_as_standard_normal():
    flow = perturbed(ConditionalFlow(preset("tiny").flow), seed=7, std=0.05)
    with torch.no_grad():  # everything but the prior nets perturbed: they are zero-initialised
        for p in flow.prior_nets.parameters():
            p.zero_()
    fresh = ConditionalFlow(preset("tiny").flow)
    assert all(torch.count_nonzero(p) == 0 for p in fresh.prior_nets.parameters())
    x, cond, feats = inputs(batch=2, size=16, width=24)
    with torch.no_grad():
        z, logdet = flow(x, cond, feats)
        standard = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1)
        torch.testing.assert_close(flow.log_prob(x, cond, feats), standard + logdet)


def test_log_prob_is_conditional_prior_density_plus_logdet():
    """log p(x|c) = Σ_pieces log N(z_l; μ_l(c), σ_l(c)) + logdet, against torch.distributions.Normal."""
    flow = perturbed_prior(perturbed(ConditionalFlow(preset("tiny").flow), seed=7, std=0.05))
    x, cond, feats = inputs(batch=2, size=16, width=24)
    with torch.no_grad():
        z, logdet = flow(x, cond, feats)
        normals = _prior_normals(flow, cond, feats, 16, 24)
        assert max(float(n.loc.abs().max()) for n in normals) > 0.01  # the prior really depends on c
        assert max(float(n.scale.log().abs().max()) for n in normals) > 0.01
        expected = sum(n.log_prob(p).flatten(1).sum(dim=1) for n, p in zip(normals, pieces_of(flow, z, 16, 24)))
        expected = expected + logdet
        torch.testing.assert_close(flow.log_prob(x, cond, feats), expected)
        bits = flow.nll_bits_per_dim(x, cond, feats)
    torch.testing.assert_close(bits, -expected / (16 * 24 * math.log(2)))


def test_log_prob_of_a_small_flow_matches_change_of_variables():
    """Smallest case by hand: a 2×2 image with one level; p(x) from z = F(x), a diagonal Gaussian with the
    conditional mean and std, and |det J| by autograd."""
    cfg = FlowConfig(image_size=2, levels=1, steps_per_level=1, hidden_channels=4, cond_hidden=2,
                     feature_channels=(2, 3))
    flow = perturbed_prior(perturbed(ConditionalFlow(cfg).double(), seed=2, std=0.2), std=0.3)
    x, cond, feats = inputs(batch=1, size=2, dtype=torch.float64, cfg=cfg)
    z, _ = flow(x, cond, feats)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, 1, 2, 2), cond, feats)[0][0],
                                                  x.flatten())
    (normal,) = _prior_normals(flow, cond, feats, 2, 2)
    gaussian = torch.distributions.MultivariateNormal(
        normal.loc.detach().flatten(), covariance_matrix=torch.diag(normal.scale.detach().flatten() ** 2))
    expected = gaussian.log_prob(z.detach()[0]) + torch.linalg.slogdet(jacobian)[1]
    assert flow.log_prob(x, cond, feats).item() == pytest.approx(expected.item(), abs=1e-10)


# ---------------------------------------------------------------------------------------------- sampling
def _flat_prior(flow, cond, feats, height, width):
    normals = _prior_normals(flow, cond, feats, height, width)
    return (torch.cat([n.loc.flatten(1) for n in normals], dim=1),
            torch.cat([n.scale.flatten(1) for n in normals], dim=1))


def test_sample_shapes_and_tau_zero_is_the_deterministic_mode():
    flow = perturbed_prior(perturbed(ConditionalFlow(preset("tiny").flow), seed=11))
    _, cond, feats = inputs(batch=3, size=16, width=24)
    with torch.no_grad():
        mode_a = flow.sample(cond, tau=0.0, enc_features=feats)
        mode_b = flow.sample(cond, tau=0.0, generator=torch.Generator().manual_seed(99), enc_features=feats)
        mean, _ = _flat_prior(flow, cond, feats, 16, 24)
        expected = flow.inverse(mean, cond, feats)
        random = flow.sample(cond, tau=1.0, enc_features=feats)
    assert mode_a.shape == random.shape == (3, 1, 16, 24)
    assert torch.equal(mode_a, mode_b)
    torch.testing.assert_close(mode_a, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(random, mode_a, atol=1e-3)


def test_sample_latent_is_mean_plus_tau_sigma_eps_and_generator_reproducible():
    flow = perturbed_prior(perturbed(ConditionalFlow(preset("tiny").flow), seed=12))
    _, cond, feats = inputs(batch=2, size=16, width=24)
    tau = 0.7
    with torch.no_grad():
        a = flow.sample(cond, tau=tau, generator=torch.Generator().manual_seed(5), enc_features=feats)
        b = flow.sample(cond, tau=tau, generator=torch.Generator().manual_seed(5), enc_features=feats)
        c = flow.sample(cond, tau=tau, generator=torch.Generator().manual_seed(6), enc_features=feats)
        z_a, _ = flow(a, cond, feats)
        mean, std = _flat_prior(flow, cond, feats, 16, 24)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    eps = torch.randn(2, flow.z_dim(16, 24), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z_a, mean + tau * std * eps, rtol=0, atol=1e-4)


def test_per_row_generators_make_each_row_independent_of_the_batch():
    flow = perturbed_prior(perturbed(ConditionalFlow(preset("tiny").flow), seed=12))
    _, cond, feats = inputs(batch=2, size=16)
    with torch.no_grad():
        both = flow.sample(cond, 0.9, [torch.Generator().manual_seed(s) for s in (3, 4)], feats)
        second = flow.sample(cond[1:], 0.9, [torch.Generator().manual_seed(4)], [f[1:] for f in feats])
    torch.testing.assert_close(both[1:], second, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one generator per batch row"):
        flow.sample(cond, 0.9, [torch.Generator()], feats)


def test_mode_is_differentiable_for_the_guide_loss():
    """x̂ = F⁻¹(μ(c); c) must pass gradients to the prior networks and to every layer (guide loss, §4)."""
    flow = perturbed(ConditionalFlow(preset("tiny").flow), seed=13).train()
    _, cond, feats = inputs(batch=2, size=16)
    flow.sample(cond, tau=0.0, enc_features=feats).abs().mean().backward()
    assert all(net.weight.grad.abs().sum() > 0 for net in flow.prior_nets)
    assert flow.level0_injector.net.last.weight.grad.abs().sum() > 0
    assert flow.levels[-1][-1].invconv.lower.grad is not None
    assert flow.cond_encoders[0].project.weight.grad.abs().sum() > 0  # the encoder features are used


# ---------------------------------------------------------------------------------------------- padding
@pytest.fixture(scope="module")
def padded_flow() -> ConditionalFlow:
    torch.manual_seed(0)
    return perturbed_prior(perturbed(ConditionalFlow(preset("tiny").flow), seed=14, std=0.05))


def test_forward_log_prob_and_inverse_ignore_zero_padding(padded_flow):
    """A 16×24 image alone and in a 32×40 zero canvas with its valid mask: same latent pieces inside (zero
    outside), same logdet and log p, and the inverse of the padded latent is the image, zero-padded."""
    flow = padded_flow
    x, cond, feats = inputs(batch=2, size=16, width=24)
    px, pcond, pfeats, valid = padded_inputs(x, cond, feats, 32, 40)
    with torch.no_grad():
        z, logdet = flow(x, cond, feats)
        pz, plogdet = flow(px, pcond, pfeats, valid)
        ref, out = pieces_of(flow, z, 16, 24), pieces_of(flow, pz, 32, 40)
        for piece, inside in zip(out, ref):
            torch.testing.assert_close(piece[..., : inside.shape[-2], : inside.shape[-1]], inside, rtol=0, atol=1e-5)
            assert piece.abs().sum() == pytest.approx(inside.abs().sum().item(), rel=1e-5)  # zero outside
        torch.testing.assert_close(plogdet, logdet, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(flow.log_prob(px, pcond, pfeats, valid), flow.log_prob(x, cond, feats),
                                   rtol=1e-6, atol=1e-3)
        back = flow.inverse(pz, pcond, pfeats, valid)
    torch.testing.assert_close(back, px, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tau", [0.0, 0.9])
def test_samples_ignore_zero_padding(padded_flow, tau):
    """The mode and τ > 0 draws with per-row generators: the same image alone and padded give the same map."""
    flow = padded_flow
    x, cond, feats = inputs(batch=2, size=16, width=24)
    _, pcond, pfeats, valid = padded_inputs(x, cond, feats, 32, 40)
    with torch.no_grad():
        ref = flow.sample(cond, tau, [torch.Generator().manual_seed(s) for s in (1, 2)], feats)
        out = flow.sample(pcond, tau, [torch.Generator().manual_seed(s) for s in (1, 2)], pfeats, valid)
    torch.testing.assert_close(out[..., :16, :24], ref, rtol=0, atol=1e-5)
    assert torch.count_nonzero(out[..., 16:, :]) == torch.count_nonzero(out[..., :, 24:]) == 0


def test_samples_of_a_non_multiple_image_do_not_depend_on_the_canvas(padded_flow):
    """A 20×28 image (not a multiple of 8) padded to 24×32 or to 40×48: the same draws inside."""
    flow = padded_flow
    _, cond, _ = inputs(batch=2, size=20, width=28)
    gen = torch.Generator().manual_seed(3)
    # the encoder's features cover the cells that hold image pixels and are zero elsewhere (its valid mask)
    feats = [torch.randn(2, c, -(-20 // 2**l), -(-28 // 2**l), generator=gen)
             for l, c in enumerate(flow.config.feature_channels)]
    outs = []
    for height, width in ((24, 32), (40, 48)):
        valid = pad_to(torch.ones(2, 1, 20, 28), height, width)
        padded_feats = [pad_to(f, height // 2**l, width // 2**l) for l, f in enumerate(feats)]
        with torch.no_grad():
            out = flow.sample(pad_to(cond, height, width), 0.9, [torch.Generator().manual_seed(s) for s in (1, 2)],
                              padded_feats, valid)
        assert torch.count_nonzero(out * (1 - valid)) == 0
        outs.append(out[..., :20, :28])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- actnorm
def test_actnorm_data_init_gives_zero_mean_unit_variance_and_survives_state_dict():
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 2.5 * torch.randn(4, 3, 8, 8, generator=gen) * torch.tensor([1.0, 0.1, 4.0]).view(1, 3, 1, 1)
    norm = ActNorm(3).train()
    assert not norm.initialized
    y, logdet = norm(x, torch.zeros(4))
    assert norm.initialized
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), rtol=0, atol=1e-4)
    std = x.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(logdet, torch.full((4,), -64 * std.log().sum().item()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(norm.inverse(y), x, rtol=0, atol=1e-4)

    other = torch.randn(4, 3, 8, 8, generator=gen)
    first_out, _ = norm(other, torch.zeros(4))  # no second initialisation
    loaded = ActNorm(3).train()
    loaded.load_state_dict(norm.state_dict())
    assert "initialized" in norm.state_dict() and loaded.initialized
    torch.testing.assert_close(loaded(other, torch.zeros(4))[0], first_out)


def test_flow_first_training_forward_initialises_every_actnorm_once():
    flow = ConditionalFlow(preset("tiny").flow).train()
    actnorms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    assert len(actnorms) == 1 + 3 * preset("tiny").flow.steps_per_level and not any(a.initialized for a in actnorms)
    x, cond, feats = inputs(batch=2, size=16)
    x = 5.0 + 3.0 * x
    with torch.no_grad():
        z, _ = flow(x, cond, feats)
    assert all(a.initialized for a in actnorms)
    # level 0 starts with actnorm, so the normalised input is what the (identity-initialised) injector passes on
    assert abs(flow.level0_actnorm.bias.item() + x.mean().item()) < 1e-4

    restored = ConditionalFlow(preset("tiny").flow).train()
    restored.load_state_dict(flow.state_dict())
    x2, cond2, feats2 = inputs(batch=2, seed=9, size=16)
    with torch.no_grad():
        torch.testing.assert_close(restored(x2, cond2, feats2)[0], flow(x2, cond2, feats2)[0])


# ---------------------------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_value_errors_saying_what_was_expected():
    flow = ConditionalFlow(preset("tiny").flow).eval()
    x, cond, feats = inputs(batch=2, size=16, width=24)
    bad_pairs = [
        (x[0], cond, "x must have shape"),  # rank 3
        (x.repeat(1, 2, 1, 1), cond, "x must have shape"),  # channels
        (x[:, :, :8], cond, "x must have shape"),  # H differs from cond's
        (x[:, :, :, :20], cond[:, :, :, :20], "multiple of 2\\*\\*levels = 8"),  # W not a multiple
        (x[:, :, :4], cond[:, :, :4], "multiple of 2\\*\\*levels = 8"),  # smaller than the multiple
        (x, cond[:, :3], "cond must have shape"),  # cond channels
        (x, cond[0], "cond must have shape"),  # cond rank
        (x[:1], cond, "same batch size"),
    ]
    for bad_x, bad_cond, message in bad_pairs:
        with pytest.raises(ValueError, match=message):
            flow(bad_x, bad_cond, feats)
    with pytest.raises(ValueError, match="expected|must have shape"):
        flow.log_prob(x[:, :, :, :-1], cond, feats)
    with pytest.raises(ValueError, match="valid must have shape"):
        flow(x, cond, feats, torch.ones(2, 1, 16, 16))
    z = torch.zeros(2, flow.z_dim(16, 24))
    with pytest.raises(ValueError, match=f"z must have shape \\(B, {16 * 24}\\)"):
        flow.inverse(z[:, :-1], cond, feats)
    with pytest.raises(ValueError, match="z must have shape"):
        flow.inverse(z[0], cond, feats)
    with pytest.raises(ValueError, match="same batch size"):
        flow.inverse(z[:1], cond, feats)
    with pytest.raises(ValueError, match="tau"):
        flow.sample(cond, tau=-1.0, enc_features=feats)
    with pytest.raises(ValueError, match="cond must have shape"):
        flow.sample(cond[:, :2], enc_features=feats)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_size": 60}, "multiple of 2\\*\\*levels = 8"),
        ({"levels": 0}, "levels"),
        ({"hidden_channels": 0}, "hidden_channels"),
        ({"clamp": 0.0}, "clamp"),
        ({"feature_channels": (8, 16)}, "one entry per flow level"),
    ],
)
def test_bad_configs_raise_value_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        ConditionalFlow(dataclasses.replace(preset("tiny").flow, **changes))


# ---------------------------------------------------------------------------------------------- devices
def _accelerators() -> list[str]:
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


@pytest.mark.parametrize("device", _accelerators() or [pytest.param("none", marks=pytest.mark.skip("no GPU"))])
def test_runs_on_accelerator_like_on_cpu(device):
    flow = perturbed(ConditionalFlow(preset("tiny").flow), seed=21)
    x, cond, feats = inputs(batch=2)
    with torch.no_grad():
        z_cpu, ld_cpu = flow(x, cond, feats)
        moved = flow.to(device)
        feats_dev = [f.to(device) for f in feats]
        z_dev, ld_dev = moved(x.to(device), cond.to(device), feats_dev)
        x_back = moved.inverse(z_dev, cond.to(device), feats_dev)
        sample = moved.sample(cond.to(device), tau=0.8, generator=torch.Generator(device=device).manual_seed(0),
                              enc_features=feats_dev)
    torch.testing.assert_close(z_dev.cpu(), z_cpu, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ld_dev.cpu(), ld_cpu, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(x_back.cpu(), x, rtol=0, atol=1e-4)
    assert sample.device.type == device and sample.shape == (2, 1, N, N)
