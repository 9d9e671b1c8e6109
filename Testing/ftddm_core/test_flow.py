"""Tests of FTDDM's conditional normalizing flow (reference §4): exact invertibility, log-det against the
autograd Jacobian, the Gaussian prior against torch.distributions, sampling with τ and generators, actnorm
data initialisation and its state_dict round trip, parameter counts, gradients and input checking."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from ftddm_core.config import FlowConfig, preset
from ftddm_core.flow import ActNorm, ConditionalFlow, InvertibleConv1x1, count_parameters

N = 64  # image_size of every preset
PAPER_FLOW_PARAMS = 17.6e6  # published size of the flow (reference §4)


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


def inputs(batch: int = 2, seed: int = 1, size: int = N, dtype=torch.float32):
    """Random (x, cond) pair: x like a noisy map, cond like [LR_zf, M, T1, FLAIR] in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen, dtype=dtype)
    cond = torch.rand(batch, 4, size, size, generator=gen, dtype=dtype)
    return x, cond


def small_config(**changes) -> FlowConfig:
    """8×8 flow with two levels (z = 2·4² + 8·2² = 64 dims), small enough for a full Jacobian."""
    base = FlowConfig(image_size=8, levels=2, steps_per_level=2, hidden_channels=8, cond_hidden=4)
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------- sizes
def test_latent_dimension_equals_image_dimension():
    flow = ConditionalFlow(preset("tiny").flow)
    assert flow.latent_shapes == [(2, 32, 32), (4, 16, 16), (16, 8, 8)]
    assert flow.z_dim == 2 * 32**2 + 4 * 16**2 + 16 * 8**2 == N * N
    x, cond = inputs(batch=2)
    z, logdet = flow.eval()(x, cond)
    assert z.shape == (2, N * N) and logdet.shape == (2,)


def test_paper_parameter_count_matches_publication():
    count = count_parameters(ConditionalFlow(preset("paper").flow))
    print(f"paper flow parameters: {count:,} (published ~17.6 M)")
    assert abs(count - PAPER_FLOW_PARAMS) / PAPER_FLOW_PARAMS < 0.15


def test_compact_parameter_count_is_printed_and_smaller():
    compact = count_parameters(ConditionalFlow(preset("compact").flow))
    tiny = count_parameters(ConditionalFlow(preset("tiny").flow))
    print(f"compact flow parameters: {compact:,}; tiny: {tiny:,}")
    assert tiny < compact < PAPER_FLOW_PARAMS


# ---------------------------------------------------------------------------------------------- invertibility
@pytest.mark.parametrize("name, batch", [("tiny", 2), ("compact", 2), ("paper", 1)])
def test_inverse_of_forward_is_identity_for_presets(name, batch):
    cfg = preset(name).flow
    x, cond = inputs(batch=batch)
    with torch.no_grad():
        flow = ConditionalFlow(cfg).eval()
        z_identity_init, _ = flow(x, cond)
        perturbed(flow)
        z, logdet = flow(x, cond)
        x_back = flow.inverse(z, cond)
    # the perturbed flow really transforms: z moved and the volume changed
    assert (z - z_identity_init).abs().max() > 0.1
    assert logdet.abs().min() > 1.0
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "compact"])
def test_forward_of_inverse_is_identity(name):
    flow = perturbed(ConditionalFlow(preset(name).flow), seed=3)
    _, cond = inputs(batch=2, seed=4)
    z = torch.randn(2, flow.z_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z_back, _ = flow(flow.inverse(z, cond), cond)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-4)


def test_identity_initialised_flow_preserves_volume():
    """At initialisation every injector/coupling is the identity and W is orthogonal, so log|det| = 0."""
    flow = ConditionalFlow(preset("tiny").flow).eval()
    x, cond = inputs(batch=2)
    z, logdet = flow(x, cond)
    torch.testing.assert_close(logdet, torch.zeros(2), rtol=0, atol=1e-3)
    assert z.norm(dim=1).sub(x.flatten(1).norm(dim=1)).abs().max() < 1e-3  # orthogonal map keeps the norm


# ---------------------------------------------------------------------------------------------- log-det
@pytest.mark.parametrize("levels, steps", [(2, 2), (1, 1)])
def test_logdet_equals_log_abs_det_of_autograd_jacobian(levels, steps):
    flow = perturbed(ConditionalFlow(small_config(levels=levels, steps_per_level=steps)).double(), std=0.1)
    x, cond = inputs(batch=1, size=8, dtype=torch.float64)
    _, logdet = flow(x, cond)

    def z_of(flat_x: torch.Tensor) -> torch.Tensor:
        return flow(flat_x.reshape(1, 1, 8, 8), cond)[0][0]

    jacobian = torch.autograd.functional.jacobian(z_of, x.flatten())
    assert jacobian.shape == (64, 64)
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0 and abs(logdet.item()) > 0.5  # non-trivial, invertible
    assert logdet.item() == pytest.approx(log_abs_det.item(), abs=1e-8)


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


# ---------------------------------------------------------------------------------------------- density
def test_log_prob_is_prior_density_plus_logdet():
    flow = perturbed(ConditionalFlow(preset("tiny").flow), seed=7, std=0.05)
    x, cond = inputs(batch=2)
    with torch.no_grad():
        z, logdet = flow(x, cond)
        prior = torch.distributions.Normal(flow.prior_mean, flow.prior_log_std.exp())
        expected = prior.log_prob(z).sum(dim=1) + logdet
        torch.testing.assert_close(flow.log_prob(x, cond), expected)
        bits = flow.nll_bits_per_dim(x, cond)
    torch.testing.assert_close(bits, -expected / (N * N * math.log(2)))


def test_log_prob_of_one_pixel_flow_matches_change_of_variables():
    """Smallest case by hand: a 2×2 image with one level; p(x) from z = F(x) and |det J| by autograd."""
    cfg = FlowConfig(image_size=2, levels=1, steps_per_level=1, hidden_channels=4, cond_hidden=2)
    flow = perturbed(ConditionalFlow(cfg).double(), seed=2, std=0.2)
    x, cond = inputs(batch=1, size=2, dtype=torch.float64)
    z, _ = flow(x, cond)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, 1, 2, 2), cond)[0][0], x.flatten())
    gaussian = torch.distributions.MultivariateNormal(
        flow.prior_mean.detach(), covariance_matrix=torch.diag(flow.prior_log_std.detach().exp() ** 2)
    )
    expected = gaussian.log_prob(z.detach()[0]) + torch.linalg.slogdet(jacobian)[1]
    assert flow.log_prob(x, cond).item() == pytest.approx(expected.item(), abs=1e-10)


# ---------------------------------------------------------------------------------------------- sampling
def test_sample_shapes_and_tau_zero_is_the_deterministic_mode():
    flow = perturbed(ConditionalFlow(preset("tiny").flow), seed=11)
    _, cond = inputs(batch=3)
    with torch.no_grad():
        flow.prior_mean.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        mode_a = flow.sample(cond, tau=0.0)
        mode_b = flow.sample(cond, tau=0.0, generator=torch.Generator().manual_seed(99))
        expected = flow.inverse(flow.prior_mean.expand(3, -1), cond)
        random = flow.sample(cond, tau=1.0)
    assert mode_a.shape == random.shape == (3, 1, N, N)
    assert torch.equal(mode_a, mode_b)
    torch.testing.assert_close(mode_a, expected, rtol=0, atol=0)
    assert not torch.allclose(random, mode_a, atol=1e-3)


def test_sample_latent_is_mean_plus_tau_sigma_eps_and_generator_reproducible():
    flow = perturbed(ConditionalFlow(preset("tiny").flow), seed=12)
    _, cond = inputs(batch=2)
    tau = 0.7
    with torch.no_grad():
        flow.prior_log_std.fill_(math.log(0.5))
        a = flow.sample(cond, tau=tau, generator=torch.Generator().manual_seed(5))
        b = flow.sample(cond, tau=tau, generator=torch.Generator().manual_seed(5))
        c = flow.sample(cond, tau=tau, generator=torch.Generator().manual_seed(6))
        z_a, _ = flow(a, cond)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    eps = torch.randn(2, flow.z_dim, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z_a, flow.prior_mean + tau * 0.5 * eps, rtol=0, atol=1e-4)


def test_mode_is_differentiable_for_the_guide_loss():
    """x̂ = F⁻¹(μ_z; y) must pass gradients to μ_z and to every network (guide loss, reference §4)."""
    flow = perturbed(ConditionalFlow(preset("tiny").flow), seed=13).train()
    _, cond = inputs(batch=2)
    flow.sample(cond, tau=0.0).abs().mean().backward()
    assert flow.prior_mean.grad.abs().sum() > 0
    assert flow.level0_injector.net[-1].weight.grad.abs().sum() > 0
    assert flow.levels[-1][-1].invconv.lower.grad is not None


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
    x, cond = inputs(batch=2)
    x = 5.0 + 3.0 * x
    with torch.no_grad():
        z, _ = flow(x, cond)
    assert all(a.initialized for a in actnorms)
    # level 0 starts with actnorm, so the normalised input is what the (identity-initialised) injector passes on
    assert abs(flow.level0_actnorm.bias.item() + x.mean().item()) < 1e-4

    restored = ConditionalFlow(preset("tiny").flow).train()
    restored.load_state_dict(flow.state_dict())
    x2, cond2 = inputs(batch=2, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(restored(x2, cond2)[0], flow(x2, cond2)[0])


# ---------------------------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_value_errors_saying_what_was_expected():
    flow = ConditionalFlow(preset("tiny").flow).eval()
    x, cond = inputs(batch=2)
    bad_pairs = [
        (x[0], cond, "x must have shape"),  # rank 3
        (x.repeat(1, 2, 1, 1), cond, "x must have shape"),  # channels
        (x[:, :, :32], cond[:, :, :32], "x must have shape"),  # H
        (x[:, :, :, :32], cond[:, :, :, :32], "x must have shape"),  # W
        (x, cond[:, :3], "cond must have shape"),  # cond channels
        (x, cond[0], "cond must have shape"),  # cond rank
        (x[:1], cond, "same batch size"),
    ]
    for bad_x, bad_cond, message in bad_pairs:
        with pytest.raises(ValueError, match=message):
            flow(bad_x, bad_cond)
    with pytest.raises(ValueError, match="expected|must have shape"):
        flow.log_prob(x[:, :, :, :-1], cond)
    z = torch.zeros(2, flow.z_dim)
    with pytest.raises(ValueError, match=f"z must have shape \\(B, {N * N}\\)"):
        flow.inverse(z[:, :-1], cond)
    with pytest.raises(ValueError, match="z must have shape"):
        flow.inverse(z[0], cond)
    with pytest.raises(ValueError, match="same batch size"):
        flow.inverse(z[:1], cond)
    with pytest.raises(ValueError, match="tau"):
        flow.sample(cond, tau=-1.0)
    with pytest.raises(ValueError, match="cond must have shape"):
        flow.sample(cond[:, :2])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_size": 60}, "multiple of 2\\*\\*levels = 8"),
        ({"levels": 0}, "levels"),
        ({"hidden_channels": 0}, "hidden_channels"),
        ({"clamp": 0.0}, "clamp"),
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
    x, cond = inputs(batch=2)
    with torch.no_grad():
        z_cpu, ld_cpu = flow(x, cond)
        moved = flow.to(device)
        z_dev, ld_dev = moved(x.to(device), cond.to(device))
        x_back = moved.inverse(z_dev, cond.to(device))
        sample = moved.sample(cond.to(device), tau=0.8, generator=torch.Generator(device=device).manual_seed(0))
    torch.testing.assert_close(z_dev.cpu(), z_cpu, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ld_dev.cpu(), ld_cpu, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(x_back.cpu(), x, rtol=0, atol=1e-4)
    assert sample.device.type == device and sample.shape == (2, 1, N, N)
