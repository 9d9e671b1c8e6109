"""Samplers vs diffusers' schedulers, an oracle denoiser, NFE counts, reproducibility, masking, data consistency."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ftddm_core import kspace
from ftddm_core.config import preset
from ftddm_core.sampling import (
    CountingDenoiser,
    RunningMoments,
    sample_ancestral,
    sample_chain,
    sample_dpmpp_2m,
    sample_ftddm,
    sample_respaced,
)
from ftddm_core.schedule import DiffusionSchedule, space_timesteps

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

SCHEDULE = DiffusionSchedule.cosine(1000)
COSINE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def smooth_eps(x, t):
    """A smooth nonlinear stand-in for a network: depends on x and t."""
    tf = (t.to(x.dtype) / 1000).reshape(-1, *(1,) * (x.ndim - 1))
    return torch.tanh(x) * (0.3 + tf) + 0.2 * torch.sin(2 * x + tf)


def denoiser_eps(x, t):
    """A nonlinear denoiser whose x̂0 = 0.5·tanh(x) + 0.1·sin(3x + t/100) stays bounded at every t."""
    tf = (t.to(x.dtype) / 100).reshape(-1, *(1,) * (x.ndim - 1))
    return SCHEDULE.predict_eps_from_x0(x, t, 0.5 * torch.tanh(x) + 0.1 * torch.sin(3 * x + tf))


def oracle_eps(x0):
    """ε that makes every x̂0 prediction exactly x0."""
    return lambda x, t: SCHEDULE.predict_eps_from_x0(x, t, x0)


def start_state(shape=(2, 1, 4, 4), seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def record_states(log):
    return lambda info: log.append(info["x"].clone())


# --- 1. ancestral sampling vs diffusers DDPMScheduler(fixed_small) ---------------------------------------
def run_diffusers(scheduler, x, timesteps, eps_fn, generator=None):
    states = []
    for t in timesteps:
        states.append(x.clone())
        eps = eps_fn(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(eps, int(t), x, generator=generator).prev_sample
    return x, states


def test_ddpm_scheduler_uses_the_same_cosine_schedule():
    ref = diffusers.DDPMScheduler(**COSINE, variance_type="fixed_small", clip_sample=False)
    np.testing.assert_allclose(ref.alphas_cumprod.double().numpy(), SCHEDULE.alphas_cumprod, rtol=2e-6, atol=1e-9)
    ref_var = torch.stack([ref._get_variance(t) for t in range(1, 1000)]).double().numpy()
    np.testing.assert_allclose(ref_var, SCHEDULE.posterior_variance[1:], rtol=2e-3)


@pytest.mark.parametrize("t", [10, 100, 500, 999])
def test_ancestral_step_equals_diffusers_ddpm_step(t):
    ref = diffusers.DDPMScheduler(**COSINE, variance_type="fixed_small", clip_sample=False)
    x = SCHEDULE.q_sample(0.3 * start_state(seed=1), t, start_state())
    states = []
    sample_ancestral(denoiser_eps, x, SCHEDULE, t, tau_d=1.0, generator=torch.Generator().manual_seed(7),
                     callback=record_states(states))
    eps = denoiser_eps(x, torch.full((2,), t))
    theirs = ref.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample  # same noise draw
    # diffusers keeps ᾱ in float32: near t = 0, β_t ≈ 1e-4 keeps ~3 digits, hence t ≥ 10 at 1e-5 here and
    # the exact float64 comparison below for whole chains down to t = 0.
    torch.testing.assert_close(states[1], theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("t_start", [1, 100, 999])
def test_ancestral_chain_equals_diffusers_with_the_same_float64_schedule(t_start):
    ref = diffusers.DDPMScheduler(**COSINE, variance_type="fixed_small", clip_sample=False)
    ref.alphas_cumprod = torch.from_numpy(SCHEDULE.alphas_cumprod)  # same ᾱ: isolates the step algebra
    x = start_state()
    ours = sample_ancestral(denoiser_eps, x, SCHEDULE, t_start, generator=torch.Generator().manual_seed(3))
    theirs, _ = run_diffusers(ref, x, range(t_start, -1, -1), denoiser_eps, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_ancestral_chain_from_999_close_to_native_diffusers():
    ref = diffusers.DDPMScheduler(**COSINE, variance_type="fixed_small", clip_sample=False)
    x = start_state()
    ours = sample_ancestral(denoiser_eps, x, SCHEDULE, 999, generator=torch.Generator().manual_seed(3))
    theirs, _ = run_diffusers(ref, x, range(999, -1, -1), denoiser_eps, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_respaced_equals_diffusers_ddpm_with_custom_timesteps():
    ts = space_timesteps(100, 10)
    ref = diffusers.DDPMScheduler(**COSINE, variance_type="fixed_small", clip_sample=False)
    ref.set_timesteps(timesteps=ts)
    ref.alphas_cumprod = torch.from_numpy(SCHEDULE.alphas_cumprod)
    x = start_state()
    ours = sample_respaced(denoiser_eps, x, SCHEDULE, 100, 10, generator=torch.Generator().manual_seed(5))
    theirs, _ = run_diffusers(ref, x, ts, denoiser_eps, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_tau_d_scales_the_noise_standard_deviation_and_the_mask_confines_it():
    x0 = torch.zeros(1, 1, 256, 256, dtype=torch.float64)
    x = start_state((1, 1, 256, 256), seed=1)
    mask = torch.zeros_like(x)
    mask[..., :128] = 1
    states = []
    sample_ancestral(oracle_eps(x0), x, SCHEDULE, 1, tau_d=0.5, mask=mask, generator=torch.Generator().manual_seed(0),
                     callback=record_states(states))
    mean, var = SCHEDULE.q_posterior_mean_variance(x0, x, 1)
    noise = (states[1] - mean) / var.sqrt()
    assert abs(noise[..., :128].std().item() - 0.5) < 0.01
    assert noise[..., 128:].abs().max() < 1e-12


# --- 2. DPM-Solver++(2M) vs diffusers --------------------------------------------------------------------
def test_dpmpp_2m_equals_diffusers_dpmsolver_multistep():
    ts = space_timesteps(100, 10)
    assert ts == list(range(100, -1, -10))
    ref = diffusers.DPMSolverMultistepScheduler(**COSINE, algorithm_type="dpmsolver++", solver_order=2,
                                                final_sigmas_type="zero", lower_order_final=True)
    ref.set_timesteps(timesteps=ts)
    x = start_state()
    ours_eval, theirs_eval = CountingDenoiser(smooth_eps), CountingDenoiser(smooth_eps)
    ours_states = []
    ours = sample_dpmpp_2m(ours_eval, x, SCHEDULE, ts, callback=record_states(ours_states))
    theirs, theirs_states = run_diffusers(ref, x, ref.timesteps.tolist(), theirs_eval)
    assert ours_eval.nfe == theirs_eval.nfe == 11
    for a, b in zip(ours_states, theirs_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_converges_at_second_order():
    """Halving the step size cuts the error ~4× (first order would give ~2×) against a 350-step solution."""
    x0 = torch.full((1, 1, 2, 2), 0.7, dtype=torch.float64)
    sqrt_alpha = torch.as_tensor(np.sqrt(SCHEDULE.alphas_cumprod))
    linear = lambda x, t: SCHEDULE.predict_eps_from_x0(  # noqa: E731  x̂0 = ½·x/α + ½·x0
        x, t, 0.5 * x / sqrt_alpha[t].reshape(-1, 1, 1, 1) + 0.5 * x0)
    x = start_state((1, 1, 2, 2), seed=4)
    spaced = lambda k: [int(round(v)) for v in np.linspace(400, 50, k + 1)]  # noqa: E731
    reference = sample_dpmpp_2m(linear, x, SCHEDULE, spaced(350))
    errors = [(sample_dpmpp_2m(linear, x, SCHEDULE, spaced(k)) - reference).abs().max().item() for k in (20, 40)]
    assert errors[0] / errors[1] > 3.0


# --- 3. oracle ε recovers x0 through every sampler -------------------------------------------------------
@pytest.mark.parametrize("run", [
    lambda d, x: sample_ancestral(d, x, SCHEDULE, 100, tau_d=0.0, generator=torch.Generator().manual_seed(0)),
    lambda d, x: sample_ancestral(d, x, SCHEDULE, 100, tau_d=1.0, generator=torch.Generator().manual_seed(0)),
    lambda d, x: sample_respaced(d, x, SCHEDULE, 100, 10, tau_d=1.0, generator=torch.Generator().manual_seed(0)),
    lambda d, x: sample_dpmpp_2m(d, x, SCHEDULE, space_timesteps(100, 10)),
], ids=["ancestral-tau0", "ancestral-tau1", "respaced", "dpmpp"])
def test_oracle_denoiser_returns_x0(run):
    x0 = start_state(seed=2)
    x = SCHEDULE.q_sample(x0, torch.full((2,), 100), start_state(seed=3))
    torch.testing.assert_close(run(oracle_eps(x0), x), x0, rtol=0, atol=1e-10)


# --- a tiny fake FTDDM bundle: analytic / oracle unet and a fake flow ------------------------------------
class FakeFlow:
    """x_Ttrunc = q_sample(LR, t_trunc, τ_f·z) with z from the given generator; records its calls."""

    def __init__(self, t_trunc):
        self.t_trunc, self.calls = t_trunc, []

    def sample(self, cond, tau, generator):
        per_row = isinstance(generator, list)  # sample_ftddm passes one generator per chain
        gens = generator if per_row else [generator]
        shape = (1, 1, *cond.shape[2:]) if per_row else cond[:, :1].shape
        z = torch.cat([torch.randn(shape, generator=g, dtype=cond.dtype, device=cond.device) for g in gens])
        x = SCHEDULE.q_sample(cond[:, :1], self.t_trunc, tau * z)
        self.calls.append(x)
        return x


class RecordingUNet:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, cond, scale):
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and scale.shape == (x.shape[0],)
        self.calls.append((x.clone(), t.clone()))
        return self.fn(x, t, cond, scale)


def oracle_unet(x, t, cond, scale):
    return SCHEDULE.predict_eps_from_x0(x, t, cond[:, :1])


def analytic_unet(x, t, cond, scale):
    return smooth_eps(x - cond[:, :1], t) * scale.reshape(-1, 1, 1, 1) / 4


def fake_model(unet=oracle_unet, t_trunc=100):
    config = preset("tiny")
    config.diffusion.t_trunc = t_trunc
    return SimpleNamespace(unet=RecordingUNet(unet), flow=FakeFlow(t_trunc), schedule=SCHEDULE, config=config)


def make_cond(batch=2, size=8, seed=0, full_mask=False):
    g = torch.Generator().manual_seed(seed)
    lr = 0.2 + torch.rand(batch, size, size, generator=g)
    mask = torch.ones(batch, size, size)
    if not full_mask:
        mask[:, :2] = 0
        mask[:, :, -1] = 0
    t1, flair = torch.rand(batch, size, size, generator=g), torch.rand(batch, size, size, generator=g)
    return torch.stack([lr * mask, mask, t1, flair], dim=1)


@pytest.mark.parametrize("sampler,start", [("ancestral", "flow"), ("ddpm", "flow"), ("dpmpp", "flow"),
                                           ("ancestral", "noise"), ("dpmpp", "noise")])
def test_ftddm_with_oracle_unet_returns_the_target(sampler, start):
    cond = make_cond()
    result = sample_ftddm(fake_model(), cond, 4.0, sampler=sampler, start=start, tau_d=1.0, n_samples=2,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.mean, cond[:, :1], rtol=0, atol=1e-4)
    assert result.std.max() < 1e-4


# --- 4./5. NFE and the start index -----------------------------------------------------------------------
@pytest.mark.parametrize("sampler,steps,nfe", [("ancestral", 10, 101), ("ddpm", 10, 11), ("dpmpp", 10, 11),
                                               ("dpmpp", 100, 101)])
def test_nfe_of_a_truncated_chain(sampler, steps, nfe):
    counter = CountingDenoiser(smooth_eps)
    sample_chain(counter, start_state(), SCHEDULE, sampler=sampler, t_start=100, steps=steps,
                 generator=torch.Generator().manual_seed(0))
    assert counter.nfe == nfe


def test_flow_start_is_at_exactly_t_trunc_and_counts_are_reported():
    model = fake_model(analytic_unet, t_trunc=37)
    cond = make_cond(batch=3)
    result = sample_ftddm(model, cond, 4.0, sampler="dpmpp", steps=5, n_samples=2, max_batch=4,
                          generator=torch.Generator().manual_seed(0))
    first_x, first_t = model.unet.calls[0]
    assert first_t.tolist() == [37] * 4
    mask = cond[:, 1:2]
    expected = model.flow.calls[0] * torch.cat([mask, mask])[:4]  # one batched flow call per chunk
    torch.testing.assert_close(first_x, expected)
    assert [t[0].item() for _, t in model.unet.calls[:6]] == space_timesteps(37, 5)
    assert result.nfe == 6 and result.total_calls == 12  # 6 chains in chunks of 4 + 2


def test_noise_start_runs_the_full_chain():
    model = fake_model(analytic_unet)
    result = sample_ftddm(model, make_cond(), 4.0, sampler="dpmpp", start="noise", steps=10,
                          generator=torch.Generator().manual_seed(0))
    assert model.unet.calls[0][1][0].item() == 999 and result.nfe == 11
    assert not model.flow.calls


# --- 6. reproducibility, repeated samples and chunking ---------------------------------------------------
def run_fake(seed, **kw):
    options = dict(sampler="ancestral", t_trunc=20, n_samples=3, tau_d=1.0)
    options.update(kw)
    return sample_ftddm(fake_model(analytic_unet, t_trunc=20), make_cond(batch=3), torch.tensor([2.0, 4.0, 8.0]),
                        generator=torch.Generator().manual_seed(seed), keep_samples=True, **options)


def test_generator_reproduces_and_seeds_differ():
    a, b, c = run_fake(1), run_fake(1), run_fake(2)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert not torch.allclose(a.mean, c.mean)
    assert not torch.allclose(a.samples[:, 0], a.samples[:, 1])  # the samples of one image differ


def test_mean_and_std_equal_torch_statistics_of_the_samples():
    r = run_fake(3, n_samples=5)
    torch.testing.assert_close(r.mean, r.samples.mean(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.std, r.samples.std(dim=1), rtol=1e-5, atol=1e-6)  # sample std, n − 1
    assert r.std.max() > 1e-3
    single = run_fake(3, n_samples=1)
    assert torch.all(single.std == 0)


@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp"])
def test_chunking_with_max_batch_gives_identical_results(sampler):
    results = [run_fake(4, sampler=sampler, max_batch=m) for m in (None, 1, 4, 100)]
    for r in results[1:]:
        assert torch.equal(r.samples, results[0].samples)
        assert torch.equal(r.mean, results[0].mean) and torch.equal(r.std, results[0].std)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_with_any_generator_device():
    cond = make_cond(batch=3).cuda()
    runs = [sample_ftddm(fake_model(analytic_unet, t_trunc=20), cond, 4.0, sampler="ancestral", n_samples=2,
                         generator=torch.Generator(device).manual_seed(0), max_batch=m)
            for device in ("cpu", "cuda") for m in (None, 1)]
    assert all(r.mean.device == cond.device for r in runs)
    assert torch.equal(runs[0].mean, runs[1].mean) and torch.equal(runs[2].std, runs[3].std)


def test_running_moments_match_torch():
    data = torch.randn(7, 2, 1, 3, 3, dtype=torch.float64) * 3 + 1
    moments = RunningMoments((2, 1, 3, 3))
    for sample in data:
        moments.add(sample, torch.tensor([0, 1]))
    torch.testing.assert_close(moments.mean, data.mean(0))
    torch.testing.assert_close(moments.std(), data.std(0))


def test_progress_callback_reports_every_step():
    events = []
    run_fake(0, sampler="dpmpp", steps=4, n_samples=2, callback=events.append)
    assert len(events) == 2 * 5
    assert events[0] == dict(step=0, total=5, t=20, sample=0, chunk=0, chunks=2)
    assert events[-1]["t"] == 0 and events[-1]["sample"] == 1


# --- 7. k-space data consistency -------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,block", [("ancestral", 5), ("dpmpp", 5), ("dpmpp", 6)])
def test_data_consistency_makes_the_central_kspace_equal_the_measurement(sampler, block):
    cond = make_cond(batch=2, size=16, full_mask=True)
    cond[:, 0] = 0.7 + 0.2 * cond[:, 2]  # values well inside the clip range (0, 2) before and after DC
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    other = (0.8 + 0.3 * torch.cos(2 * yy) * torch.sin(xx)).expand(2, 1, 16, 16)
    measured = kspace.truncate_kspace(kspace.fft2c(other), block)
    result = sample_ftddm(fake_model(), cond, 4.0, sampler=sampler, tau_d=1.0, steps=10, data_consistency=1.0,
                          measured_kspace=measured, generator=torch.Generator().manual_seed(0))
    assert 0 < result.mean.min().item() and result.mean.max().item() < 2  # the final clamp did not act
    spectrum = kspace.fft2c(result.mean)
    # A real image keeps only the Hermitian-paired part of the block: with an even block the first row and
    # column (offset −m/2) have no partner inside it, and taking the real part averages them with their
    # mirrors (offset +m/2, outside the block). Compare the paired part; exclude both lines outside.
    paired = slice(block % 2 == 0, None)
    got = kspace.truncate_kspace(spectrum, block)[..., paired, paired]
    torch.testing.assert_close(got, measured.to(got.dtype)[..., paired, paired], rtol=0, atol=1e-4)
    # outside the measured block the spectrum is the (oracle) prediction's
    prediction = kspace.fft2c(cond[:, :1])
    outside = torch.ones(16, 16, dtype=torch.bool)
    symmetric = block + 1 - block % 2
    outside[kspace.central_slices((16, 16), (symmetric, symmetric))] = False
    torch.testing.assert_close(spectrum[..., outside], prediction[..., outside], rtol=0, atol=1e-4)


# --- 8. masking and bad input ---------------------------------------------------------------------------
def test_counting_denoiser_masks_eps_and_applies_the_x0_hook():
    x = start_state()
    t = torch.full((2,), 40)
    mask = torch.ones_like(x)
    mask[..., 0] = 0
    plain = CountingDenoiser(smooth_eps, mask=mask)
    eps = plain(x, t)
    assert torch.all(eps[..., 0] == 0) and torch.equal(eps[..., 1:], smooth_eps(x, t)[..., 1:])
    hooked = CountingDenoiser(smooth_eps, SCHEDULE, x0_hook=lambda x0: x0.clamp(-0.1, 0.1))
    x0 = SCHEDULE.predict_x0_from_eps(x, t, hooked(x, t))
    torch.testing.assert_close(x0, SCHEDULE.predict_x0_from_eps(x, t, smooth_eps(x, t)).clamp(-0.1, 0.1))
    assert plain.nfe == hooked.nfe == 1
    with pytest.raises(ValueError, match="schedule"):
        CountingDenoiser(smooth_eps, x0_hook=lambda x0: x0)


@pytest.mark.parametrize("sampler,start", [("ancestral", "flow"), ("dpmpp", "noise")])
def test_output_and_every_network_input_are_exactly_zero_outside_the_mask(sampler, start):
    cond = make_cond()
    model = fake_model(analytic_unet, t_trunc=30)
    r = sample_ftddm(model, cond, 4.0, sampler=sampler, start=start, n_samples=2,
                     generator=torch.Generator().manual_seed(0))
    outside = cond[:, 1:2] == 0
    assert torch.all(r.mean[outside] == 0) and torch.all(r.std[outside] == 0)
    assert r.mean[~outside].abs().min() > 0
    assert all(torch.all(x[outside] == 0) for x, _ in model.unet.calls)


@pytest.mark.parametrize("kwargs,match", [
    (dict(t_trunc=0), "t_trunc"), (dict(t_trunc=1000), "t_trunc"), (dict(t_trunc=1001), "t_trunc"),
    (dict(steps=0), "steps"), (dict(steps=101), "steps"), (dict(sampler="euler"), "sampler"),
    (dict(start="gan"), "start"), (dict(tau_d=-0.1), "tau_d"), (dict(tau_f=float("nan")), "tau_f"),
    (dict(n_samples=0), "n_samples"), (dict(max_batch=0), "max_batch"),
    (dict(data_consistency=1.5), "data_consistency"),
    (dict(data_consistency=0.5), "measured_kspace"),
    (dict(data_consistency=0.5, measured_kspace=torch.zeros(3, 1, 4, 4, dtype=torch.complex64)), "measured_kspace"),
    (dict(generator=123), "generator"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_ftddm(fake_model(), make_cond(), 4.0, **kwargs)


def test_bad_inputs_raise_value_error():
    model, cond = fake_model(), make_cond()
    with pytest.raises(ValueError, match="cond"):
        sample_ftddm(model, cond[:, :3], 4.0)
    bad = cond.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sample_ftddm(model, bad, 4.0)
    with pytest.raises(ValueError, match="scale"):
        sample_ftddm(model, cond, torch.tensor([2.0, 4.0, 8.0]))
    x = start_state()
    with pytest.raises(ValueError, match="mask"):
        sample_ancestral(smooth_eps, x, SCHEDULE, 5, mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="t_start"):
        sample_ancestral(smooth_eps, x, SCHEDULE, 1000)
    with pytest.raises(ValueError, match="timesteps"):
        sample_dpmpp_2m(smooth_eps, x, SCHEDULE, [10, 10, 0])
    with pytest.raises(ValueError, match="generator"):
        sample_ancestral(smooth_eps, x, SCHEDULE, 5, generator=[torch.Generator()])
