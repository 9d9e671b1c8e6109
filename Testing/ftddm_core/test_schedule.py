"""Cosine schedule and respacing against published numbers, diffusers and the algebra."""
import numpy as np
import pytest
import torch

from ftddm_core.schedule import (
    DiffusionSchedule,
    chain_timesteps,
    lambda_clipped_start,
    logsnr_timesteps,
    respace,
    space_timesteps,
)

COSINE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")


def test_cosine_matches_published_numbers_and_diffusers():
    s = DiffusionSchedule.cosine(1000)
    assert s.alphas_cumprod.dtype == np.float64
    assert s.alphas_cumprod[100] == pytest.approx(0.97158, abs=5e-6)
    assert s.alphas_cumprod[99] == pytest.approx(0.97209, abs=5e-6)
    assert np.sqrt(1 - s.alphas_cumprod[100]) == pytest.approx(0.16860, abs=5e-5)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert np.allclose(s.betas, ref.betas.double().numpy(), atol=1e-6)
    assert s.betas.max() <= 0.999


def test_q_sample_and_parameterisations_invert():
    s = DiffusionSchedule.cosine(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_x0_from_eps(xt, t, eps), x0, atol=1e-8)
    assert torch.allclose(s.predict_eps_from_x0(xt, t, x0), eps, atol=1e-8)


def test_posterior_matches_bayes_rule():
    # q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): check mean/variance by completing the square.
    s = DiffusionSchedule.cosine(1000)
    t = 37
    a_prev, b = s.alphas_cumprod_prev[t], s.betas[t]
    var = 1 / (1 / (1 - a_prev) + (1 - b) / b)
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[1.1]], dtype=torch.float64)
    mean_expected = var * (np.sqrt(a_prev) * 0.3 / (1 - a_prev) + np.sqrt(1 - b) * 1.1 / b)
    mean, variance = s.q_posterior_mean_variance(x0, xt, torch.tensor([t]))
    assert float(mean) == pytest.approx(mean_expected, rel=1e-10)
    assert float(variance) == pytest.approx(var, rel=1e-10)


def test_respacing_keeps_marginals():
    s = DiffusionSchedule.cosine(1000)
    steps = space_timesteps(100, 10)
    assert steps == [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    new, tmap = respace(s, steps)
    assert list(tmap) == sorted(steps)
    assert np.allclose(new.alphas_cumprod, s.alphas_cumprod[tmap])
    assert np.allclose(np.cumprod(1 - new.betas), new.alphas_cumprod)
    with pytest.raises(ValueError):
        respace(s, [1000])
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_lambdas_and_the_clip_match_diffusers():
    """λ_t = log(α/σ) as diffusers' lambda_t; the clip is the first timestep of lambda_min_clipped=-5.1."""
    diffusers = pytest.importorskip("diffusers")
    s = DiffusionSchedule.cosine(1000)
    ref = diffusers.DPMSolverMultistepScheduler(**COSINE, lambda_min_clipped=-5.1, timestep_spacing="linspace")
    np.testing.assert_allclose(s.lambdas, ref.lambda_t.double().numpy(), atol=5e-4)  # theirs in float32
    start = lambda_clipped_start(s, -5.1)
    assert s.lambdas[start] >= -5.1 > s.lambdas[start + 1] and start == 995
    for steps in (1, 10, 100):
        ref.set_timesteps(steps)
        assert ref.timesteps[0].item() == start
    assert lambda_clipped_start(s, -np.inf) == 999
    with pytest.raises(ValueError, match="λ"):
        lambda_clipped_start(s, 6.0)


def test_space_timesteps_equal_diffusers_linspace_spacing():
    """Every K from the clip: diffusers' set_timesteps(K) are our indices without the final 0 (ties included)."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DPMSolverMultistepScheduler(**COSINE, lambda_min_clipped=-5.1, timestep_spacing="linspace")
    for steps in range(1, 996, 7):
        ref.set_timesteps(steps)
        assert ref.timesteps.tolist() + [0] == space_timesteps(995, steps)


@pytest.mark.parametrize("t_max,steps", [(995, 10), (995, 25), (100, 10), (500, 20)])
def test_logsnr_timesteps_are_the_nearest_indices_to_uniform_lambda(t_max, steps):
    s = DiffusionSchedule.cosine(1000)
    lam = s.lambdas
    ts = np.array(logsnr_timesteps(s, t_max, steps))
    assert ts[0] == t_max and ts[-1] == 0 and np.all(np.diff(ts) < 0) and len(ts) == steps + 1
    targets = np.linspace(lam[t_max], lam[0], steps + 1)
    # rounding to the nearest index moves λ by at most half the λ step next to the chosen index
    local = np.maximum(np.abs(lam[ts] - lam[np.minimum(ts + 1, 999)]), np.abs(lam[ts] - lam[np.maximum(ts - 1, 0)]))
    assert np.all(np.abs(lam[ts] - targets) <= 0.5 * local + 1e-12)


def test_logsnr_spacing_from_the_clip_is_nearly_uniform_in_lambda_unlike_index_spacing():
    s = DiffusionSchedule.cosine(1000)
    logsnr = np.diff(s.lambdas[logsnr_timesteps(s, 995, 10)])
    uniform = np.diff(s.lambdas[space_timesteps(995, 10)])
    assert logsnr.max() / logsnr.min() < 1.05  # measured 0.993 … 1.025
    assert uniform.max() / uniform.min() > 5  # 0.31 … 3.28


def test_logsnr_timesteps_follow_diffusers_lu_lambdas():
    """diffusers' use_lu_lambdas (Lu et al.'s logSNR-uniform, from 999) has our λ targets; it floors the index."""
    diffusers = pytest.importorskip("diffusers")
    s = DiffusionSchedule.cosine(1000)
    ref = diffusers.DPMSolverMultistepScheduler(**COSINE, use_lu_lambdas=True)
    ref.set_timesteps(11)
    their_lambdas = -np.log(ref.sigmas[:-1].double().numpy())  # diffusers' sigma = σ/α
    np.testing.assert_allclose(their_lambdas, np.linspace(s.lambdas[999], s.lambdas[0], 11), atol=5e-4)
    ours = np.array(logsnr_timesteps(s, 999, 10))
    assert np.abs(ours - ref.timesteps.numpy()).max() <= 1


def test_logsnr_timesteps_stay_distinct_with_many_steps():
    s = DiffusionSchedule.cosine(1000)
    assert logsnr_timesteps(s, 100, 100) == list(range(100, -1, -1))
    ts = logsnr_timesteps(s, 995, 300)
    assert len(ts) == 301 and ts[0] == 995 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    assert chain_timesteps(s, 100, 10, "uniform") == space_timesteps(100, 10)
    assert chain_timesteps(s, 100, 10, "logsnr") == logsnr_timesteps(s, 100, 10)
    with pytest.raises(ValueError, match="spacing"):
        chain_timesteps(s, 100, 10, "karras")
    with pytest.raises(ValueError, match="steps"):
        logsnr_timesteps(s, 10, 11)


def test_invalid_schedule():
    with pytest.raises(ValueError):
        DiffusionSchedule(np.array([0.5, 0.9]))
    with pytest.raises(ValueError):
        DiffusionSchedule.cosine(0)
