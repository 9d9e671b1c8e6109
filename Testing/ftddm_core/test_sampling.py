"""Samplers vs diffusers' schedulers, an oracle denoiser, NFE counts, reproducibility, masking, data consistency."""
import numpy as np
import pytest
import torch

from ftddm_core import kspace
from ftddm_core.config import preset
from ftddm_core.chains import (
    FP32_SIGMA_OVER_ALPHA,
    CountingDenoiser,
    RunningMoments,
    sample_ancestral,
    sample_chain,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_respaced,
    sample_sde_dpmpp_2m,
)
from ftddm_core.sampling import sample_ftddm
from ftddm_core.schedule import DiffusionSchedule, logsnr_timesteps, space_timesteps

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


def linear_problem():
    """A linear x̂0 model (x̂0 = ½·x/α + ½·x0), its start state and k-step index spacings from 400 to 50."""
    x0 = torch.full((1, 1, 2, 2), 0.7, dtype=torch.float64)
    sqrt_alpha = torch.as_tensor(np.sqrt(SCHEDULE.alphas_cumprod))
    linear = lambda x, t: SCHEDULE.predict_eps_from_x0(  # noqa: E731
        x, t, 0.5 * x / sqrt_alpha[t].reshape(-1, 1, 1, 1) + 0.5 * x0)
    spaced = lambda k: [int(round(v)) for v in np.linspace(400, 50, k + 1)]  # noqa: E731
    return linear, start_state((1, 1, 2, 2), seed=4), spaced


def test_dpmpp_2m_converges_at_second_order():
    """Halving the step size cuts the error ~4× (first order would give ~2×) against a 350-step solution."""
    linear, x, spaced = linear_problem()
    reference = sample_dpmpp_2m(linear, x, SCHEDULE, spaced(350))
    errors = [(sample_dpmpp_2m(linear, x, SCHEDULE, spaced(k)) - reference).abs().max().item() for k in (20, 40)]
    assert errors[0] / errors[1] > 3.0


# --- 2a. DPM-Solver++(3M) vs diffusers(solver_order=3) ----------------------------------------------------
@pytest.mark.parametrize("steps", [5, 6, 20])
def test_dpmpp_3m_equals_diffusers_third_order_step_for_step(steps):
    """K = 5, 6 inside the truncation (index 100 → 0) and K = 20 (no lowered step before the last): every state
    and the final x̂0 equal diffusers' DPMSolverMultistepScheduler(solver_order=3) on the same timesteps."""
    ts = space_timesteps(100, steps)
    ref = diffusers.DPMSolverMultistepScheduler(**COSINE, algorithm_type="dpmsolver++", solver_order=3,
                                                final_sigmas_type="zero", lower_order_final=True)
    ref.alphas_cumprod = torch.from_numpy(SCHEDULE.alphas_cumprod)  # float64 ᾱ on both sides
    ref.set_timesteps(timesteps=ts)
    x = start_state()
    ours_eval, ours_states = CountingDenoiser(denoiser_eps), []
    ours = sample_dpmpp_3m(ours_eval, x, SCHEDULE, ts, callback=record_states(ours_states))
    theirs, theirs_states = run_diffusers(ref, x, ref.timesteps.tolist(), denoiser_eps)
    assert ours_eval.nfe == steps + 1
    for a, b in zip(ours_states, theirs_states):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)


def test_dpmpp_3m_differs_from_2m_and_converges_faster():
    """On a linear x̂0 model the third-order solver's error at K = 12 is below half the second-order one's."""
    linear, x, spaced = linear_problem()
    reference = sample_dpmpp_3m(linear, x, SCHEDULE, spaced(350))
    error2 = (sample_dpmpp_2m(linear, x, SCHEDULE, spaced(12)) - reference).abs().max().item()
    error3 = (sample_dpmpp_3m(linear, x, SCHEDULE, spaced(12)) - reference).abs().max().item()
    assert error3 < 0.5 * error2, (error2, error3)


# --- 2b. DPM-Solver++ from noise: λ clip, SDE-DPM-Solver++(2M), logSNR spacing, float32 first steps ------
# diffusers' settings: the cosine schedule, order 2, last step to σ = 0; from noise its own timesteps with the
# λ clip and "linspace" spacing (set_timesteps(K) gives our indices without the final 0), else ours passed in.
CLIPPED = dict(**COSINE, solver_order=2, final_sigmas_type="zero", lower_order_final=True,
               lambda_min_clipped=-5.1, timestep_spacing="linspace")


def bounded_x0(x, t):
    """A nonlinear x̂0 in (0.4, 1.6), inside the data range (0, 2), so FTDDM's clamp never acts."""
    tf = (t.to(x.dtype) / 100).reshape(-1, *(1,) * (x.ndim - 1))
    return 1.0 + 0.5 * torch.tanh(x) + 0.1 * torch.sin(3 * x + tf)


def bounded_unet(x, t, cond=None, scale=None):
    return SCHEDULE.predict_eps_from_x0(x, t, bounded_x0(x, t))


@pytest.mark.parametrize("steps", [10, 100])
def test_noise_start_equals_diffusers_lambda_clip_step_for_step(steps):
    """start="noise" ≡ DPMSolverMultistepScheduler(lambda_min_clipped=-5.1) on the 1000-step cosine schedule.

    The full sample_ftddm path in float32: diffusers' timesteps from set_timesteps(K) are our chain's first K
    indices (995, …), and the state entering each of its K steps equals the input of our network call.
    """
    model = fake_model(bounded_unet)
    sample_ftddm(model, make_cond(full_mask=True), 4.0, sampler="dpmpp", start="noise", steps=steps,
                 generator=torch.Generator().manual_seed(0))
    ours_x = [x for x, _ in model.unet.calls]
    ours_t = [int(t[0]) for _, t in model.unet.calls]
    ref = diffusers.DPMSolverMultistepScheduler(**CLIPPED, algorithm_type="dpmsolver++")
    ref.set_timesteps(steps)
    assert ours_t == ref.timesteps.tolist() + [0]
    _, theirs = run_diffusers(ref, ours_x[0], ref.timesteps.tolist(), bounded_unet)
    deviation = max((a - b).abs().max().item() for a, b in zip(ours_x, theirs))
    assert deviation < 1e-5, deviation  # measured 4.1e-6 (K = 10), 3.5e-6 (K = 100): float32 on both sides


def test_dpmpp_on_diffusers_clipped_timesteps_equals_diffusers():
    """Our solver on diffusers' own clipped timesteps (no final 0): every state and the final x̂0 agree."""
    ref = diffusers.DPMSolverMultistepScheduler(**CLIPPED, algorithm_type="dpmsolver++")
    ref.set_timesteps(10)
    ts = ref.timesteps.tolist()
    x = start_state()
    ours_states = []
    ours = sample_dpmpp_2m(denoiser_eps, x, SCHEDULE, ts, callback=record_states(ours_states))
    theirs, theirs_states = run_diffusers(ref, x, ts, denoiser_eps)
    for a, b in zip(ours_states, theirs_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("start", ["noise", "flow"])
def test_sde_dpmpp_equals_diffusers_sde_dpmsolver_with_the_same_noise(start):
    """SDE-DPM-Solver++(2M) ≡ diffusers' algorithm_type="sde-dpmsolver++" given the same z (variance_noise=).

    diffusers gets our float64 ᾱ (its float32 ᾱ keeps ~3 digits of 1 − ᾱ near t = 0: 3e-5 apart from 100);
    its λ clip still comes from its own float32 λ_t, and it computes each step in float32.
    """
    ref = diffusers.DPMSolverMultistepScheduler(**CLIPPED, algorithm_type="sde-dpmsolver++")
    ref.alphas_cumprod = torch.from_numpy(SCHEDULE.alphas_cumprod)  # read by set_timesteps
    if start == "noise":
        ref.set_timesteps(10)
    else:
        ref.set_timesteps(timesteps=space_timesteps(100, 10))
    ts = ref.timesteps.tolist()
    x = start_state()
    ours_states, ours_eval = [], CountingDenoiser(denoiser_eps)
    ours = sample_sde_dpmpp_2m(ours_eval, x, SCHEDULE, ts, generator=torch.Generator().manual_seed(11),
                               callback=record_states(ours_states))
    g = torch.Generator().manual_seed(11)  # the same draws, in the same order: one per step but the last
    noises = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in ts[:-1]] + [torch.zeros_like(x)]
    y, theirs_states = x, []
    for t, z in zip(ts, noises):
        theirs_states.append(y)
        y = ref.step(denoiser_eps(y, torch.full((2,), t)), t, y, variance_noise=z).prev_sample
    assert ours_eval.nfe == len(ts) and ts[0] == (995 if start == "noise" else 100)
    for a, b in zip(ours_states, theirs_states):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours, y, rtol=0, atol=2e-6)


def test_sde_dpmpp_rows_own_their_noise():
    """One generator per row: a chain does not depend on its batch, repeats exactly, and changes with its seed."""
    x = start_state((3, 1, 4, 4))
    ts = space_timesteps(995, 10)

    def run(x, seeds):
        return sample_sde_dpmpp_2m(smooth_eps, x, SCHEDULE, ts,
                                   generator=[torch.Generator().manual_seed(s) for s in seeds])

    batch = run(x, [1, 2, 3])
    assert torch.equal(batch, run(x, [1, 2, 3]))
    assert torch.equal(batch, torch.cat([run(x[i:i + 1], [s]) for i, s in enumerate([1, 2, 3])]))
    other = run(x, [1, 2, 4])
    assert torch.equal(other[:2], batch[:2]) and (other[2] - batch[2]).abs().max() > 1e-3
    deterministic = sample_dpmpp_2m(smooth_eps, x, SCHEDULE, ts)
    assert (batch - deterministic).abs().max() > 1e-3  # the SDE does inject noise


def test_sde_noise_is_scaled_by_tau_d_and_confined_by_the_mask():
    x0 = torch.zeros(1, 1, 256, 256, dtype=torch.float64)
    mask = torch.zeros_like(x0)
    mask[..., :128] = 1
    x = start_state((1, 1, 256, 256), seed=1) * mask
    states = []
    sample_sde_dpmpp_2m(oracle_eps(x0), x, SCHEDULE, [100, 50], tau_d=0.5, mask=mask,
                        generator=torch.Generator().manual_seed(0), callback=record_states(states))
    alpha, sigma = np.sqrt(SCHEDULE.alphas_cumprod[[100, 50]]), np.sqrt(1 - SCHEDULE.alphas_cumprod[[100, 50]])
    h = np.log(alpha[1] / sigma[1]) - np.log(alpha[0] / sigma[0])
    z = (states[1] - sigma[1] / sigma[0] * np.exp(-h) * x) / (sigma[1] * np.sqrt(1 - np.exp(-2 * h)))
    assert abs(z[..., :128].std().item() - 0.5) < 0.01
    assert torch.all(z[..., 128:] == 0)


def test_high_noise_steps_run_in_float32_under_bf16_autocast():
    """Where σ/α > 1 the denoiser runs in float32 under bf16 autocast: those steps equal a float32 run exactly."""
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.linspace(-0.3, 0.5, 9).reshape(1, 1, 3, 3))
    dtypes = []

    def eps_fn(x, t):
        out = conv(x)
        dtypes.append(out.dtype)
        return torch.tanh(out) + 0.5 * x

    ts = space_timesteps(995, 10)
    x = start_state((2, 1, 16, 16), dtype=torch.float32)
    alpha, sigma = np.sqrt(SCHEDULE.alphas_cumprod[ts]), np.sqrt(1 - SCHEDULE.alphas_cumprod[ts])
    high = [i for i in range(len(ts)) if sigma[i] / alpha[i] > FP32_SIGMA_OVER_ALPHA]
    assert high == list(range(len(high))) and 3 <= len(high) < len(ts)

    def run(autocast, **kw):
        x0s = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sample_dpmpp_2m(eps_fn, x, SCHEDULE, ts, callback=lambda i: x0s.append(i["x0"]), **kw)
        return out, x0s

    reference, ref_x0 = run(False)
    dtypes.clear()
    guarded, guarded_x0 = run(True)
    assert dtypes == [torch.float32] * len(high) + [torch.bfloat16] * (len(ts) - len(high))
    assert all(torch.equal(guarded_x0[i], ref_x0[i]) for i in high)
    unguarded, unguarded_x0 = run(True, fp32_above=float("inf"))
    first_error = (unguarded_x0[0] - ref_x0[0]).abs().max().item()
    assert first_error > 0.05  # bf16 rounding of ε̂, amplified σ/α ≈ 160 times at index 995
    guarded_error = (guarded - reference).abs().max().item()
    assert guarded_error < 0.05 and guarded_error < (unguarded - reference).abs().max().item()


# --- 3. oracle ε recovers x0 through every sampler -------------------------------------------------------
@pytest.mark.parametrize("run", [
    lambda d, x: sample_ancestral(d, x, SCHEDULE, 100, tau_d=0.0, generator=torch.Generator().manual_seed(0)),
    lambda d, x: sample_ancestral(d, x, SCHEDULE, 100, tau_d=1.0, generator=torch.Generator().manual_seed(0)),
    lambda d, x: sample_respaced(d, x, SCHEDULE, 100, 10, tau_d=1.0, generator=torch.Generator().manual_seed(0)),
    lambda d, x: sample_dpmpp_2m(d, x, SCHEDULE, space_timesteps(100, 10)),
    lambda d, x: sample_dpmpp_2m(d, x, SCHEDULE, logsnr_timesteps(SCHEDULE, 100, 10)),
    lambda d, x: sample_sde_dpmpp_2m(d, x, SCHEDULE, space_timesteps(100, 10),
                                     generator=torch.Generator().manual_seed(0)),
], ids=["ancestral-tau0", "ancestral-tau1", "respaced", "dpmpp", "dpmpp-logsnr", "dpmpp-sde"])
def test_oracle_denoiser_returns_x0(run):
    x0 = start_state(seed=2)
    x = SCHEDULE.q_sample(x0, torch.full((2,), 100), start_state(seed=3))
    torch.testing.assert_close(run(oracle_eps(x0), x), x0, rtol=0, atol=1e-10)


# --- a tiny fake FTDDM v2 bundle: analytic / oracle ε-UNet, an analytic encoder and a fake flow ----------
class FakeFlow:
    """x_Ttrunc = q_sample(x̂0_enc, t_trunc, τ_f·z) with z from the given generators; records its calls."""

    def __init__(self, t_trunc):
        self.t_trunc, self.calls = t_trunc, []

    def sample(self, x0_enc, tau, generator):
        per_row = isinstance(generator, list)  # sample_ftddm passes one generator per chain
        gens = generator if per_row else [generator]
        shape = (1, *x0_enc.shape[1:]) if per_row else x0_enc.shape
        z = torch.cat([torch.randn(shape, generator=g, dtype=x0_enc.dtype, device=x0_enc.device) for g in gens])
        x = SCHEDULE.q_sample(x0_enc, self.t_trunc, tau * z)
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


class FakeFTDDM:
    """The FTDDM v2 interface sample_ftddm uses (encode, flow_sample, denoiser, schedule, config), analytic parts.

    The encoder's x̂0_enc is the LR channel and its one feature level the T1 channel; the flow checks that it
    gets the encoder's rows, so a chunk mixing up images fails here.
    """

    def __init__(self, unet, t_trunc):
        self.config = preset("tiny")
        self.config.diffusion.t_trunc = t_trunc
        self.schedule, self.unet, self.flow, self.encoded = SCHEDULE, RecordingUNet(unet), FakeFlow(t_trunc), 0
        self.unet_sees_estimate = True  # the ε-UNet is conditioned on x̂0_enc, so even noise chains encode

    def encode(self, cond, scale, valid=None):
        self.encoded += len(cond)
        return cond[:, :1].clone(), [cond[:, 2:3].clone()]

    def flow_sample(self, cond, x0_enc, features, tau, generator=None, valid=None):
        assert torch.equal(x0_enc, cond[:, :1]) and torch.equal(features[0], cond[:, 2:3])
        return self.flow.sample(x0_enc, tau, generator)

    def denoiser(self, cond, x0_enc, scale, valid=None):
        return lambda x_t, t: self.unet(x_t, t, cond, scale)


def fake_model(unet=oracle_unet, t_trunc=100):
    return FakeFTDDM(unet, t_trunc)


def make_cond(batch=2, size=8, seed=0, full_mask=False):
    g = torch.Generator().manual_seed(seed)
    lr = 0.2 + torch.rand(batch, size, size, generator=g)
    mask = torch.ones(batch, size, size)
    if not full_mask:
        mask[:, :2] = 0
        mask[:, :, -1] = 0
    t1, flair = torch.rand(batch, size, size, generator=g), torch.rand(batch, size, size, generator=g)
    return torch.stack([lr * mask, mask, t1, flair], dim=1)


@pytest.mark.parametrize("sampler,start", [("ancestral", "flow"), ("respaced", "flow"), ("dpmpp", "flow"),
                                           ("dpmpp-3m", "flow"), ("dpmpp-sde", "flow"), ("ancestral", "noise"),
                                           ("dpmpp", "noise"), ("dpmpp-sde", "noise")])
def test_ftddm_with_oracle_unet_returns_the_target(sampler, start):
    cond = make_cond()
    result = sample_ftddm(fake_model(), cond, 4.0, sampler=sampler, start=start, tau_d=1.0, n_samples=2,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.mean, cond[:, :1], rtol=0, atol=1e-4)
    assert result.std.max() < 1e-4


# --- 4./5. NFE and the start index -----------------------------------------------------------------------
@pytest.mark.parametrize("sampler,steps,nfe", [("ancestral", 10, 101), ("respaced", 10, 11), ("dpmpp", 10, 11),
                                               ("dpmpp", 100, 101), ("dpmpp-3m", 5, 6), ("dpmpp-sde", 10, 11),
                                               ("dpmpp-sde", 100, 101)])
@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
def test_nfe_of_a_truncated_chain(sampler, steps, nfe, spacing):
    counter = CountingDenoiser(smooth_eps)
    sample_chain(counter, start_state(), SCHEDULE, sampler=sampler, t_start=100, steps=steps, spacing=spacing,
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
    # 6 chains in chunks of 4 + 2: 2 × 6 ε-UNet calls, plus one encoder call for the 3 images (once per image,
    # not per chain)
    assert result.nfe == 6 and len(model.unet.calls) == 12 and model.encoded == 3
    assert result.network_calls == 12 + 1
    # the flow draws x at its own index only: another start index is refused, not silently mislabelled
    assert sample_ftddm(model, cond, 4.0, sampler="dpmpp", steps=5, t_trunc=37).nfe == 6
    with pytest.raises(ValueError, match="flow's index Ttrunc = 37, got t_trunc 20.*renoised"):
        sample_ftddm(model, cond, 4.0, sampler="dpmpp", steps=5, t_trunc=20)


@pytest.mark.parametrize("sampler,first_t", [("respaced", 999), ("dpmpp", 995), ("dpmpp-sde", 995)])
def test_noise_start_runs_the_full_chain(sampler, first_t):
    """DDPM starts at T − 1; DPM-Solver++ at the λ ≥ −5.1 clip: λ_995 = −5.08 ≥ −5.1 > λ_996 = −5.37."""
    model = fake_model(analytic_unet)
    result = sample_ftddm(model, make_cond(), 4.0, sampler=sampler, start="noise", steps=10,
                          generator=torch.Generator().manual_seed(0))
    assert model.unet.calls[0][1][0].item() == first_t and result.nfe == 11 == len(model.unet.calls)
    assert model.unet.calls[-1][1][0].item() == 0
    assert not model.flow.calls


@pytest.mark.parametrize("sampler,start,first_t", [("dpmpp", "flow", 100), ("dpmpp", "noise", 995),
                                                   ("dpmpp-sde", "noise", 995), ("respaced", "flow", 100)])
def test_logsnr_spacing_reaches_the_chain(sampler, start, first_t):
    model = fake_model(analytic_unet)
    result = sample_ftddm(model, make_cond(), 4.0, sampler=sampler, start=start, steps=10, spacing="logsnr",
                          generator=torch.Generator().manual_seed(0))
    assert [int(t[0]) for _, t in model.unet.calls] == logsnr_timesteps(SCHEDULE, first_t, 10)
    assert result.nfe == 11


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


@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp", "dpmpp-3m", "dpmpp-sde"])
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


@pytest.mark.parametrize("sampler,start", [("ancestral", "flow"), ("dpmpp", "noise"), ("dpmpp-sde", "flow")])
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
    (dict(spacing="karras"), "spacing"),
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
