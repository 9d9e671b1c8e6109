"""Cosine schedule and respacing against published numbers, diffusers and the algebra."""
import numpy as np
import pytest
import torch

from ftddm_core.schedule import DiffusionSchedule, respace, space_timesteps


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


def test_invalid_schedule():
    with pytest.raises(ValueError):
        DiffusionSchedule(np.array([0.5, 0.9]))
    with pytest.raises(ValueError):
        DiffusionSchedule.cosine(0)
