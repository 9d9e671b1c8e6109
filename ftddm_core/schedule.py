"""Diffusion schedule in float64: cosine ᾱ, forward process, posterior, log-SNR, step spacing and respacing.

Notation follows Ho et al. 2020 / Nichol & Dhariwal 2021 (improved DDPM): index t ∈ [0, T) and
x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, with ᾱ_t = Π_{i≤t}(1−β_i). Math only; never touches files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .options import SPACINGS


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """ᾱ_t of the cosine schedule, ᾱ(τ)=cos²((τ+s)/(1+s)·π/2), via β_t capped at max_beta (Nichol & Dhariwal eq. 17)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = np.array(
        [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)],
        dtype=np.float64,
    )
    return np.cumprod(1.0 - betas)


@dataclass(frozen=True)
class DiffusionSchedule:
    """A (possibly respaced) discrete diffusion defined by its ᾱ sequence, in float64."""

    alphas_cumprod: np.ndarray

    def __post_init__(self):
        a = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if a.ndim != 1 or len(a) < 1 or np.any(a <= 0) or np.any(a > 1) or np.any(np.diff(a) > 0):
            raise ValueError("alphas_cumprod must be a non-increasing 1D sequence in (0, 1]")
        object.__setattr__(self, "alphas_cumprod", a)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000) -> "DiffusionSchedule":
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be ≥ 1, got {num_timesteps}")
        return cls(cosine_alphas_cumprod(num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def betas(self) -> np.ndarray:
        return 1.0 - self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def lambdas(self) -> np.ndarray:
        """λ_t = log(α_t/σ_t) = ½·log(ᾱ_t/(1−ᾱ_t)), DPM-Solver's half log-SNR (Lu et al. 2022); +inf if ᾱ = 1."""
        a = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            return 0.5 * (np.log(a) - np.log1p(-a))

    @property
    def posterior_variance(self) -> np.ndarray:
        """β̃_t = β_t (1−ᾱ_{t−1}) / (1−ᾱ_t) (Ho et al. eq. 7)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    # --- forward process and parameterisations -------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        a = self.alphas_cumprod
        return _at(np.sqrt(a), t, x0) * x0 + _at(np.sqrt(1 - a), t, x0) * noise

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t."""
        a = self.alphas_cumprod
        return _at(1 / np.sqrt(a), t, x_t) * x_t - _at(np.sqrt(1 / a - 1), t, x_t) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱ_t·x̂0) / √(1−ᾱ_t)."""
        a = self.alphas_cumprod
        return (_at(1 / np.sqrt(a), t, x_t) * x_t - x0) / _at(np.sqrt(1 / a - 1), t, x_t)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t−1} | x_t, x0) (Ho et al. eqs. 6–7)."""
        a, a_prev, b = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        coef_x0 = b * np.sqrt(a_prev) / (1 - a)
        coef_xt = (1 - a_prev) * np.sqrt(1 - b) / (1 - a)
        mean = _at(coef_x0, t, x_t) * x0 + _at(coef_xt, t, x_t) * x_t
        return mean, _at(self.posterior_variance, t, x_t)


def _at(values: np.ndarray, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """values[t] as a tensor broadcastable to `like` (batch on dim 0), cast to like's dtype/device."""
    table = torch.as_tensor(values, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.long).cpu()
    out = table[t].to(device=like.device, dtype=like.dtype)
    if out.ndim == 0:
        return out
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))




def _check_steps(t_max: int, steps: int) -> None:
    if steps < 1 or steps > t_max:
        raise ValueError(f"steps must be in [1, {t_max}] for a chain starting at index {t_max}, got {steps}")


def space_timesteps(t_max: int, steps: int) -> list[int]:
    """`steps` + 1 integer indices evenly spaced from t_max down to 0 (inclusive), strictly decreasing.

    Rounded as diffusers' "linspace" spacing (from 0 upwards, half to even), so that ties such as 895.5 fall on
    the same side and a chain's indices equal diffusers' timesteps (plus the final index 0).
    """
    _check_steps(t_max, steps)
    return [int(v) for v in np.linspace(0, t_max, steps + 1).round()[::-1]]


def logsnr_timesteps(schedule: DiffusionSchedule, t_max: int, steps: int) -> list[int]:
    """`steps` + 1 indices from t_max to 0 whose λ_t are evenly spaced (Lu et al. 2022, "logSNR" uniform).

    Each uniform λ target is mapped to the nearest index (λ_t is monotone in t); where rounding would repeat an
    index (many steps over a short range) the index is moved down by one, so the list stays strictly decreasing.
    """
    _check_steps(t_max, steps)
    lam = schedule.lambdas[: t_max + 1]
    lam_end = lam[1] + (lam[1] - lam[2]) if not np.isfinite(lam[0]) else lam[0]  # ᾱ_0 = 1: extrapolate λ_0
    targets = np.linspace(lam[t_max], lam_end, steps + 1)
    finite = np.where(np.isfinite(lam), lam, lam_end)
    order = np.arange(t_max + 1)
    ideal = np.interp(targets, finite[::-1], order[::-1])  # λ decreases with t: interpolate on the reversed axis
    ts = np.rint(ideal).astype(np.int64)
    ts[0], ts[-1] = t_max, 0
    for i in range(1, steps + 1):
        ts[i] = min(max(ts[i], steps - i), ts[i - 1] - 1)  # distinct and room for the remaining steps
    return [int(t) for t in ts]


def chain_timesteps(schedule: DiffusionSchedule, t_max: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The `steps` + 1 indices of a solver chain from t_max to 0: "uniform" in index or "logsnr" (uniform in λ)."""
    if spacing == "uniform":
        return space_timesteps(t_max, steps)
    if spacing == "logsnr":
        return logsnr_timesteps(schedule, t_max, steps)
    raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")


def lambda_clipped_start(schedule: DiffusionSchedule, lambda_min: float) -> int:
    """The largest index t with λ_t ≥ lambda_min (diffusers' ``lambda_min_clipped``): where a noise chain starts."""
    above = np.nonzero(schedule.lambdas >= lambda_min)[0]
    if len(above) == 0:
        raise ValueError(f"no index of the schedule has λ ≥ {lambda_min} (λ_0 = {schedule.lambdas[0]:.3g})")
    return int(above[-1])


def respace(schedule: DiffusionSchedule, use_timesteps) -> tuple[DiffusionSchedule, np.ndarray]:
    """Pure respacing (Nichol & Dhariwal §4): keep ᾱ at `use_timesteps`; returns (new schedule, timestep map).

    The new chain's index i corresponds to the original index timestep_map[i]; its betas are
    β'_i = 1 − ᾱ_{map[i]} / ᾱ_{map[i−1]}, so the marginals q(x_i | x0) are unchanged.
    """
    keep = np.array(sorted(set(int(t) for t in use_timesteps)), dtype=np.int64)
    if len(keep) == 0 or keep[0] < 0 or keep[-1] >= schedule.num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps}), got {list(use_timesteps)}")
    return DiffusionSchedule(schedule.alphas_cumprod[keep]), keep
