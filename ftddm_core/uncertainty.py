"""Post-hoc calibration of the sample standard deviation (σ-scaling, Laves et al., MIDL 2020).

The spread of FTDDM's samples at the default flow temperature τ_f < 1 is narrower than its error (on fold 0's
validation patients RMSE ≈ 2.4–2.8 × the mean std). One factor c, fitted on validation maps so that
RMSE = c · mean std inside the mask, rescales the uncertainty map to the size of the error. It changes the
scale of the map, not which voxels it ranks as uncertain (Pearson r of std vs |error| is unchanged).
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

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"uncertainty calibration scale must be a finite number > 0, got {self.scale}")

    def matches(self, *, sampler: str, steps: int, tau_f: float, tau_d: float, start: str = "flow") -> bool:
        """Whether c was fitted with these sampler settings (elsewhere it is only an approximation; every fit so
        far is of the flow start)."""
        stochastic = sampler in NOISY_SAMPLERS
        return (start == "flow" and sampler == self.sampler and (sampler == "ancestral" or steps == self.steps)
                and math.isclose(tau_f, self.tau_f) and (not stochastic or math.isclose(tau_d, self.tau_d)))

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


def fit_std_scale(errors: np.ndarray, stds: np.ndarray) -> float:
    """c = RMSE / mean std over the given voxels (so that the calibrated mean std equals the RMSE)."""
    e, s = np.asarray(errors, dtype=np.float64).ravel(), np.asarray(stds, dtype=np.float64).ravel()
    if e.shape != s.shape or e.size == 0:
        raise ValueError(f"expected equally many errors and stds (> 0), got {e.size} and {s.size}")
    mean_std = float(s.mean())
    if not mean_std > 0:
        raise ValueError("the samples have no spread (mean std 0): use 2 or more samples per map")
    return float(np.sqrt(np.mean(e ** 2)) / mean_std)


def describe(cal: UncertaintyCalibration | None, **settings: Any) -> dict[str, Any]:
    """What run.json records about the uncertainty map's scale for a run with these sampler settings."""
    if cal is None:
        return {"scale": 1.0, "calibrated": False, "note": "the model file has no uncertainty calibration: the "
                "map is the raw standard deviation of the samples"}
    note = (f"standard deviation of the samples × {cal.scale:.3g}, fitted on {cal.fitted_on} so that RMSE = "
            "mean uncertainty inside the mask")
    if not cal.matches(**settings):
        note += (f"; fitted for sampler {cal.sampler}, K = {cal.steps}, τ_f = {cal.tau_f:g}, τ_d = {cal.tau_d:g}: "
                 "with other settings the factor is only an approximation")
    return {"scale": cal.scale, "calibrated": True, "fitted": asdict(cal), "note": note}
