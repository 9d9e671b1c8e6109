"""Reverse-diffusion chains of FTDDM (Dong et al., MedIA 2024, Algorithm 1), k-diffusion style.

Conventions: index t ∈ [0, T) of a :class:`~ftddm_core.schedule.DiffusionSchedule`, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.
A chain "starting at index t_start" takes x_{t_start} and evaluates the network at t_start, …, 0; the last
evaluation (index 0) yields the clean x̂0, so the paper's chain with Ttrunc = 100 costs 101 evaluations (NFE).

Every sampler takes the same model interface, a denoiser ``eps_fn(x_t, t) -> ε̂`` where t is a (B,) long
tensor of *original* schedule indices (condition, upscaling factor … are closed over by the caller);
:class:`CountingDenoiser` adds NFE counting, the published masking ε̂ ⊙ M and an x̂0 hook (clamp, data
consistency). The samplers (ancestral, respaced, DPM-Solver++ 2M/3M/SDE) are pure ``@torch.no_grad()``
functions; :mod:`ftddm_core.sampling` wires model, flow start, hooks and repeated samples around them.
Math only; never touches files.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .options import SAMPLERS
from .schedule import DiffusionSchedule, chain_timesteps, lambda_clipped_start, respace, space_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
DPM_SOLVERS = ("dpmpp", "dpmpp-3m", "dpmpp-sde")


# --- the one model interface ---------------------------------------------------------------------------
class CountingDenoiser:
    """ε̂(x_t, t) with NFE counting, the published masking ε̂ ⊙ M and an optional hook on x̂0.

    When ``x0_hook`` is given, x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t is passed through it (e.g. clamping to the data
    range, k-space data consistency) and ε̂ is recomputed from the corrected x̂0, so every sampler sees the
    same corrected prediction. The mask multiplies the network output (as published) and the final ε̂.
    """

    def __init__(self, eps_fn: EpsFn, schedule: DiffusionSchedule | None = None, *,
                 mask: torch.Tensor | None = None, x0_hook: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if x0_hook is not None and schedule is None:
            raise ValueError("an x0_hook needs the schedule to convert between ε̂ and x̂0")
        self.eps_fn, self.schedule, self.mask, self.x0_hook = eps_fn, schedule, mask, x0_hook
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        eps = self._masked(self.eps_fn(x, t))
        if self.x0_hook is not None:
            x0 = self.x0_hook(self.schedule.predict_x0_from_eps(x, t, eps))
            eps = self._masked(self.schedule.predict_eps_from_x0(x, t, x0))
        return eps

    def _masked(self, eps: torch.Tensor) -> torch.Tensor:
        return eps if self.mask is None else eps * self.mask


# --- shared helpers -------------------------------------------------------------------------------------
@dataclass
class _Setup:
    """What every sampler needs after validation: the mask on x's device/dtype and a batch time maker."""

    mask: torch.Tensor | None
    batch: int
    device: torch.device

    def time(self, t: int) -> torch.Tensor:
        return torch.full((self.batch,), int(t), dtype=torch.long, device=self.device)


def _setup(x: torch.Tensor, mask: torch.Tensor | None) -> _Setup:
    """Validate the state x and the mask (broadcastable to x) shared by all samplers."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.ndim < 2:
        raise ValueError(f"x must be a floating-point tensor (B, …), got {getattr(x, 'shape', type(x))}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")
    if mask is not None:
        mask = torch.as_tensor(mask)
        try:
            shape = torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} must broadcast to the image shape {tuple(x.shape)}")
        mask = mask.to(device=x.device, dtype=x.dtype)
    return _Setup(mask=mask, batch=x.shape[0], device=x.device)


def check_tau(name: str, tau: float) -> float:
    if isinstance(tau, bool) or not (isinstance(tau, numbers.Real) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {tau!r}")
    return float(tau)


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_index(name: str, t: int, schedule: DiffusionSchedule, low: int = 0) -> int:
    top = schedule.num_timesteps - 1
    if not is_int(t) or not low <= t <= top:
        raise ValueError(f"{name} must be an integer index in [{low}, {top}], got {t!r}")
    return int(t)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """N(0, I) shaped like x, drawn on the generator's device then moved (one generator per row if a list)."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    generators = list(generator)
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per batch row ({x.shape[0]}), got {len(generators)}")
    rows = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype).to(x.device)
            for g in generators]
    return torch.cat(rows, dim=0)


def _report(callback, step: int, total: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback(dict(step=step, total=total, t=int(t), x=x, x0=x0))


# --- ancestral sampling (paper Algorithm 1) ------------------------------------------------------------
def _ancestral(denoiser, x, schedule, t_start, timestep_map, tau_d, mask, generator, callback):
    """Ancestral loop over schedule indices t_start…0; the denoiser gets timestep_map[index]."""
    setup = _setup(x, mask)
    tau_d = check_tau("tau_d", tau_d)
    total = t_start + 1
    for step, index in enumerate(range(t_start, -1, -1)):
        original_t = int(timestep_map[index])
        eps = denoiser(x, setup.time(original_t))
        x0 = schedule.predict_x0_from_eps(x, index, eps)
        _report(callback, step, total, original_t, x, x0)
        if index == 0:
            return x0  # posterior at index 0 is x̂0 itself (ᾱ_{−1} = 1): no noise on the last step
        mean, variance = schedule.q_posterior_mean_variance(x0, x, index)
        noise = tau_d * randn_like(x, generator)  # τ_d scales the noise standard deviation
        if setup.mask is not None:
            noise = noise * setup.mask
        x = mean + variance.sqrt() * noise
    raise AssertionError("unreachable")


@torch.no_grad()
def sample_ancestral(denoiser: EpsFn, x: torch.Tensor, schedule: DiffusionSchedule, t_start: int, *,
                     tau_d: float = 1.0, mask: torch.Tensor | None = None, generator: Generators = None,
                     callback=None) -> torch.Tensor:
    """Paper Algorithm 1 / Ho et al. 2020: x_{t−1} = μ̃_t(x̂0, x_t) + √β̃_t·τ_d·z·M, z ~ N(0, I), none at t = 0.

    Fixed "small" variance β̃_t (the posterior variance; diffusers ``variance_type="fixed_small"``). The paper
    writes z ~ N(0, τ_d·I) and says τ_d "scales the noise"; here τ_d multiplies the noise *standard deviation*
    (as in the authors' code). NFE = t_start + 1. ``generator`` is a torch.Generator or one per batch row.
    """
    t_start = _check_index("t_start", t_start, schedule)
    return _ancestral(denoiser, x, schedule, t_start, np.arange(t_start + 1), tau_d, mask, generator, callback)


@torch.no_grad()
def sample_respaced(denoiser: EpsFn, x: torch.Tensor, schedule: DiffusionSchedule, t_start: int, steps: int, *,
                    tau_d: float = 1.0, mask: torch.Tensor | None = None, generator: Generators = None,
                    callback=None) -> torch.Tensor:
    """Ancestral sampling on the respaced chain space_timesteps(t_start, steps) (Nichol & Dhariwal §4), NFE steps+1."""
    t_start = _check_index("t_start", t_start, schedule, low=1)
    return _respaced(denoiser, x, schedule, space_timesteps(t_start, steps), tau_d, mask, generator, callback)


def _respaced(denoiser, x, schedule, timesteps, tau_d, mask, generator, callback):
    spaced, timestep_map = respace(schedule, timesteps)
    return _ancestral(denoiser, x, spaced, spaced.num_timesteps - 1, timestep_map, tau_d, mask, generator, callback)


# --- DPM-Solver++(2M), deterministic and stochastic -----------------------------------------------------
# diffusers' `lambda_min_clipped` value for the cosine ("squaredcos_cap_v2") schedule: a noise chain starts at
# the largest index with λ ≥ −5.1 (index 995 of cosine(1000)), not at T − 1 where σ/α ≈ 2·10⁴.
LAMBDA_MIN_CLIPPED = -5.1
# Steps with σ/α above this (noise dominates the signal, λ < 0) run the denoiser in float32 even under bf16
# autocast: x̂0 = x/α − (σ/α)·ε̂ multiplies the rounding of ε̂ (bf16 unit roundoff 2⁻⁸) by σ/α.
FP32_SIGMA_OVER_ALPHA = 1.0


def _check_timesteps(timesteps, schedule: DiffusionSchedule) -> list[int]:
    ts = [int(t) for t in timesteps]
    top = schedule.num_timesteps - 1
    if not ts or any(not 0 <= t <= top for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        shown = f"{ts[:12]}{' …' if len(ts) > 12 else ''}"
        raise ValueError(f"timesteps must be a non-empty, strictly decreasing list of indices in [0, {top}], "
                         f"got {shown}")
    return ts


def _denoise(denoiser: EpsFn, x: torch.Tensor, t: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """ε̂(x, t); with full_precision, outside any autocast and with x at least float32."""
    if not full_precision:
        return denoiser(x, t)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return denoiser(x if x.dtype in (torch.float32, torch.float64) else x.float(), t)


def _step_order(order: int, i: int, n: int) -> int:
    """The order of multistep step i of n (diffusers' rule): warm up from first order as history accrues, and
    with fewer than 15 steps at most second order on the step before the last (lower_order_final)."""
    step_order = min(order, i + 1)
    return min(step_order, 2) if i == n - 2 and n < 15 else step_order


def _dpmpp_multistep(denoiser, x, schedule, timesteps, mask, noise_fn, callback, fp32_above, order=2) -> torch.Tensor:
    """The multistep loop of the ODE (noise_fn None; order 2 or 3) and SDE (noise_fn(x) → z ~ N(0, I); order 2)
    variants; → last x̂0."""
    setup = _setup(x, mask)
    ts = _check_timesteps(timesteps, schedule)
    alpha = np.sqrt(schedule.alphas_cumprod[ts])
    sigma = np.sqrt(1.0 - schedule.alphas_cumprod[ts])
    lam = np.log(alpha) - np.log(sigma)
    history = []  # x̂0 of the earlier steps, newest last (at most order − 1 kept)
    for i, t in enumerate(ts):
        eps = _denoise(denoiser, x, setup.time(t), bool(sigma[i] > fp32_above * alpha[i]))
        x0 = schedule.predict_x0_from_eps(x, t, eps)
        _report(callback, i, len(ts), t, x, x0)
        if i == len(ts) - 1:
            return x0  # the final step to σ = 0 lands on x̂0 itself (and adds no noise)
        h = lam[i + 1] - lam[i]
        step_order = _step_order(order, i, len(ts))
        if step_order == 3:
            x = _dpmpp_3m_step(x, [*history[-2:], x0], lam[i - 2:i + 2], sigma[i:i + 2], alpha[i + 1])
        else:
            if step_order == 1:
                direction = x0
            else:
                r = (lam[i] - lam[i - 1]) / h
                direction = x0 + (x0 - history[-1]) / (2.0 * r)  # D0 + ½·D1, D1 = (x̂0_i − x̂0_{i−1}) / r
            if noise_fn is None:  # ODE: x' = σ'/σ·x − α'·(e^{−h} − 1)·D
                x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * direction
            else:  # SDE: x' = σ'/σ·e^{−h}·x + α'·(1 − e^{−2h})·D + σ'·√(1 − e^{−2h})·z·M
                z = noise_fn(x) if setup.mask is None else noise_fn(x) * setup.mask
                x = ((sigma[i + 1] / sigma[i]) * math.exp(-h)) * x - (alpha[i + 1] * math.expm1(-2 * h)) * direction
                x = x + (sigma[i + 1] * math.sqrt(-math.expm1(-2 * h))) * z
        if setup.mask is not None:
            x = x * setup.mask
        history = [*history, x0][-(order - 1):]
    raise AssertionError("unreachable")


def _dpmpp_3m_step(x, x0s, lam, sigma, alpha_next) -> torch.Tensor:
    """One DPM-Solver++(3M) step (Lu et al. 2022, arXiv:2211.01095, App. B; diffusers' third-order update).

    x0s = x̂0 at λ_{i−2}, λ_{i−1}, λ_i; lam = (λ_{i−2}, λ_{i−1}, λ_i, λ_{i+1}); sigma = (σ_i, σ_{i+1}).
    x' = σ'/σ·x − α'(e^{−h} − 1)·D0 + α'((e^{−h} − 1)/h + 1)·D1 − α'((e^{−h} − 1 + h)/h² − ½)·D2.
    """
    m2, m1, m0 = x0s
    h, h0, h1 = lam[3] - lam[2], lam[2] - lam[1], lam[1] - lam[0]
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    e = math.expm1(-h)  # e^{−h} − 1
    return ((sigma[1] / sigma[0]) * x - (alpha_next * e) * m0 + (alpha_next * (e / h + 1.0)) * d1
            - (alpha_next * ((e + h) / h**2 - 0.5)) * d2)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: EpsFn, x: torch.Tensor, schedule: DiffusionSchedule, timesteps: Sequence[int], *,
                    mask: torch.Tensor | None = None, callback=None,
                    fp32_above: float = FP32_SIGMA_OVER_ALPHA) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction (Lu et al. 2022, Alg. 2) over decreasing indices, then x̂0 at the last.

    α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ = log(α/σ), h = λ_next − λ_cur. First step first order, later steps second
    order (midpoint form), and from the last index a first-order step to σ = 0, which is x̂0 itself — the same
    as diffusers' DPMSolverMultistepScheduler(final_sigmas_type="zero"). NFE = len(timesteps).
    Deterministic; the mask (if any) multiplies the state after every step. Where σ/α > fp32_above the
    denoiser runs without autocast on float32 input (bf16 rounding of ε̂ would be amplified σ/α times).
    """
    return _dpmpp_multistep(denoiser, x, schedule, timesteps, mask, None, callback, fp32_above)


@torch.no_grad()
def sample_dpmpp_3m(denoiser: EpsFn, x: torch.Tensor, schedule: DiffusionSchedule, timesteps: Sequence[int], *,
                    mask: torch.Tensor | None = None, callback=None,
                    fp32_above: float = FP32_SIGMA_OVER_ALPHA) -> torch.Tensor:
    """DPM-Solver++(3M), data prediction (Lu et al. 2022, arXiv:2211.01095): :func:`sample_dpmpp_2m` with a
    third-order multistep update once three x̂0 are known; as diffusers' DPMSolverMultistepScheduler(solver_order=3,
    final_sigmas_type="zero", lower_order_final=True) — first, second, then third order, with fewer than 15 steps
    second order on the step before the last, and x̂0 itself at the last index. NFE = len(timesteps).
    """
    return _dpmpp_multistep(denoiser, x, schedule, timesteps, mask, None, callback, fp32_above, order=3)


@torch.no_grad()
def sample_sde_dpmpp_2m(denoiser: EpsFn, x: torch.Tensor, schedule: DiffusionSchedule, timesteps: Sequence[int], *,
                        tau_d: float = 1.0, mask: torch.Tensor | None = None, generator: Generators = None,
                        callback=None, fp32_above: float = FP32_SIGMA_OVER_ALPHA) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, the SDE variant; diffusers "sde-dpmsolver++").

    Same steps as :func:`sample_dpmpp_2m` with the SDE coefficients: x' = σ'/σ·e^{−h}·x + α'(1 − e^{−2h})·D +
    σ'·√(1 − e^{−2h})·τ_d·z·M, z ~ N(0, I) from ``generator`` (one per batch row, so batching never changes a
    chain); no noise on the last step (to σ = 0). τ_d scales the noise standard deviation as in the ancestral
    sampler. NFE = len(timesteps).
    """
    tau_d = check_tau("tau_d", tau_d)
    return _dpmpp_multistep(denoiser, x, schedule, timesteps, mask, lambda like: tau_d * randn_like(like, generator),
                     callback, fp32_above)


# --- dispatch -------------------------------------------------------------------------------------------
def chain_nfe(sampler: str, t_start: int, steps: int) -> int:
    """Network evaluations of one chain: t_start + 1 for "ancestral", steps + 1 for the others, 1 for
    "regression" (the encoder, which every chain also runs once per image)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "regression":
        return 1
    return t_start + 1 if sampler == "ancestral" else steps + 1


def noise_start_index(schedule: DiffusionSchedule, sampler: str) -> int:
    """Where a chain from pure noise starts: T − 1 for the ancestral/DDPM chains, the λ clip for DPM-Solver++.

    DPM-Solver++ weights its first x̂0 by α_next·(1 − e^{−h}) ≈ 1 for a long first step, so an x̂0 taken at
    T − 1 (ᾱ = 2.4·10⁻⁹, σ/α ≈ 2·10⁴ on cosine(1000)) is garbage that the whole chain inherits; diffusers clips
    λ ≥ −5.1 (`lambda_min_clipped`) for this schedule. The ancestral samplers keep T − 1: their step weighs x̂0
    by β_t·√ᾱ_{t−1}/(1 − ᾱ_t) ≈ α_{t−1}, which cancels most of x̂0's 1/α_t.
    """
    if sampler in DPM_SOLVERS:
        return lambda_clipped_start(schedule, LAMBDA_MIN_CLIPPED)
    return schedule.num_timesteps - 1


@torch.no_grad()
def sample_chain(denoiser: EpsFn, x_start: torch.Tensor, schedule: DiffusionSchedule, *, sampler: str,
                 t_start: int, steps: int = 10, tau_d: float = 1.0, mask: torch.Tensor | None = None,
                 generator: Generators = None, callback=None, spacing: str = "uniform") -> torch.Tensor:
    """Run one reverse chain from x_{t_start}: "ancestral" (every index; steps and spacing ignored),
    "respaced" (ancestral on `steps` + 1 indices), "dpmpp", "dpmpp-3m" or "dpmpp-sde", on `steps` + 1 indices spaced "uniform" in index or
    "logsnr" in λ."""
    if sampler == "ancestral":
        return sample_ancestral(denoiser, x_start, schedule, t_start, tau_d=tau_d, mask=mask,
                                generator=generator, callback=callback)
    if sampler not in ("respaced", *DPM_SOLVERS):
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    t_start = _check_index("t_start", t_start, schedule, low=1)
    timesteps = chain_timesteps(schedule, t_start, steps, spacing)
    if sampler == "respaced":
        return _respaced(denoiser, x_start, schedule, timesteps, tau_d, mask, generator, callback)
    if sampler == "dpmpp":
        return sample_dpmpp_2m(denoiser, x_start, schedule, timesteps, mask=mask, callback=callback)
    if sampler == "dpmpp-3m":
        return sample_dpmpp_3m(denoiser, x_start, schedule, timesteps, mask=mask, callback=callback)
    return sample_sde_dpmpp_2m(denoiser, x_start, schedule, timesteps, tau_d=tau_d, mask=mask,
                               generator=generator, callback=callback)


# --- repeated samples: Welford running moments ----------------------------------------------------------
class RunningMoments:
    """Per-pixel running mean and variance of repeated samples of a batch of images (Welford 1962), float64."""

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu"):
        self.count = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.mean = torch.zeros(tuple(shape), dtype=torch.float64, device=device)
        self.m2 = torch.zeros(tuple(shape), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, index: torch.Tensor) -> None:
        """Add one new sample x[i] of image index[i] for each row i (indices must be distinct)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.count.device)
        if index.unique().numel() != index.numel():
            raise ValueError("each image may appear at most once per RunningMoments.add call")
        x = x.to(device=self.mean.device, dtype=torch.float64)
        n = (self.count[index] + 1).to(torch.float64).reshape(-1, *(1,) * (x.ndim - 1))
        delta = x - self.mean[index]
        mean = self.mean[index] + delta / n
        self.m2[index] += delta * (x - mean)
        self.mean[index] = mean
        self.count[index] += 1

    def std(self) -> torch.Tensor:
        """Sample standard deviation (Bessel, n − 1 — like torch.std); 0 where fewer than two samples."""
        n = self.count.to(torch.float64).reshape(-1, *(1,) * (self.m2.ndim - 1))
        return torch.where(n > 1, self.m2 / (n - 1).clamp(min=1), torch.zeros_like(self.m2)).sqrt()
