"""Post-hoc calibration of the sample standard deviation (σ-scaling, Laves et al., MIDL 2020).

The spread of FTDDM's samples is narrower than their error (on fold 0's validation patients RMSE ≈ 2.7–4.7 ×
the mean std for the default re-noised chain, growing with the upscaling factor s). A factor c, fitted on
validation maps so that RMSE = c · mean std inside the mask, per factor and linear in log s between them,
rescales the uncertainty map to the size of the error. It changes the scale of the map, not which voxels it
ranks as uncertain (Pearson r of std vs |error| is unchanged).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .options import NOISY_SAMPLERS

METADATA_KEY = "uncertainty_calibration"  # the safetensors metadata entry of a model file


@dataclass(frozen=True)
class UncertaintyCalibration:
    """c and what it was fitted on: it holds for the sampler settings it was fitted with."""

    scale: float  # c: the uncertainty map is c × the per-voxel standard deviation of the samples
    sampler: str
    steps: int
    tau_f: float
    tau_d: float
    samples: int  # samples per map in the fit
    fitted_on: str  # which maps (never test maps)
    per_factor: dict[str, float] = field(default_factory=dict)  # RMSE / mean std per upscaling factor
    start: str = "flow"  # where the chains started ("flow": a τ_f draw at Ttrunc; "renoised": the mode at t_trunc)
    t_trunc: int = 0  # the index the chains started at (0: the model's Ttrunc, as for the flow start)

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"uncertainty calibration scale must be a finite number > 0, got {self.scale}")

    def matches(self, *, sampler: str, steps: int, tau_f: float, tau_d: float, start: str = "flow",
                t_trunc: int = 0) -> bool:
        """Whether c was fitted with these sampler settings (elsewhere it is only an approximation). τ_f counts
        for the flow start only (a re-noised chain starts from the flow's mode), steps for the step-based
        samplers, τ_d for the noisy ones, and the start index for re-noised chains."""
        stochastic = sampler in NOISY_SAMPLERS
        same_start = start == self.start and (start == "flow" or int(t_trunc) == int(self.t_trunc))
        return (same_start and sampler == self.sampler and (sampler == "ancestral" or steps == self.steps)
                and (start != "flow" or math.isclose(tau_f, self.tau_f))
                and (not stochastic or math.isclose(tau_d, self.tau_d)))

    def scale_for(self, factor: float | None, samples: int | None = None) -> float:
        """c at upscaling factor s for an std of ``samples`` draws: linear in log s between the per-factor fits,
        constant beyond the outermost (the pooled c when fewer than two factors were fitted or s is not known),
        times c4(n_fit) / c4(n) — the sample std of n Gaussian draws is c4(n)·σ on average, so fewer draws than
        the fit used read lower by that much."""
        c = self.scale
        if factor is not None and len(self.per_factor) >= 2:
            points = sorted((math.log(float(k)), float(v)) for k, v in self.per_factor.items())
            c = float(np.interp(math.log(factor), [p for p, _ in points], [v for _, v in points]))
        if samples is not None and samples >= 2 and self.samples >= 2:
            c *= c4(self.samples) / c4(samples)
        return c

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> "UncertaintyCalibration | None":
        """The calibration stored in a model file's metadata, None when it has none."""
        text = metadata.get(METADATA_KEY)
        if text is None:
            return None
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: the stored '{METADATA_KEY}' is invalid: {exc}") from exc


def c4(n: int) -> float:
    """E[sample std] / σ for n Gaussian draws (Bessel-corrected): √(2/(n−1))·Γ(n/2)/Γ((n−1)/2)."""
    if n < 2:
        raise ValueError(f"the sample std needs n ≥ 2 draws, got {n}")
    return math.sqrt(2.0 / (n - 1)) * math.exp(math.lgamma(n / 2) - math.lgamma((n - 1) / 2))


def fit_std_scale(errors: np.ndarray, stds: np.ndarray) -> float:
    """c = RMSE / mean std over the given voxels (so that the calibrated mean std equals the RMSE)."""
    e, s = np.asarray(errors, dtype=np.float64).ravel(), np.asarray(stds, dtype=np.float64).ravel()
    if e.shape != s.shape or e.size == 0:
        raise ValueError(f"expected equally many errors and stds (> 0), got {e.size} and {s.size}")
    mean_std = float(s.mean())
    if not mean_std > 0:
        raise ValueError("the samples have no spread (mean std 0): use 2 or more samples per map")
    return float(np.sqrt(np.mean(e ** 2)) / mean_std)


def scale_of(cal: UncertaintyCalibration | None, factor: float | None, samples: int | None = None) -> float:
    """The factor the uncertainty map is the std times: c(s, n) of the model's calibration, 1 without one."""
    return 1.0 if cal is None else cal.scale_for(factor, samples)


def describe(cal: UncertaintyCalibration | None, factor: float | None = None, samples: int | None = None,
             **settings: Any) -> dict[str, Any]:
    """What run.json records about the uncertainty map's scale for a run at upscaling factor s (``factor``) with
    ``samples`` draws per map and these sampler settings."""
    if cal is None:
        return {"scale": 1.0, "calibrated": False, "note": "the model file has no uncertainty calibration: the "
                "map is the raw standard deviation of the samples"}
    scale = cal.scale_for(factor, samples)
    parts = []
    if factor is not None and len(cal.per_factor) >= 2:
        fits = ", ".join(f"s = {k}: {v:g}" for k, v in sorted(cal.per_factor.items(), key=lambda kv: float(kv[0])))
        parts.append(f"at s = {factor:g}, linear in log s between the per-factor fits {fits}")
    if samples is not None and samples >= 2 and samples != cal.samples:
        parts.append(f"× c4({cal.samples}) / c4({samples}) for {samples} samples instead of the fit's {cal.samples}")
    how = f" ({'; '.join(parts)})" if parts else ""
    note = (f"standard deviation of the samples × {scale:.3g}{how}, fitted on {cal.fitted_on} so that RMSE = "
            "mean uncertainty inside the mask")
    if not cal.matches(**settings):
        note += (f"; fitted for {_fitted_settings(cal)}: with other settings the factor is only an approximation")
    return {"scale": scale, "calibrated": True, "fitted": asdict(cal), "note": note}


def _fitted_settings(cal: UncertaintyCalibration) -> str:
    """The sampler settings a calibration holds for, in words."""
    start = (f"the flow start (τ_f = {cal.tau_f:g})" if cal.start == "flow"
             else f"the re-noised start at t = {cal.t_trunc}")
    steps = "" if cal.sampler == "ancestral" else f", K = {cal.steps}"
    return f"sampler {cal.sampler}{steps} from {start}, τ_d = {cal.tau_d:g}"
