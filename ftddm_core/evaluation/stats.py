"""Per-map measures beyond the published metrics (k-space consistency, sharpness) and the statistics over maps
(aggregation, paired Wilcoxon tests, uncertainty calibration)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr, wilcoxon

from .. import kspace
from .methods import REFERENCE

TEST_METRICS = ("ssim", "psnr", "nrmse", "gradient_ratio")
CALIBRATION_BINS = 10
MapId = tuple[str, int, str]  # (patient, slice, metabolite)


def kspace_consistency_error(output: np.ndarray, lr: np.ndarray, norm: float) -> float:
    """‖K_m(output) − K_m(zf(LR)/norm)‖₂ / ‖K_m(zf(LR)/norm)‖₂, K_m = centred m1×m2 block of the model-grid k-space.

    lr is the measured m1×m2 LR map (physical units), norm the map's model-space scale, output in model space
    on the grid the LR map was zero-filled onto (n1×n2, n_a ≥ m_a).
    """
    output, lr = np.asarray(output, dtype=np.float64), np.asarray(lr)
    if output.ndim != 2 or lr.ndim != 2 or any(m > n for m, n in zip(lr.shape, output.shape)):
        raise ValueError(f"expected a 2D output and a 2D LR map no larger than it per axis, got {output.shape} "
                         f"and {lr.shape}")
    m = lr.shape
    measured = kspace.truncate_kspace(kspace.fft2c(kspace.zero_fill(lr, output.shape)), m) / float(norm)
    estimate = kspace.truncate_kspace(kspace.fft2c(output), m)
    denom = np.linalg.norm(measured)
    return float(np.linalg.norm(estimate - measured) / denom) if denom > 0 else float("nan")


def gradient_ratio(gt: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Sharpness: mean |∇out| / mean |∇gt| inside the mask (1 = as sharp as the ground truth)."""
    m = np.asarray(mask, dtype=bool)
    g_out = np.hypot(*np.gradient(np.asarray(out, dtype=np.float64)))[m].mean()
    g_gt = np.hypot(*np.gradient(np.asarray(gt, dtype=np.float64)))[m].mean()
    return float(g_out / g_gt) if g_gt > 0 else float("nan")


def high_frequency_ratio(gt: np.ndarray, out: np.ndarray, lr_size: int | tuple[int, int]) -> float:
    """Sharpness: k-space energy outside the measured central m×m (or m1×m2) block, output / ground truth."""
    def outside(img):
        k = kspace.fft2c(np.asarray(img, dtype=np.float64))
        return float(np.sum(np.abs(k) ** 2) - np.sum(np.abs(kspace.truncate_kspace(k, lr_size)) ** 2))

    e_gt = outside(gt)
    return outside(out) / e_gt if e_gt > 0 else float("nan")


def finite_stats(values) -> tuple[float, float, int]:
    """(mean, std, n) over the finite values (numpy's population std; NaN when none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std()), int(v.size)


def aggregate(rows: Sequence[dict], group_by: Sequence[str], names: Sequence[str]) -> list[dict]:
    """Mean ± std (and n) of each metric per group, groups in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group_by), []).append(r)
    out = []
    for key, members in groups.items():
        agg = dict(zip(group_by, key))
        agg["n"] = len(members)
        for name in names:
            agg[f"{name}_mean"], agg[f"{name}_std"], _ = finite_stats([m.get(name) for m in members])
        out.append(agg)
    return out


def paired_wilcoxon(reference: dict[MapId, float], other: dict[MapId, float]) -> dict[str, float]:
    """Wilcoxon signed-rank test of paired per-map values (paired by map id; non-finite pairs dropped)."""
    ids = [i for i in reference if i in other and np.isfinite(reference[i]) and np.isfinite(other[i])]
    a = np.array([reference[i] for i in ids], dtype=np.float64)
    b = np.array([other[i] for i in ids], dtype=np.float64)
    res = {"n": len(ids), "median_difference": float(np.median(a - b)) if ids else float("nan"),
           "statistic": float("nan"), "p_value": float("nan")}
    if not ids:
        return res
    if np.all(a == b):
        res.update(statistic=0.0, p_value=1.0)  # identical outputs: no evidence of a difference
        return res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test = wilcoxon(a, b)
    res.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return res


def wilcoxon_table(rows: Sequence[dict], reference: str = REFERENCE, names: Sequence[str] = TEST_METRICS) -> list[dict]:
    """Reference method vs every other method, per scale and metric (rows: per-map dicts with 'method', 'scale')."""
    by: dict[tuple[str, float], dict[MapId, dict]] = {}
    for r in rows:
        by.setdefault((r["method"], r["scale"]), {})[(r["patient"], int(r["slice"]), r["metabolite"])] = r
    out = []
    for (method, scale), maps in by.items():
        ref = by.get((reference, scale))
        if method == reference or ref is None:
            continue
        for name in names:
            test = paired_wilcoxon({i: r[name] for i, r in ref.items()}, {i: r[name] for i, r in maps.items()})
            out.append({"scale": scale, "metric": name, "reference": reference, "method": method, **test})
    return out


def calibration(errors: np.ndarray, stds: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Per-voxel std vs |error|: Pearson/Spearman r and a reliability table (quantile bins of std → RMSE)."""
    e, s = np.asarray(errors, dtype=np.float64).ravel(), np.asarray(stds, dtype=np.float64).ravel()
    res: dict[str, Any] = {"n": int(e.size), "pearson": float("nan"), "spearman": float("nan"),
                           "rmse": float(np.sqrt(np.mean(e ** 2))) if e.size else float("nan"),
                           "mean_std": float(s.mean()) if s.size else float("nan"), "bins": []}
    if e.size < 3:
        return res
    if np.ptp(s) > 0 and np.ptp(e) > 0:
        res["pearson"] = float(pearsonr(s, e)[0])
        res["spearman"] = float(spearmanr(s, e)[0])
    edges = np.unique(np.quantile(s, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, max(len(edges) - 2, 0))
    for b in np.unique(which):
        sel = which == b
        res["bins"].append({"bin": int(b), "count": int(sel.sum()), "std_mean": float(s[sel].mean()),
                            "rmse": float(np.sqrt(np.mean(e[sel] ** 2)))})
    return res
