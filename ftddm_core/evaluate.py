"""`ftddm evaluate`: methods compared on a fold's test patients (paper Tables 1–2, Figs. 5–7, reference §6).

Plan → run every (method, scale) once, cached under REPORT_DIR/cache → per-map metrics → tables, CSVs, figures
and report.md. Everything is compared in model space: the ground truth is x0 = HR·M / scale with the scale
derived from the LR input (data.make_example), outputs are masked by M, so metrics on the whole 64×64 map are
the published ones (PSNR/SSIM use the ground truth's range, hence are invariant to the per-map scale). Maps on
any other grid (in-vivo-like data) are evaluated on the T×T tiles around the mask centre that the training
derivation cuts after deriving the LR map on the full slice; the baselines are cut from the same full slice.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, baselines, kspace, metrics
from .sampling import CountingDenoiser, RunningMoments, SampleResult, chain_nfe, ftddm_x0_hook, randn_like, \
    noise_start_index, sample_chain

Progress = Callable[[int, int, str], None]

CACHE_VERSION = 1
REFERENCE = "ftddm_dpmpp_10"  # the shipped default sampler: DPM-Solver++ K = 10 from the flow (NFE 11)
HEADLINE_DDPM = "ddpm_full"
SSIM_MARGIN, NFE_FACTOR = 0.01, 10.0  # headline: within 0.01 SSIM of full-chain DDPM at ≥ 10× fewer NFE
STUDIES = ("tau_d", "scale_mismatch", "t_trunc", "calibration")
TAU_D_VALUES = (0.0, 0.3, 0.6, 0.9, 1.0)  # Fig. 7
T_TRUNC_VALUES = (0, 10, 20, 50, 100)  # Fig. 5 (0 = flow only)
METRICS = ("nrmse", "psnr", "ssim", "nrmse_mask", "psnr_mask", "ssim_mask", "kspace_error")
TEST_METRICS = ("ssim", "psnr", "nrmse")
CALIBRATION_BINS = 10
MODEL_ROLES = {"main": "--model", "ddpm": "--ddpm-model", "regression": "--regression-model"}


# ============================================================================================ specs
@dataclass(frozen=True)
class RunSpec:
    """One way of producing outputs: a compared method or a study point (name/label do not affect outputs)."""

    name: str
    label: str
    kind: str  # zero_filled | bicubic | regression | flow | chain
    model: str = "none"  # none | main | ddpm | regression
    sampler: str = ""  # chains: ancestral | ddpm | dpmpp
    start: str = ""  # chains: flow | renoised | noise
    t_start: int = 0  # first chain index
    steps: int = 0  # solver steps (ddpm, dpmpp)
    tau_d: float = 1.0
    cond_scale: float | None = None  # condition the network on s' instead of the actual s (Fig. 6)

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name"), d.pop("label")
        return d

    @property
    def stochastic(self) -> bool:
        return self.kind == "chain"


def method_specs(tau_d: float = 0.9) -> dict[str, RunSpec]:
    """The compared methods of the issue (paper Table 1 + ablations); FTDDM chains use τ_d, DDPM τ_d = 1."""
    specs = [
        RunSpec("zero_filled", "Zero-filling", "zero_filled"),
        RunSpec("bicubic", "Bicubic", "bicubic"),
        RunSpec("regression", "UNet regression (one pass; the FTDDM model's SR encoder unless "
                "--regression-model)", "regression", "regression"),
        RunSpec("flow_only", "Flow start ÷ √ᾱ (mode at Ttrunc, not a Ttrunc = 0 flow)", "flow", "main"),
        RunSpec(HEADLINE_DDPM, "DDPM full chain", "chain", "ddpm", "ancestral", "noise", tau_d=1.0),
        RunSpec("ddpm_respaced_100", "DDPM respaced to 100", "chain", "ddpm", "ddpm", "noise", steps=100, tau_d=1.0),
    ]
    specs += [RunSpec(f"dpmpp_noise_{k}", f"DPM-Solver++ from noise, K = {k}", "chain", "ddpm", "dpmpp", "noise",
                      steps=k) for k in (100, 20, 10)]
    specs += [RunSpec(f"ftddm_anc_{t}", f"FTDDM Ttrunc = {t} (ancestral)", "chain", "main", "ancestral", "flow",
                      t_start=t, tau_d=tau_d) for t in (100, 50, 20)]
    specs += [RunSpec(f"ftddm_dpmpp_{k}", f"FTDDM + DPM-Solver++ K = {k}", "chain", "main", "dpmpp", "flow",
                      t_start=-1, steps=k) for k in (50, 20, 10)]  # t_start −1: the model's Ttrunc
    return {s.name: s for s in specs}


METHOD_NAMES = tuple(method_specs())


@dataclass
class EvaluateOptions:
    """What `ftddm evaluate` computes (CLI flags map one to one)."""

    fold: int = 0
    scales: tuple[float, ...] = (8.0, 4.0, 2.0)
    methods: tuple[str, ...] = METHOD_NAMES
    studies: tuple[str, ...] = STUDIES
    max_slices: int | None = None  # maps per scale (evenly spread over the test maps); None = all
    samples: int = 4  # samples per map for stochastic methods (mean = output, std = uncertainty)
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    max_batch: int = 64
    tau_d: float = 0.9
    tau_f: float = 0.7
    split_seed: int | None = None  # patient split seed; None = the one recorded in the model, else 0

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHOD_NAMES)}")
        unknown = [s for s in self.studies if s not in STUDIES]
        if unknown:
            raise ValueError(f"unknown stud(y/ies) {unknown}; expected 'all', 'none' or some of {', '.join(STUDIES)}")
        if not self.scales:
            raise ValueError("expected at least one upscaling factor in scales")
        for name in ("samples", "max_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_slices is not None and int(self.max_slices) < 1:
            raise ValueError(f"max_slices must be ≥ 1, got {self.max_slices}")
        if self.tau_d < 0 or self.tau_f < 0:
            raise ValueError("tau_d and tau_f must be ≥ 0")


def parse_scales(text: str) -> tuple[float, ...]:
    """'8,4,2' → (8.0, 4.0, 2.0)."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"--scales expects comma-separated numbers such as 8,4,2, got {text!r}") from exc
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"--scales expects positive numbers such as 8,4,2, got {text!r}")
    return values


def parse_names(text: str | None, choices: Sequence[str], what: str) -> tuple[str, ...]:
    """'all' (or None) → every choice, 'none' → (), else a comma-separated subset checked against choices."""
    if text is None or str(text).strip().lower() == "all":
        return tuple(choices)
    if str(text).strip().lower() == "none":
        return ()
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected 'all', 'none' or some of {', '.join(choices)}")
    return names


def lr_size_for(scale: float, size: int = 64) -> int:
    """LR matrix m = size / s, which must be a whole number (s = 8, 4, 2, 6.4 … for a 64 grid)."""
    m = size / float(scale)
    if abs(m - round(m)) > 1e-6 or not 1 <= round(m) <= size:
        raise ValueError(f"upscaling factor {scale:g} gives an LR matrix of {m:.4g}; expected {size}/s to be a "
                         f"whole number between 1 and {size} (e.g. 8, 4, 2, 6.4)")
    return int(round(m))


# ============================================================================================ metrics
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


def map_metrics(data: ScaleData, i: int, out: np.ndarray) -> dict[str, float]:
    """Published metrics on the whole map (tile), their in-mask variants and the k-space consistency error."""
    row = {k: float("nan") for k in METRICS}
    row.update(metrics.all_metrics(data.gt[i], out, data.mask[i]))
    row["kspace_error"] = data.kspace_error(i, out)
    return row


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


MapId = tuple[str, int, str]  # (patient, slice, metabolite)


def paired_wilcoxon(reference: dict[MapId, float], other: dict[MapId, float]) -> dict[str, float]:
    """Wilcoxon signed-rank test of paired per-map values (paired by map id; non-finite pairs dropped)."""
    from scipy.stats import wilcoxon

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
    from scipy.stats import pearsonr, spearmanr

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


# ============================================================================================ data
@dataclass
class ScaleData:
    """The evaluated maps at one upscaling factor, in model space (ground truth, condition, LR measurement).

    Legacy 64×64 data: each map is a whole slice. Any other grid: each map is the T×T tile (data.tile_example
    without rng: around the mask centre) of a full n1×n2 slice whose LR map was derived on the whole slice;
    tile pixel (0, 0) is slice pixel ``tile_origins[i]`` (negative where the slice is smaller and zero-padded).
    """

    scale: float
    lr_size: int | None  # legacy: the LR matrix m (m×m → 64×64); tiles: None (see lr_shapes)
    ids: list[MapId]
    gt: np.ndarray  # (N, T, T) HR·M / norm
    mask: np.ndarray  # (N, T, T) bool
    lr: np.ndarray | list[np.ndarray]  # (N, m, m) or per map (m1, m2): measured LR maps of the slice, physical units
    norm: np.ndarray  # (N,)
    cond: torch.Tensor  # (N, 4, T, T)
    cond_scale: np.ndarray  # (N,) the factor the networks are conditioned on (tiles: the one actually applied)
    slice_shapes: list[tuple[int, int]]  # (n1, n2) of each map's full slice
    tile_origins: list[tuple[int, int]]  # slice pixel of tile pixel (0, 0)
    mask_in_tile: np.ndarray  # (N,) bool: the slice's whole mask lies inside the tile
    tiled: bool = False

    @property
    def lr_shapes(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in np.shape(x)) for x in self.lr]

    @property
    def lr_text(self) -> str:
        """'LR 16×16 → 64×64' (legacy) or the range of per-slice LR matrices and the tile size."""
        tile = self.gt.shape[-1]
        if not self.tiled:
            return f"LR {self.lr_size}×{self.lr_size} → {tile}×{tile}"
        shapes = sorted(self.lr_shapes, key=lambda m: m[0] * m[1])
        span = f"{shapes[0][0]}×{shapes[0][1]}" + (f" … {shapes[-1][0]}×{shapes[-1][1]}" if len(set(shapes)) > 1
                                                     else "")
        return f"LR {span} per slice, {tile}×{tile} tiles"

    def on_slice(self, i: int, image: np.ndarray) -> np.ndarray | None:
        """A map-i tile image placed on its full slice (zeros elsewhere); None when the slice's mask reaches
        outside the tile (the masked output is then unknown there)."""
        if not self.mask_in_tile[i]:
            return None
        return place_tile(np.asarray(image), self.tile_origins[i], self.slice_shapes[i])

    def kspace_error(self, i: int, image: np.ndarray) -> float:
        """kspace_consistency_error of a masked map-i output on its slice's grid (NaN: mask outside the tile)."""
        full = self.on_slice(i, image)
        return float("nan") if full is None else kspace_consistency_error(full, self.lr[i], self.norm[i])

    def high_frequency_ratio(self, i: int, image: np.ndarray) -> float:
        """high_frequency_ratio of a map-i output against its ground truth outside the measured block."""
        if not self.tiled:
            return high_frequency_ratio(self.gt[i], image, self.lr_size)
        out, gt = self.on_slice(i, image), self.on_slice(i, self.gt[i])
        return float("nan") if out is None else high_frequency_ratio(gt, out, self.lr_shapes[i])


def _overlap(origin: Sequence[int], tile: int, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slice-grid slices, tile-grid slices) where a tile×tile window at `origin` overlaps an n1×n2 slice."""
    on_slice, on_tile = [], []
    for o, n in zip(origin, shape):
        lo, hi = max(int(o), 0), min(int(o) + tile, int(n))
        on_slice.append(slice(lo, max(hi, lo)))
        on_tile.append(slice(lo - int(o), max(hi, lo) - int(o)))
    return tuple(on_slice), tuple(on_tile)


def cut_tile(image: np.ndarray, origin: Sequence[int], tile: int) -> np.ndarray:
    """The tile×tile window of a full-slice image (…, n1, n2) whose pixel (0, 0) is slice pixel `origin`."""
    image = np.asarray(image)
    on_slice, on_tile = _overlap(origin, tile, image.shape[-2:])
    out = np.zeros(image.shape[:-2] + (tile, tile), dtype=image.dtype)
    out[(..., *on_tile)] = image[(..., *on_slice)]
    return out


def place_tile(image: np.ndarray, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The inverse of cut_tile: a tile (…, T, T) on a zero n1×n2 slice grid."""
    image = np.asarray(image)
    on_slice, on_tile = _overlap(origin, image.shape[-1], shape)
    out = np.zeros(image.shape[:-2] + tuple(int(n) for n in shape), dtype=image.dtype)
    out[(..., *on_slice)] = image[(..., *on_tile)]
    return out


def select_subset(n: int, max_maps: int | None) -> np.ndarray:
    """Indices of at most max_maps maps spread evenly over n (all when None)."""
    if max_maps is None or max_maps >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, int(max_maps)).round().astype(int))


def test_split(data_dir: Path, fold: int, split_seed: int) -> tuple[list[str], list[str]]:
    """(all patients, test patients) of `fold` with the split training uses (data.training_sources)."""
    from .data import list_patients, patient_folds

    ids = list_patients(data_dir)
    if len(ids) < 3:
        raise ValueError(f"{data_dir}: {len(ids)} patient folder(s); expected at least 3 (train/validation/test)")
    _, _, test = patient_folds(ids, k=min(5, len(ids)), fold=fold, seed=split_seed)
    return ids, test


def load_test_maps(data_dir: Path, test_ids: Sequence[str], scales: Sequence[float], max_maps: int | None,
                   image_size: int = 64) -> dict[float, ScaleData]:
    """Per scale: the test maps (SliceDataset, no augmentation), GT ⊙ M and the LR measurement.

    Legacy data (every map image_size²) keeps the fixed LR size m = image_size / s per scale; any other grid
    gives the image_size² tiles around the mask centre of examples derived on the full slice with factor s.
    """
    from .data import SliceDataset, is_legacy_grid, load_dataset

    patients = load_dataset(data_dir, test_ids)
    by_id = {p.patient_id: p for p in patients}
    ds = SliceDataset(patients, augment=False, image_size=image_size)
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: no slice of the test patients {list(test_ids)} has enough mask voxels; "
                         "expected maps with a quality/brain mask")
    pick = select_subset(len(ds), max_maps)
    legacy = is_legacy_grid(patients, image_size)
    if legacy:
        for s in scales:
            lr_size_for(s, image_size)
    load = _legacy_scale_data if legacy else _tiled_scale_data
    return {float(s): load(ds, pick, by_id, float(s), image_size) for s in scales}


def _legacy_scale_data(ds, pick, by_id, s: float, image_size: int) -> ScaleData:
    """The paper's 64×64 maps: whole slices, LR m×m with m = image_size / s."""
    m = lr_size_for(s, image_size)
    ds.set_lr_size(m)
    items = [ds[int(i)] for i in pick]
    hr = np.stack([by_id[it["patient"]].maps[it["metabolite"]][:, :, it["slice"]] for it in items])
    gt = np.stack([it["x0"][0].numpy() for it in items])
    mask = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
    norm = np.array([it["norm"] for it in items], dtype=np.float64)
    if not np.allclose(gt, hr * mask / norm[:, None, None], rtol=1e-4, atol=1e-5):
        raise AssertionError("dataset ground truth is not HR·M / norm; the evaluation's LR derivation is stale")
    n = len(items)
    return ScaleData(scale=s, lr_size=m, ids=[(it["patient"], it["slice"], it["metabolite"]) for it in items],
                     gt=gt, mask=mask, lr=np.abs(kspace.downsample(hr.astype(np.float64), m)), norm=norm,
                     cond=torch.stack([it["cond"] for it in items]), cond_scale=np.full(n, s),
                     slice_shapes=[hr.shape[-2:]] * n, tile_origins=[(0, 0)] * n, mask_in_tile=np.ones(n, bool))


def _tiled_scale_data(ds, pick, by_id, s: float, image_size: int) -> ScaleData:
    """Maps on any grid: LR of the full slice with factor s (m_a = round(n_a / s)), cut to the training tile."""
    items = [ds[(int(i), s)] for i in pick]
    gt, mask, lr, shapes, origins, inside = [], [], [], [], [], []
    for it in items:
        patient = by_id[it["patient"]]
        z, norm = it["slice"], float(it["norm"])
        hr = patient.maps[it["metabolite"]][:, :, z].astype(np.float64)
        full_mask = (patient.quality_mask & patient.brain_mask)[:, :, z]
        origin = tuple(int(v) for v in it["tile_origin"])
        measured = np.abs(kspace.downsample(hr, tuple(it["lr_shape"])))
        tile_mask = it["mask"][0].numpy() > 0.5
        tile_gt = it["x0"][0].numpy()
        # the dataset's tile must be the full slice's HR·M / norm and |zf(LR)| / norm cut at its origin
        if not (np.array_equal(tile_mask, cut_tile(full_mask, origin, image_size))
                and np.allclose(tile_gt, cut_tile(hr * full_mask / norm, origin, image_size), rtol=1e-4, atol=1e-5)):
            raise AssertionError("dataset ground truth is not HR·M / norm of the full slice cut at the tile origin; "
                                 "the evaluation's tiling is stale")
        lr_channel = cut_tile(baselines.zero_filled(measured, hr.shape) / norm, origin, image_size)
        signal = bool(it["cond"][0].any())  # a map without signal in M has no scale: its LR channel is left at 0
        if signal and not np.allclose(it["cond"][0].numpy(), lr_channel, rtol=1e-4, atol=1e-5):
            raise AssertionError("dataset LR channel is not |zero-fill(LR)| / norm of the full slice; the "
                                 "evaluation's LR derivation is stale")
        gt.append(tile_gt)
        mask.append(tile_mask)
        lr.append(measured)
        shapes.append(hr.shape)
        origins.append(origin)
        inside.append(int(tile_mask.sum()) == int(full_mask.sum()))
    return ScaleData(scale=s, lr_size=None, ids=[(it["patient"], it["slice"], it["metabolite"]) for it in items],
                     gt=np.stack(gt), mask=np.stack(mask), lr=lr,
                     norm=np.array([it["norm"] for it in items], dtype=np.float64),
                     cond=torch.stack([it["cond"] for it in items]),
                     cond_scale=np.array([it["scale"] for it in items], dtype=np.float64), slice_shapes=shapes,
                     tile_origins=origins, mask_in_tile=np.array(inside, dtype=bool), tiled=True)


def dataset_fingerprint(data_dir: Path, patient_ids: Sequence[str]) -> str:
    """SHA-256 over dataset.json and the (name, size, mtime) of every file of the given patients."""
    h = hashlib.sha256()
    meta = data_dir / "dataset.json"
    if meta.is_file():
        h.update(meta.read_bytes())
    for pid in patient_ids:
        for f in sorted((data_dir / pid).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(data_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ============================================================================================ models
@dataclass
class LoadedModel:
    role: str
    path: Path
    sha256: str
    model: Any
    training: dict  # the model file's recorded training metadata (data split …), {} if none

    @property
    def t_trunc(self) -> int:
        return int(self.model.config.diffusion.t_trunc)

    @property
    def last_index(self) -> int:
        return int(self.model.config.diffusion.num_timesteps) - 1

    def parameters(self, part: str) -> int:
        """Parameters of one network ("encoder", "unet", "flow"); 0 for one the model lacks (a regression model)."""
        from .unet import count_parameters

        network = getattr(self.model, part)
        return 0 if network is None else count_parameters(network)


def _training_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    try:
        if "training" in meta:  # a file written by `ftddm train`
            return json.loads(meta["training"]) or {}
        # a packaged model (scripts/package_default_model.py) keeps it in its model card
        training = dict(json.loads(meta.get("model_card", "{}")).get("training") or {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    if "iterations" in training:
        training.setdefault("step", training["iterations"])
    return training


def load_models(model_path, ddpm_path, regression_path, device) -> dict[str, LoadedModel]:
    """Load the FTDDM model and, when given, the full-range DDPM and regression models; check their kinds."""
    from .model import DEFAULT_MODEL, FTDDM, file_sha256

    paths = {"main": Path(model_path) if model_path else DEFAULT_MODEL, "ddpm": ddpm_path,
             "regression": regression_path}
    loaded = {}
    for role, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        if not path.is_file():
            hint = " (the shipped default model is not installed; pass --model PATH)" if path == DEFAULT_MODEL else ""
            raise FileNotFoundError(f"{MODEL_ROLES[role]} {path}: model file not found{hint}")
        model = FTDDM.load(path, device=device)
        want = "regression" if role == "regression" else "ftddm"
        if model.config.kind != want:
            raise ValueError(f"{MODEL_ROLES[role]} {path}: a '{model.config.kind}' model; expected kind '{want}'"
                             + (" (pass a regression model as --regression-model)" if role == "main" else ""))
        loaded[role] = LoadedModel(role, path, file_sha256(path), model, _training_metadata(path))
    return loaded


def resolve_spec(spec: RunSpec, models: dict[str, LoadedModel]) -> tuple[RunSpec, str | None]:
    """Fill model-dependent fields (start index, re-noised start) or return why the method cannot run."""
    if spec.model == "none":
        return spec, None
    if spec.model == "regression" and "regression" not in models and "main" in models:
        spec = replace(spec, model="main")  # FTDDM v2: its SR encoder is the one-pass regression, same training
    lm = models.get(spec.model)
    if lm is None:
        why = {"ddpm": "needs a UNet trained on the full chain: no --ddpm-model given (train one with "
                       "`ftddm train --t-trunc 999`)",
               "regression": "no --regression-model given (train one with `ftddm train --config regression`)"}
        return spec, why.get(spec.model, f"no {spec.model} model")
    if spec.kind != "chain":
        return spec, None
    if spec.start == "noise":
        if lm.t_trunc != lm.last_index:
            return spec, (f"starts from pure noise at index {lm.last_index}, but {lm.path.name}'s UNet was trained on "
                          f"t ∈ [0, {lm.t_trunc}] only; pass a model trained with `ftddm train --t-trunc "
                          f"{lm.last_index}` as --ddpm-model")
        spec = replace(spec, t_start=noise_start_index(lm.model.schedule, spec.sampler))  # DPM-Solver++: λ clip
        if spec.sampler == "ancestral":
            spec = replace(spec, label=f"{spec.label} (T = {lm.last_index + 1})")
    else:
        t = lm.t_trunc if spec.t_start < 0 else spec.t_start
        if t > lm.t_trunc:
            return spec, (f"starts at index {t}, above the flow's index Ttrunc = {lm.t_trunc} of {lm.path.name} "
                          "(needs a flow trained at that index)")
        spec = replace(spec, t_start=t)
        if t < lm.t_trunc:
            spec = replace(spec, start="renoised", label=f"{spec.label}, re-noised flow start")
    if spec.sampler != "ancestral" and not 1 <= spec.steps <= spec.t_start:
        return spec, f"{spec.steps} solver steps do not fit a chain starting at index {spec.t_start}"
    return spec, None


def nfe_of(spec: RunSpec) -> tuple[int, int]:
    """(UNet evaluations, flow passes) per sample chain."""
    if spec.kind == "chain":
        return chain_nfe(spec.sampler, spec.t_start, spec.steps), int(spec.start != "noise")
    return {"regression": (1, 0), "flow": (0, 1)}.get(spec.kind, (0, 0))


def parameters_of(spec: RunSpec, models: dict[str, LoadedModel]) -> int:
    """Parameters of the networks a method uses (UNet and/or flow; 0 for baselines)."""
    lm = models.get(spec.model)
    if lm is None:
        return 0
    if spec.kind == "regression":
        return lm.parameters("encoder")
    if spec.kind == "flow":
        return lm.parameters("encoder") + lm.parameters("flow")
    if spec.kind == "chain" and spec.start != "noise":
        return lm.parameters("encoder") + lm.parameters("unet") + lm.parameters("flow")
    return lm.parameters("encoder") + lm.parameters("unet")


# ============================================================================================ sampling
@torch.no_grad()
def flow_estimate(model, cond: torch.Tensor, scale, max_batch: int | None = None) -> torch.Tensor:
    """The flow start as an estimate: x̂0 = mode of p(x_Ttrunc | y) / √ᾱ_Ttrunc, clamped and masked.

    Not the paper's Ttrunc = 0 ablation (a flow trained on x0): it shows what the chain's start carries.
    """
    device = getattr(model, "device", cond.device)
    lo, hi = model.config.x0_clip
    step = max_batch or len(cond)
    outs = []
    for i in range(0, len(cond), step):
        c = cond[i:i + step].to(device)
        s = torch.as_tensor(scale, dtype=c.dtype, device=device)
        s = s.expand(len(cond)) if s.ndim == 0 else s
        x0_enc, features = model.encode(c, s[i:i + step])
        x = model.flow_sample(c, x0_enc, features, 0.0).float()  # the flow's mode at Ttrunc (deterministic)
        outs.append(((x / model.flow_shift_factor).clamp(lo, hi) * c[:, 1:2]).to(cond.device))
    return torch.cat(outs)


@torch.no_grad()
def sample_renoised(model, cond: torch.Tensor, scale, t_start: int, *, sampler: str = "ancestral", steps: int = 10,
                    tau_d: float = 0.9, n_samples: int = 1, generator: torch.Generator | None = None,
                    max_batch: int | None = None, callback=None) -> SampleResult:
    """FTDDM started below the flow's index: x_t' = q_sample(x̂0_flow, t', ε⊙M), x̂0_flow = flow mode / √ᾱ_Ttrunc.

    An approximation for t' < Ttrunc (the paper trains one flow per Ttrunc): the flow's mode at Ttrunc, scaled to
    x0 and clamped/masked, is re-noised with the forward process to t' and the reverse chain runs from there.
    Every chain (sample k, image b) draws its noise from its own generator seeded from ``generator``.
    """
    started = time.perf_counter()
    t_trunc = int(model.config.diffusion.t_trunc)
    if not isinstance(t_start, (int, np.integer)) or not 1 <= t_start <= t_trunc:
        raise ValueError(f"a re-noised start needs an integer index in [1, {t_trunc}] (the flow's), got {t_start!r}")
    device = getattr(model, "device", cond.device)
    cond = cond.to(device)
    B, _, H, W = cond.shape
    scale = torch.as_tensor(scale, dtype=cond.dtype, device=device)
    scale = scale.expand(B) if scale.ndim == 0 else scale
    mask = cond[:, 1:2]
    clip = model.config.x0_clip
    x0_flow = flow_estimate(model, cond, scale, max_batch).to(device=device, dtype=cond.dtype)
    x0_enc = torch.cat([model.encode(cond[i:i + (max_batch or B)], scale[i:i + (max_batch or B)])[0]
                        for i in range(0, B, max_batch or B)]).to(cond.dtype)
    seeds = torch.randint(0, 2**62, (n_samples, B), generator=generator)
    chains = [(k, b) for k in range(n_samples) for b in range(B)]
    step = max_batch or B
    moments = RunningMoments((B, 1, H, W), device=device)
    nfe, calls = chain_nfe(sampler, t_start, steps), 0
    for c0 in range(0, len(chains), step):
        chunk = chains[c0:c0 + step]
        rows = torch.tensor([b for _, b in chunk], device=device)
        ks = torch.tensor([k for k, _ in chunk])
        gens = [torch.Generator(device).manual_seed(int(seeds[k, b])) for k, b in chunk]
        m = mask[rows]
        eps = randn_like(x0_flow[rows], gens) * m
        x = model.schedule.q_sample(x0_flow[rows], torch.full((len(chunk),), t_start, dtype=torch.long), eps)
        c, s = cond[rows], scale[rows]
        denoiser = CountingDenoiser(model.denoiser(c, x0_enc[rows], s), model.schedule, mask=m,
                                    x0_hook=ftddm_x0_hook(clip, m))
        x0 = sample_chain(denoiser, x, model.schedule, sampler=sampler, t_start=t_start, steps=steps, tau_d=tau_d,
                          mask=m, generator=gens, callback=callback)
        x0 = x0.clamp(float(clip[0]), float(clip[1])) * m
        calls += denoiser.nfe
        for k in ks.unique().tolist():
            sel = (ks == k).nonzero().flatten().to(device)
            moments.add(x0[sel], rows[sel])
    return SampleResult(mean=moments.mean.to(cond.dtype), std=moments.std().to(cond.dtype), nfe=nfe,
                        total_calls=calls, seconds=time.perf_counter() - started)


def baseline_maps(fn, data: ScaleData) -> np.ndarray:
    """A baseline (zero-filling, bicubic) of each map's measured LR onto its full slice, / norm, cut to its tile."""
    norm = data.norm[:, None, None].astype(np.float32)
    if not data.tiled:
        return fn(data.lr, data.gt.shape[-1]) / norm
    tile = data.gt.shape[-1]
    return np.stack([cut_tile(fn(lr, shape), origin, tile) for lr, shape, origin
                     in zip(data.lr, data.slice_shapes, data.tile_origins)]) / norm


def execute(spec: RunSpec, data: ScaleData, models: dict[str, LoadedModel], opts: EvaluateOptions,
            device: torch.device, callback=None) -> dict[str, Any]:
    """Run one resolved spec on one scale's maps: outputs (N, H, W) mean and std, cost counters, seconds."""
    from .device import autocast, generator as make_generator

    started = time.perf_counter()
    n = len(data.ids)
    mask = data.mask.astype(np.float32)
    std = np.zeros_like(data.gt)
    samples = 1
    if spec.kind in ("zero_filled", "bicubic"):
        fn = baselines.zero_filled if spec.kind == "zero_filled" else baselines.bicubic
        mean = baseline_maps(fn, data) * mask
    else:
        model = models[spec.model].model
        scale = (torch.full((n,), float(spec.cond_scale)) if spec.cond_scale else
                 torch.as_tensor(data.cond_scale, dtype=torch.float32))
        # tiles: the factor actually applied, √((n1/m1)(n2/m2)), may pass the trained range's ends by the
        # rounding of m_a, as in training (run_evaluation checked the requested factors)
        force = data.tiled
        with autocast(device, opts.bf16):
            if spec.kind == "flow":
                res = None
                mean = flow_estimate(model, data.cond, scale, opts.max_batch).float().numpy()[:, 0]
            elif spec.kind == "regression":
                res = model.sample(data.cond, scale, sampler="regression", max_batch=opts.max_batch,
                                   force_scale=force)
            elif spec.start == "renoised":
                res = sample_renoised(model, data.cond, scale, spec.t_start, sampler=spec.sampler,
                                      steps=max(spec.steps, 1), tau_d=spec.tau_d, n_samples=opts.samples,
                                      generator=torch.Generator().manual_seed(opts.seed), max_batch=opts.max_batch,
                                      callback=callback)
            else:
                res = model.sample(data.cond, scale, sampler=spec.sampler, start=spec.start, t_trunc=spec.t_start,
                                   steps=max(spec.steps, 1), tau_d=spec.tau_d, tau_f=opts.tau_f,
                                   n_samples=opts.samples, generator=make_generator(device, opts.seed),
                                   max_batch=opts.max_batch, callback=callback, force_scale=force)
        if res is not None:
            mean = res.mean.float().cpu().numpy()[:, 0]
            std = res.std.float().cpu().numpy()[:, 0]
            samples = opts.samples if spec.kind == "chain" else 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nfe, flow_passes = nfe_of(spec)
    return {"mean": np.asarray(mean, dtype=np.float32), "std": np.asarray(std, dtype=np.float32), "nfe": nfe,
            "flow_passes": flow_passes, "samples": samples, "seconds": time.perf_counter() - started,
            "device": str(device), "max_batch": opts.max_batch}


# ============================================================================================ cache
def cache_key(spec: RunSpec, data: ScaleData, models: dict[str, LoadedModel], opts: EvaluateOptions,
              context: dict, device: torch.device) -> str:
    """SHA-256 of everything that determines a run's outputs (never its name, label or batch size)."""
    key = {"version": CACHE_VERSION, "ftddm": __version__, "spec": spec.identity(), "scale": data.scale, "lr_size": data.lr_size,
           "maps": hashlib.sha256(json.dumps(data.ids).encode()).hexdigest(), **context}
    if data.tiled:  # the tiles: their size, origins and LR matrices
        key["tiles"] = hashlib.sha256(json.dumps([data.gt.shape[-1], data.tile_origins, data.lr_shapes]).encode()
                                      ).hexdigest()
    if spec.model != "none":
        key.update(model_sha256=models[spec.model].sha256, device=device.type, bf16=opts.bf16)
    if spec.stochastic:
        key.update(samples=opts.samples, seed=opts.seed)
        if spec.start == "flow":
            key["tau_f"] = opts.tau_f
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: Path, spec: RunSpec, scale: float, key: str) -> Path:
    return cache_dir / f"{spec.kind}_s{scale:g}_{key[:20]}.npz"


def read_cache(path: Path, key: str) -> dict | None:
    """A cached run, or None when absent, unreadable or made for another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("key") != key:
                return None
            return {**meta, "mean": f["mean"], "std": f["std"], "cached": True}
    except (OSError, ValueError, KeyError):
        return None


def write_cache(path: Path, key: str, result: dict) -> None:
    """Atomically write a run (outputs as float32 arrays, counters as a JSON string) to its npz file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in result.items() if k not in ("mean", "std", "cached")}
    meta["key"] = key
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, mean=result["mean"], std=result["std"], meta=np.array(json.dumps(meta)))
        from .atomic import default_file_mode  # mkstemp makes 0600; give the umask's mode like any new file

        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ============================================================================================ the plan
@dataclass
class Job:
    spec: RunSpec
    scale: float
    key: str = ""


def study_specs(opts: EvaluateOptions, models: dict[str, LoadedModel], methods: dict[str, RunSpec]) -> dict:
    """Study points as RunSpecs: τ_d sweep, conditioned s' grid, Ttrunc sweep; calibration uses the reference."""
    studies: dict[str, Any] = {}
    main = models.get("main")
    t_trunc = main.t_trunc if main else 100
    if "tau_d" in opts.studies:
        studies["tau_d"] = [RunSpec(f"tau_d_{v:g}", f"FTDDM ancestral, τ_d = {v:g}", "chain", "main", "ancestral",
                                    "flow", t_start=t_trunc, tau_d=v) for v in TAU_D_VALUES]
    if "scale_mismatch" in opts.studies:
        ref = methods[REFERENCE]
        studies["scale_mismatch"] = {
            (s, c): replace(ref, name=f"{REFERENCE}_s{s:g}_cond{c:g}", cond_scale=None if c == s else c,
                            label=ref.label if c == s else f"{ref.label}, conditioned s' = {c:g}")
                                     for s in opts.scales for c in opts.scales}
    if "t_trunc" in opts.studies:
        studies["t_trunc"] = [methods["flow_only"] if t == 0 else
                              RunSpec(f"t_trunc_{t}", f"FTDDM Ttrunc = {t} (ancestral)", "chain", "main", "ancestral",
                                      "flow", t_start=t, tau_d=opts.tau_d) for t in T_TRUNC_VALUES]
    if "calibration" in opts.studies:
        studies["calibration"] = methods[REFERENCE]
    return studies


def _all_specs(studies: dict) -> list[RunSpec]:
    out = []
    for value in studies.values():
        if isinstance(value, RunSpec):
            out.append(value)
        elif isinstance(value, dict):
            out += list(value.values())
        else:
            out += list(value)
    return out


# ============================================================================================ main entry
def run_evaluation(data_dir, model_path, out_dir, options: EvaluateOptions | None = None, *, ddpm_model=None,
                   regression_model=None, progress: Progress | None = None) -> dict[str, Any]:
    """`ftddm evaluate`: run (or load from cache) every method and study on the fold's test maps; write the report."""
    from .device import resolve_device

    opts = options or EvaluateOptions()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data {data_dir}: not a folder; expected a dataset folder (see docs/dataset_format.md)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder; expected a report folder")
    started = time.perf_counter()
    device = resolve_device(opts.device)
    models = load_models(model_path, ddpm_model, regression_model, device)
    main = models["main"]
    image_size = int(main.model.config.unet.image_size)
    for lm in models.values():
        try:
            lm.model.check_scale(torch.tensor(opts.scales))
        except ValueError as exc:
            raise ValueError(f"{MODEL_ROLES[lm.role]} {lm.path.name}: {exc}") from exc

    recorded = main.training.get("data", {}) if isinstance(main.training, dict) else {}
    split_seed = opts.split_seed if opts.split_seed is not None else int(recorded.get("split_seed", 0) or 0)
    all_ids, test_ids = test_split(data_dir, opts.fold, split_seed)
    data = load_test_maps(data_dir, test_ids, opts.scales, opts.max_slices, image_size)
    context = {"data": dataset_fingerprint(data_dir, test_ids), "fold": opts.fold, "split_seed": split_seed,
               "test": test_ids}

    # --- plan: resolve every method and study point, dedupe by cache key --------------------------
    methods = method_specs(opts.tau_d)
    resolved: dict[str, RunSpec] = {}
    skipped: dict[str, str] = {}
    for name in opts.methods:
        spec, why = resolve_spec(methods[name], models)
        if why:
            skipped[name] = why
        else:
            resolved[name] = spec
    studies = study_specs(opts, models, methods)
    study_resolved = {s.name: resolve_spec(s, models) for s in _all_specs(studies)}
    jobs: dict[str, Job] = {}
    job_of: dict[tuple[str, float], str] = {}  # (spec name, scale) → key

    def plan(spec: RunSpec, scale: float) -> None:
        key = cache_key(spec, data[scale], models, opts, context, device)
        jobs.setdefault(key, Job(spec, scale, key))
        job_of[(spec.name, scale)] = key

    for spec in resolved.values():
        for s in opts.scales:
            plan(spec, s)
    only_at = {spec.name: (s,) for (s, _), spec in studies.get("scale_mismatch", {}).items()}
    for name, (spec, why) in study_resolved.items():
        if why is None:
            for s in only_at.get(name, opts.scales):
                plan(spec, s)

    # --- run (or load) -------------------------------------------------------------------------------
    cache_dir = out_dir / "cache"
    results: dict[str, dict] = {}
    total = len(jobs)
    for done, job in enumerate(jobs.values()):
        path = cache_path(cache_dir, job.spec, job.scale, job.key)
        label = f"{job.spec.label} · s={job.scale:g}"
        if progress:
            progress(done, total, label)
        cached = read_cache(path, job.key)
        if cached is None:
            reporter = _step_reporter(progress, done, total, label)
            cached = execute(job.spec, data[job.scale], models, opts, device, reporter)
            write_cache(path, job.key, cached)
            cached = {**cached, "cached": False}
        results[job.key] = cached
    if progress:
        progress(total, total, "metrics and report")

    # --- analyse and report --------------------------------------------------------------------------
    lpips_fn, lpips_note = lpips_scorer(device)
    per_job_metrics: dict[str, list[dict]] = {}

    def job_metrics(key: str) -> list[dict]:
        if key not in per_job_metrics:
            job, res = jobs[key], results[key]
            d = data[job.scale]
            rows = []
            for i, mid in enumerate(d.ids):
                row = map_metrics(d, i, res["mean"][i])
                if lpips_fn is not None:
                    row["lpips"] = lpips_fn(d.gt[i], res["mean"][i])
                rows.append(row)
            per_job_metrics[key] = rows
        return per_job_metrics[key]

    ctx = ReportContext(opts=opts, data_dir=data_dir, out_dir=out_dir, models=models, data=data, test_ids=test_ids,
                        all_ids=all_ids, split_seed=split_seed, device=device, methods=resolved, skipped=skipped,
                        studies=studies, study_resolved=study_resolved, jobs=jobs, job_of=job_of, results=results,
                        job_metrics=job_metrics, lpips_note=lpips_note, has_lpips=lpips_fn is not None)
    summary = write_report(ctx)
    summary["seconds"] = time.perf_counter() - started  # this invocation only (short when cached)
    _atomic_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary


def _step_reporter(progress: Progress | None, done: int, total: int, label: str):
    """Sampler callback → progress lines at about every 10% of a chain (chunk and step shown)."""
    if progress is None:
        return None

    def report(info):
        every = max(1, int(info["total"]) // 10)
        if info["step"] % every == 0 or info["step"] == info["total"] - 1:
            chunk = f"chunk {info['chunk'] + 1}/{info['chunks']} " if "chunk" in info else ""
            progress(done, total, f"{label} · {chunk}step {info['step'] + 1}/{info['total']}")

    return report


def lpips_scorer(device: torch.device):
    """(score(gt, out) → float, note) when the `lpips` package and its AlexNet weights are present, else (None, why)."""
    try:
        import lpips  # optional dependency, never installed by ftddm
    except ImportError:
        return None, ("LPIPS skipped: the `lpips` package is not installed (it also needs the torchvision AlexNet "
                      "weights in the torch hub cache; nothing is downloaded by `ftddm evaluate`).")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return None, (f"LPIPS skipped: `lpips` is installed but the AlexNet backbone weights are not in {hub}; "
                      "nothing is downloaded by `ftddm evaluate`.")
    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def score(gt: np.ndarray, out: np.ndarray) -> float:
        lo, rng = float(gt.min()), float(gt.max() - gt.min()) or 1.0
        def to_rgb(a):  # [−1, 1] by the ground truth's range, grey → 3 channels
            x = torch.as_tensor((a - lo) / rng * 2 - 1, dtype=torch.float32, device=device)
            return x[None, None].repeat(1, 3, 1, 1)

        with torch.no_grad():
            return float(net(to_rgb(gt), to_rgb(out)).item())

    return score, "LPIPS (AlexNet, lpips package) on maps scaled to [−1, 1] by the ground truth's range, grey → RGB."


# ============================================================================================ report
@dataclass
class ReportContext:
    opts: EvaluateOptions
    data_dir: Path
    out_dir: Path
    models: dict[str, LoadedModel]
    data: dict[float, ScaleData]
    test_ids: list[str]
    all_ids: list[str]
    split_seed: int
    device: torch.device
    methods: dict[str, RunSpec]
    skipped: dict[str, str]
    studies: dict
    study_resolved: dict
    jobs: dict[str, Job]
    job_of: dict
    results: dict
    job_metrics: Callable[[str], list[dict]]
    lpips_note: str
    has_lpips: bool

    def result(self, name: str, scale: float) -> dict | None:
        key = self.job_of.get((name, scale))
        return None if key is None else self.results[key]

    def metric_rows(self, name: str, scale: float) -> list[dict] | None:
        key = self.job_of.get((name, scale))
        return None if key is None else self.job_metrics(key)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """CSV with the union of the rows' keys as columns (first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_csv(r.get(k, "")) for k in cols})
    os.replace(tmp, path)
    return path


def _fmt_csv(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pm(mean: float, std: float, digits: int) -> str:
    return "–" if not np.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(v: float, digits: int = 4) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


DIGITS = {"nrmse": 4, "psnr": 2, "ssim": 4, "nrmse_mask": 4, "psnr_mask": 2, "ssim_mask": 4, "kspace_error": 4,
          "lpips": 4}


def write_report(ctx: ReportContext) -> dict[str, Any]:
    """Write CSVs, figures and report.md; returns the summary (also written to summary.json)."""
    from . import figures

    out, opts = ctx.out_dir, ctx.opts
    fig_dir = out / "figures"
    names = METRICS + (("lpips",) if ctx.has_lpips else ())

    # --- per-map rows and method table ----------------------------------------------------------------
    per_map, method_rows = [], []
    for name, spec in ctx.methods.items():
        for s in opts.scales:
            res, rows = ctx.result(name, s), ctx.metric_rows(name, s)
            d = ctx.data[s]
            for mid, lr_shape, r in zip(d.ids, d.lr_shapes, rows):
                per_map.append({"method": name, "scale": s, "lr_size": max(lr_shape), "patient": mid[0], "slice": mid[1],
                                "metabolite": mid[2], **r})
            agg = aggregate([{"g": 0, **r} for r in rows], ["g"], names)[0]
            agg.pop("g")
            lm = ctx.models.get(spec.model)
            method_rows.append({"method": name, "label": spec.label, "scale": s,
                                "lr_size": d.lr_size if not d.tiled else _lr_range(d),
                                "model": "–" if lm is None else f"{MODEL_ROLES[lm.role]} {lm.path.name}",
                                "model_sha256": "" if lm is None else lm.sha256, "nfe": res["nfe"],
                                "flow_passes": res["flow_passes"], "samples": res["samples"],
                                "seconds_per_map": res["seconds"] / max(len(d.ids), 1),
                                "parameters": parameters_of(spec, ctx.models), "cached": res["cached"], **agg})
    gt_kspace = {s: finite_stats([d.kspace_error(i, d.gt[i]) for i in range(len(d.ids))])
                 for s, d in ctx.data.items()}
    write_csv(out / "per_map.csv", per_map)
    write_csv(out / "methods.csv", method_rows)
    order = {name: i for i, name in enumerate(ctx.methods)}
    tests = sorted(wilcoxon_table(per_map), key=lambda t: (-t["scale"], order.get(t["method"], 0)))
    write_csv(out / "wilcoxon.csv", tests)
    figs: dict[str, Path] = {}
    if method_rows:
        figs["quality_vs_nfe"] = figures.quality_vs_nfe(method_rows, fig_dir / "quality_vs_nfe.png")

    # --- studies ----------------------------------------------------------------------------------------
    study_out: dict[str, Any] = {}
    study_notes: dict[str, list[str]] = {}
    for study in opts.studies:
        rows, notes, fig = _run_study(ctx, study, fig_dir)
        study_out[study] = rows
        study_notes[study] = notes
        if rows and study != "calibration":
            write_csv(out / f"study_{study}.csv", rows)
        if fig is not None:
            figs[study] = fig
    if "calibration" in study_out and study_out["calibration"]:
        cal = study_out["calibration"]
        write_csv(out / "study_calibration.csv", [{k: v for k, v in r.items() if k != "bins"} for r in cal])
        write_csv(out / "study_calibration_bins.csv", [{"scale": r["scale"], **b} for r in cal for b in r["bins"]])

    # --- qualitative panels -----------------------------------------------------------------------------
    for s in opts.scales:
        cols = _panel_columns(ctx, s)
        if len(cols) > 1:
            figs[f"panels_s{s:g}"] = figures.panels(cols, fig_dir / f"panels_s{s:g}.png",
                                                    title=f"s = {s:g} ({_panel_lr_text(ctx.data[s])})")

    headline = headline_answer(method_rows, tests, ctx)
    text = _report_markdown(ctx, method_rows, gt_kspace, tests, study_out, study_notes, figs, headline)
    _atomic_text(out / "report.md", text)
    return {"report": str(out / "report.md"), "version": __version__, "headline": headline,
            "options": asdict(opts), "device": str(ctx.device), "test_patients": ctx.test_ids,
            "maps_per_scale": {f"{s:g}": len(d.ids) for s, d in ctx.data.items()},
            "models": {r: {"path": str(m.path), "sha256": m.sha256, "config": m.model.config.name,
                           "t_trunc": m.t_trunc, "num_timesteps": m.last_index + 1} for r, m in ctx.models.items()},
            "methods": method_rows, "skipped": ctx.skipped, "wilcoxon": tests,
            "studies": {k: v for k, v in study_out.items()}, "figures": {k: str(v) for k, v in figs.items()},
            "kspace_error_ground_truth": {f"{s:g}": v[0] for s, v in gt_kspace.items()},
            "lpips": ctx.lpips_note, "jobs": len(ctx.jobs),
            "jobs_from_cache": sum(bool(r.get("cached")) for r in ctx.results.values()),
            "compute_seconds": _compute_seconds(ctx)}  # recorded time of every run, cached ones included


def _lr_range(d: ScaleData) -> str:
    """'m' or 'min–max' of the per-slice LR sizes max(m1, m2) (methods.csv of tiled data)."""
    sizes = [max(m) for m in d.lr_shapes]
    return f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}–{max(sizes)}"


def _panel_lr_text(d: ScaleData) -> str:
    return f"LR {d.lr_size}² → 64²" if not d.tiled else d.lr_text


def _mean_metric(rows: list[dict], name: str) -> float:
    return finite_stats([r[name] for r in rows])[0]


def _run_study(ctx: ReportContext, study: str, fig_dir: Path):
    """(rows, notes, figure path or None) of one study."""
    from . import figures

    opts, notes, rows = ctx.opts, [], []
    items = ctx.studies.get(study)
    if study == "tau_d":
        for spec in items:
            rspec, why = ctx.study_resolved[spec.name]
            if why:
                notes.append(f"τ_d = {spec.tau_d:g} skipped: {why}")
                continue
            for s in opts.scales:
                d, res, mrows = ctx.data[s], ctx.result(spec.name, s), ctx.metric_rows(spec.name, s)
                grad = [gradient_ratio(d.gt[i], res["mean"][i], d.mask[i]) for i in range(len(d.ids))]
                hf = [d.high_frequency_ratio(i, res["mean"][i]) for i in range(len(d.ids))]
                rows.append({"scale": s, "tau_d": spec.tau_d, "nfe": res["nfe"], "samples": res["samples"],
                             "psnr": _mean_metric(mrows, "psnr"), "ssim": _mean_metric(mrows, "ssim"),
                             "nrmse": _mean_metric(mrows, "nrmse"), "gradient_ratio": finite_stats(grad)[0],
                             "high_frequency_ratio": finite_stats(hf)[0]})
        return rows, notes, figures.tau_d_plot(rows, fig_dir / "tau_d.png") if rows else None
    if study == "scale_mismatch":
        for (s, c), spec in items.items():
            rspec, why = ctx.study_resolved[spec.name]
            if why:
                notes.append(f"s' = {c:g} at s = {s:g} skipped: {why}")
                continue
            mrows = ctx.metric_rows(spec.name, s)
            rows.append({"actual_scale": s, "conditioned_scale": c, "psnr": _mean_metric(mrows, "psnr"),
                         "ssim": _mean_metric(mrows, "ssim"), "nrmse": _mean_metric(mrows, "nrmse")})
        return rows, notes, figures.scale_mismatch_plot(rows, fig_dir / "scale_mismatch.png") if rows else None
    if study == "t_trunc":
        for spec in items:
            rspec, why = ctx.study_resolved[spec.name]
            t = 0 if spec.kind == "flow" else spec.t_start
            if why:
                notes.append(f"Ttrunc = {t} skipped: {why}")
                continue
            for s in opts.scales:
                res, mrows = ctx.result(spec.name, s), ctx.metric_rows(spec.name, s)
                rows.append({"scale": s, "t_trunc": t, "start": rspec.start or "flow only", "nfe": res["nfe"],
                             "psnr": _mean_metric(mrows, "psnr"), "ssim": _mean_metric(mrows, "ssim"),
                             "nrmse": _mean_metric(mrows, "nrmse")})
        ddpm = {s: _mean_metric(ctx.metric_rows(HEADLINE_DDPM, s), "ssim") for s in opts.scales
                if (HEADLINE_DDPM, s) in ctx.job_of}
        return rows, notes, figures.t_trunc_plot(rows, ddpm, fig_dir / "t_trunc.png") if rows else None
    if study == "calibration":
        spec = items
        rspec, why = ctx.study_resolved[spec.name]
        if why:
            return rows, [f"skipped: {why}"], None
        if opts.samples < 2:
            return rows, [f"skipped: per-voxel std needs --samples ≥ 2 (got {opts.samples})"], None
        for s in opts.scales:
            d, res = ctx.data[s], ctx.result(spec.name, s)
            err = np.abs(res["mean"] - d.gt)[d.mask]
            cal = calibration(err, res["std"][d.mask])
            rows.append({"scale": s, "method": spec.name, "samples": res["samples"], **cal})
        return rows, notes, figures.calibration_plot(rows, fig_dir / "calibration.png") if rows else None
    raise ValueError(f"unknown study {study!r}")


PANEL_METHODS = ("zero_filled", "bicubic", "regression", "flow_only", HEADLINE_DDPM, "ftddm_anc_100", REFERENCE)


def _panel_columns(ctx: ReportContext, s: float) -> list[tuple[str, np.ndarray, str]]:
    """(title, image, colour role) columns for the map with the largest mask at scale s."""
    d = ctx.data[s]
    if not d.ids:
        return []
    i = int(np.argmax(d.mask.reshape(len(d.ids), -1).sum(1)))
    pid, z, met = d.ids[i]
    cols = [(f"ground truth\n{met} {pid} z{z}", d.gt[i], "map")]
    for name in PANEL_METHODS:
        if name in ctx.methods:
            cols.append((_short(ctx.methods[name].label), ctx.result(name, s)["mean"][i], "map"))
    if REFERENCE in ctx.methods:
        ref = ctx.result(REFERENCE, s)
        cols.append(("|FTDDM − GT|", np.abs(ref["mean"][i] - d.gt[i]), "error"))
        cols.append((f"FTDDM std ({ref['samples']} samples)", ref["std"][i], "error"))
    return cols


def _short(label: str) -> str:
    return label.replace(" (ancestral)", "\n(ancestral)").replace(", re-noised flow start", "\nre-noised").replace(
        " + DPM-Solver++", "\n+ DPM-Solver++").replace(" (one pass)", "").replace(" (T = ", "\n(T = ")


def headline_answer(method_rows: list[dict], tests: list[dict], ctx: ReportContext) -> dict[str, Any]:
    """Is FTDDM (DPM-Solver++ K = 10 from the flow) within 0.01 SSIM of full-chain DDPM at ≥ 10× fewer NFE?"""
    ref = {r["scale"]: r for r in method_rows if r["method"] == REFERENCE}
    ddpm = {r["scale"]: r for r in method_rows if r["method"] == HEADLINE_DDPM}
    missing = []
    if REFERENCE not in ctx.methods:
        missing.append(f"{REFERENCE} " + (f"was skipped: {ctx.skipped[REFERENCE]}" if REFERENCE in ctx.skipped
                                         else "was not among --methods"))
    if HEADLINE_DDPM not in ctx.methods:
        missing.append(f"{HEADLINE_DDPM} " + (f"was skipped: {ctx.skipped[HEADLINE_DDPM]}"
                                              if HEADLINE_DDPM in ctx.skipped else "was not among --methods"))
    if missing:
        return {"answer": "not evaluated", "reason": "; ".join(missing), "per_scale": []}
    p = {t["scale"]: t["p_value"] for t in tests if t["method"] == HEADLINE_DDPM and t["metric"] == "ssim"}
    per_scale = []
    for s in ctx.opts.scales:
        a, b = ref[s], ddpm[s]
        diff = a["ssim_mean"] - b["ssim_mean"]
        ratio = b["nfe"] / a["nfe"]
        per_scale.append({"scale": s, "ftddm_ssim": a["ssim_mean"], "ddpm_ssim": b["ssim_mean"],
                          "ssim_difference": diff, "ftddm_nfe": a["nfe"], "ddpm_nfe": b["nfe"], "nfe_ratio": ratio,
                          "wilcoxon_p": p.get(s, float("nan")), "within_margin": bool(diff >= -SSIM_MARGIN),
                          "ftddm_s_per_map": a["seconds_per_map"], "ddpm_s_per_map": b["seconds_per_map"]})
    ok = all(r["within_margin"] and r["nfe_ratio"] >= NFE_FACTOR for r in per_scale)
    return {"answer": "yes" if ok else "no", "per_scale": per_scale, "n_maps": {f"{s:g}": len(ctx.data[s].ids)
                                                                                for s in ctx.opts.scales}}


def _training_line(lm: LoadedModel) -> str:
    d = lm.training.get("data", {}) if isinstance(lm.training, dict) else {}
    if not d:
        return "no training data recorded in the file"
    return (f"trained on {Path(str(d.get('dataset', '?'))).name}, fold {d.get('fold', '?')}, split seed "
            f"{d.get('split_seed', '?')}, {lm.training.get('step', '?')} iterations")


def _compute_seconds(ctx) -> float:
    """Wall time of all runs as recorded when each was computed (a re-run from the cache keeps the original)."""
    return sum(float(r.get("seconds", 0.0)) for r in ctx.results.values())


def _machine_line(device) -> str:
    """Where the timings come from: CPU model and torch threads, or the GPU's name."""
    import platform

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{device} on {cpu}, {torch.get_num_threads()} torch threads"


# Where a headline gap comes from: the same start with more solver steps, a stochastic chain from the same
# start, and the start itself (flow only vs zero-filling). Each is an SSIM difference between two methods.
GAP_PROBES = (("more solver steps: K = 50 − K = 10", "ftddm_dpmpp_50", REFERENCE),
              ("stochastic chain from the same flow start: ancestral Ttrunc − K = 10", "ftddm_anc_100", REFERENCE),
              ("the flow start itself: flow only − zero-filling", "flow_only", "zero_filled"))


def _gap_diagnosis(ctx, headline) -> list[str]:
    """For the scales outside the margin: SSIM differences that localise the gap (solver, chain or start)."""
    failing = [r for r in headline.get("per_scale", []) if not r["within_margin"]]
    probes = [(label, a, b) for label, a, b in GAP_PROBES if a in ctx.methods and b in ctx.methods]
    if not failing or not probes:
        return []

    def probe(a, b, s):
        if (a, s) not in ctx.job_of or (b, s) not in ctx.job_of:
            return "–"
        return f"{_mean_metric(ctx.metric_rows(a, s), 'ssim') - _mean_metric(ctx.metric_rows(b, s), 'ssim'):+.4f}"

    rows = [[f"{r['scale']:g}", f"{r['ssim_difference']:+.4f}"] + [probe(a, b, r["scale"]) for _, a, b in probes]
            for r in failing]
    return ["", "Where the gap comes from (Δ SSIM, mean over maps; ≈ 0 for more solver steps means the solver "
            "has converged, so the gap lies in the start the chain inherits):", "",
            md_table(["s", "FTDDM − DDPM"] + [label for label, _, _ in probes], rows)]


def _report_markdown(ctx, method_rows, gt_kspace, tests, study_out, study_notes, figs, headline) -> str:
    opts, out = ctx.opts, ctx.out_dir
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    L: list[str] = ["# FTDDM evaluation report", ""]
    L.append(f"ftddm {__version__} · device `{ctx.device}`{' (bf16 autocast)' if opts.bf16 else ''} · "
             f"{len(ctx.jobs)} runs ({sum(bool(r.get('cached')) for r in ctx.results.values())} from the cache)")
    compute_min = _compute_seconds(ctx) / 60
    L.append("")
    L.append(f"Compute: {compute_min:.1f} min of wall time summed over the runs (as recorded when each was computed), "
             f"{_machine_line(ctx.device)}.")
    L += ["", "## Data and models", ""]
    L.append(f"- Dataset `{ctx.data_dir}`: {len(ctx.all_ids)} patients; fold {opts.fold} of {min(5, len(ctx.all_ids))} "
             f"(split seed {ctx.split_seed}); test patients: {', '.join(ctx.test_ids)}.")
    n_all = {s: len(d.ids) for s, d in ctx.data.items()}
    sub = f"at most {opts.max_slices} maps per scale, evenly spread (--max-slices)" if opts.max_slices else "all maps"
    L.append(f"- Maps (slice × metabolite) per scale: {', '.join(f's={s:g}: {n}' for s, n in n_all.items())} ({sub}).")
    L.append(f"- Samples per map for stochastic methods: {opts.samples}; seed {opts.seed}; τ_d = {opts.tau_d:g} "
             f"(FTDDM), τ_f = {opts.tau_f:g}.")
    main = ctx.models["main"]
    recorded = main.training.get("data", {}) if isinstance(main.training, dict) else {}
    if recorded.get("test") and recorded.get("fold") == opts.fold and list(recorded["test"]) != list(ctx.test_ids):
        L.append(f"- **Warning**: the model records test patients {recorded['test']} for fold {opts.fold}, "
                 f"this split gives {ctx.test_ids} (another dataset or split seed?).")
    L += ["", md_table(["role", "file", "sha256", "config", "T", "Ttrunc", "encoder params", "UNet params",
                        "flow params", "training"],
                       [[MODEL_ROLES[r], f"`{m.path.name}`", f"`{m.sha256[:12]}`", m.model.config.name,
                         m.last_index + 1, m.t_trunc, m.parameters("encoder"), m.parameters("unet"),
                         m.parameters("flow"), _training_line(m)]
                        for r, m in ctx.models.items()])]
    if "ddpm" not in ctx.models:
        L.append(f"\n{MODEL_ROLES['ddpm']} not given: methods that need it are skipped (see below).")
    if "regression" not in ctx.models:  # FTDDM v2 (resolve_spec): the encoder is the one-pass regression
        L.append(f"\n{MODEL_ROLES['regression']} not given: the one-pass regression is the FTDDM model's SR "
                 "encoder.")

    # headline
    L += ["", "## Headline: fast FTDDM vs full-chain DDPM", ""]
    L.append(f"Question: is FTDDM with the fast default sampler (DPM-Solver++ K = 10 from the flow, `{REFERENCE}`) "
             f"within {SSIM_MARGIN} SSIM of the full-chain DDPM of the same training at ≥ {NFE_FACTOR:g}× fewer NFE?")
    L.append("")
    if headline["answer"] == "not evaluated":
        L.append(f"**Not answered**: {headline['reason']}. Full-chain DDPM needs a UNet trained on every index "
                 "t ∈ [0, T − 1]; the FTDDM model's UNet only saw the truncated chain t ∈ [0, Ttrunc], so running "
                 "it from pure noise would measure a network outside its training range, not DDPM.")
    else:
        L.append(f"**Answer: {headline['answer']}.** (Δ SSIM = FTDDM − DDPM, mean over maps; 'within' means "
                 f"Δ ≥ −{SSIM_MARGIN}; the NFE ratio must be ≥ {NFE_FACTOR:g} at every scale.)")
        L.append("")
        L.append(md_table(["s", "FTDDM SSIM", "DDPM SSIM", "Δ SSIM", "NFE (FTDDM / DDPM)", "NFE ratio",
                           "Wilcoxon p (SSIM)", "s/map (FTDDM / DDPM)", f"within {SSIM_MARGIN}"],
                          [[f"{r['scale']:g}", _num(r["ftddm_ssim"]), _num(r["ddpm_ssim"]),
                            f"{r['ssim_difference']:+.4f}", f"{r['ftddm_nfe']} / {r['ddpm_nfe']}",
                            f"{r['nfe_ratio']:.1f}×", _num(r["wilcoxon_p"], 3),
                            f"{r['ftddm_s_per_map']:.3g} / {r['ddpm_s_per_map']:.3g}",
                            "yes" if r["within_margin"] else "no"] for r in headline["per_scale"]]))
        ddpm_lm = ctx.models["ddpm"]
        same = _training_line(ddpm_lm) == _training_line(main)
        L.append("")
        L.append(f"Both models: FTDDM — {_training_line(main)}; DDPM — {_training_line(ddpm_lm)}"
                 + ("" if same else " (**not** verified to be the same training data/iterations)") + ".")
        L.append(f"Means over {', '.join(f's={k}: {v}' for k, v in headline['n_maps'].items())} maps per scale; with "
                 "few maps the answer is indicative only.")
        L += _gap_diagnosis(ctx, headline)

    # methods
    L += ["", "## Methods", ""]
    L.append("NFE = UNet evaluations per sample chain (a chain from index t evaluates t + 1 times, the last giving "
             "x̂0); flow = flow passes per chain; s/map = wall seconds per map for all its samples (batched, "
             "see notes); params = parameters of the networks the method uses. Metrics: mean ± std over maps.")
    cols = ["method", "model", "NFE", "flow", "s/map", "params", "NRMSE", "PSNR", "SSIM", "NRMSE (M)", "PSNR (M)",
            "SSIM (M)", "k-space err"] + (["LPIPS"] if ctx.has_lpips else [])
    for s in opts.scales:
        rows = [r for r in method_rows if r["scale"] == s]
        if not rows:
            continue
        L += ["", f"### s = {s:g} ({ctx.data[s].lr_text}, {len(ctx.data[s].ids)} maps)", ""]
        body = []
        for r in rows:
            body.append([r["label"], r["model"], r["nfe"], r["flow_passes"], f"{r['seconds_per_map']:.3g}",
                         f"{r['parameters']:,}"] + [_pm(r[f"{k}_mean"], r[f"{k}_std"], DIGITS[k]) for k in
                                                    ("nrmse", "psnr", "ssim", "nrmse_mask", "psnr_mask", "ssim_mask",
                                                     "kspace_error")]
                        + ([_pm(r["lpips_mean"], r["lpips_std"], 4)] if ctx.has_lpips else []))
        gm, gsd, _ = gt_kspace[s]
        body.append(["*ground truth (reference)*", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–",
                     _pm(gm, gsd, 4)] + (["–"] if ctx.has_lpips else []))
        L.append(md_table(cols, body))
    if ctx.skipped:
        L += ["", "Skipped methods:", ""]
        L += [f"- `{k}`: {v}" for k, v in ctx.skipped.items()]
    L += ["", f"- {ctx.lpips_note}"]
    if "quality_vs_nfe" in figs:
        L += ["", f"![SSIM vs NFE]({rel(figs['quality_vs_nfe'])})"]

    # statistics
    L += ["", "## Wilcoxon signed-rank tests", ""]
    if not tests:
        L.append(f"Not computed: `{REFERENCE}` (the reference) and at least one other method must be evaluated.")
    else:
        L.append(f"`{REFERENCE}` against each method, paired per map (scipy.stats.wilcoxon, two-sided); Δ = median "
                 "of reference − method. All tests in `wilcoxon.csv`.")
        L.append("")
        ssim = [t for t in tests if t["metric"] == "ssim"]
        psnr = {(t["scale"], t["method"]): t for t in tests if t["metric"] == "psnr"}
        L.append(md_table(["s", "method", "n", "Δ SSIM", "p (SSIM)", "Δ PSNR", "p (PSNR)"],
                          [[f"{t['scale']:g}", t["method"], t["n"], f"{t['median_difference']:+.4f}",
                            _num(t["p_value"], 3), f"{psnr[(t['scale'], t['method'])]['median_difference']:+.2f}",
                            _num(psnr[(t['scale'], t['method'])]["p_value"], 3)] for t in ssim]))

    # studies
    L += ["", "## Studies", ""]
    if not opts.studies:
        L.append("None run (--studies none).")
    for study in opts.studies:
        L += _study_markdown(study, study_out.get(study, []), study_notes.get(study, []), figs, rel, opts)

    # panels
    panels = [k for k in figs if k.startswith("panels_")]
    if panels:
        L += ["", "## Qualitative panels", "",
              "The map with the largest mask per scale; colour range 0 … max of the ground truth (model space)."]
        L += [f"\n![{k}]({rel(figs[k])})" for k in panels]

    L += ["", "## Notes: what is approximate, and how to read this report", ""]
    L += [f"- {n}" for n in _notes(ctx)]
    L += ["", "## Files", "",
          "`methods.csv` (one row per method and scale), `per_map.csv` (every metric of every map), `wilcoxon.csv`, "
          "`study_*.csv`, `summary.json`, `figures/*.png`, `cache/*.npz` (outputs per run; delete to recompute)."]
    return "\n".join(L) + "\n"


def _study_markdown(study, rows, notes, figs, rel, opts) -> list[str]:
    L: list[str] = []
    if study == "tau_d":
        L += ["### τ_d sweep: fidelity vs sharpness (paper Fig. 7)", "",
              "FTDDM ancestral chain from the flow at the model's Ttrunc. Sharpness: mean |∇| in M relative to the "
              "ground truth, and k-space energy outside the measured m×m block relative to the ground truth "
              "(1 = as sharp as the truth; below 1 = smoother)."]
        if rows:
            L += ["", md_table(["s", "τ_d", "NFE", "PSNR", "SSIM", "NRMSE", "gradient ratio", "HF energy ratio"],
                               [[f"{r['scale']:g}", f"{r['tau_d']:g}", r["nfe"], f"{r['psnr']:.2f}", _num(r["ssim"]),
                                 _num(r["nrmse"]), _num(r["gradient_ratio"], 3), _num(r["high_frequency_ratio"], 3)]
                                for r in rows])]
    elif study == "scale_mismatch":
        L += ["### Conditioned vs actual upscaling factor (paper Fig. 6)", "",
              f"`{REFERENCE}` with the network conditioned on s' while the input was made with s (rows: actual s)."]
        if rows:
            conds = sorted({r["conditioned_scale"] for r in rows}, reverse=True)
            table = {(r["actual_scale"], r["conditioned_scale"]): r for r in rows}
            body = [[f"{s:g}"] + [_num(table[(s, c)]["ssim"]) if (s, c) in table else "–" for c in conds]
                    for s in sorted({r["actual_scale"] for r in rows}, reverse=True)]
            L += ["", "SSIM:", "", md_table(["actual s \\ conditioned s'"] + [f"{c:g}" for c in conds], body)]
    elif study == "t_trunc":
        L += ["### Truncation index (paper Fig. 5)", "",
              "Ancestral FTDDM from different Ttrunc (0 = flow only). Indices below the model's Ttrunc use the "
              "re-noised flow start (see notes); indices above it are skipped."]
        if rows:
            L += ["", md_table(["s", "Ttrunc", "start", "NFE", "PSNR", "SSIM", "NRMSE"],
                               [[f"{r['scale']:g}", r["t_trunc"], r["start"], r["nfe"], f"{r['psnr']:.2f}",
                                 _num(r["ssim"]), _num(r["nrmse"])] for r in rows])]
    elif study == "calibration":
        L += ["### Uncertainty calibration", "",
              f"Per-voxel std over {opts.samples} samples of `{REFERENCE}` vs absolute error |mean − GT|, voxels in "
              "M. A calibrated std has RMSE ≈ std in every bin (identity line of the reliability plot)."]
        if rows:
            L += ["", md_table(["s", "voxels", "Pearson r", "Spearman ρ", "RMSE", "mean std", "RMSE / mean std"],
                               [[f"{r['scale']:g}", r["n"], _num(r["pearson"], 3), _num(r["spearman"], 3),
                                 _num(r["rmse"]), _num(r["mean_std"]),
                                 _num(r["rmse"] / r["mean_std"], 3) if r["mean_std"] > 0 else "–"] for r in rows])]
    L += [""] + [f"- {n}" for n in notes] if notes else []
    if study in figs:
        L += ["", f"![{study}]({rel(figs[study])})"]
    return L + [""]


def _notes(ctx: ReportContext) -> list[str]:
    main = ctx.models["main"]
    notes = [
        f"The FTDDM model's UNet is trained only on the truncated chain t ∈ [0, {main.t_trunc}]. Methods that start "
        "from pure noise (DDPM full chain, DDPM respaced, DPM-Solver++ from noise) use the --ddpm-model "
        "(trained with `ftddm train --t-trunc 999`) and are skipped without one; they are never run with a UNet "
        "outside its trained range. The `model` column says which file each method used.",
        f"FTDDM at Ttrunc' < {main.t_trunc} ('re-noised flow start') is an approximation: the flow is trained to "
        f"produce x at index {main.t_trunc}; its mode / √ᾱ_{main.t_trunc} (clamped, masked) is taken as x̂0 and "
        "re-noised to t' with the forward process, ε ⊙ M. The paper trains one flow per Ttrunc. The mode is used "
        "rather than a τ_f sample because a sample already carries the forward noise of index Ttrunc, which "
        "re-noising would add twice.",
        f"Flow only (Ttrunc = 0): x̂0 = flow mode / √ᾱ_{main.t_trunc}, clamped and masked: 0 UNet evaluations, one "
        "flow pass, deterministic (std 0).",
        "Ground truth = HR map ⊙ M in model space (divided by the LR-derived scale of data.make_example); outputs "
        "are masked by M, including zero-filling and bicubic, so outside M both are 0 as in the published "
        "metrics. PSNR (data range = GT max − min) and SSIM are invariant to the per-map scale; NRMSE is a ratio.",
        "k-space consistency error = ‖central m×m k-space of the output − that of the measured LR map‖ / "
        "‖measurement‖ in model space. The measurement is |LR| of the whole slab while outputs are masked, so "
        "even the ground truth has a nonzero error (the 'ground truth (reference)' row is the floor).",
        f"FTDDM chains use τ_d = {ctx.opts.tau_d:g} and τ_f = {ctx.opts.tau_f:g} (paper defaults); DDPM chains use "
        "τ_d = 1 (standard DDPM). DPM-Solver++ is deterministic given its start (only τ_f or the start noise vary).",
        "Timings: wall time of each run divided by its maps, all samples included, with up to "
        f"--max-batch {ctx.opts.max_batch} chains per network call, on the device of the run that filled the "
        "cache entry (re-runs report the cached time).",
        "p-values are not corrected for multiple comparisons; with few maps (--max-slices) they are weak.",
        f"Test split: data.patient_folds(k = min(5, patients), fold, seed {ctx.split_seed}) — the split "
        "`ftddm train` uses with the same seed.",
    ]
    if any(d.tiled for d in ctx.data.values()):
        tile = next(iter(ctx.data.values())).gt.shape[-1]
        notes.append(
            f"In-vivo-like data (maps not {tile}×{tile}): maps are {tile}×{tile} tiles around the mask centre "
            "(data.tile_example without rng, as training derives its examples). The LR map is derived on the full "
            "slice (m_a = round(n_a / s), at least 4), its scale and y too, and only then cut; zero-filling and "
            "bicubic are computed from the full slice's LR and cut at the same place, so every method sees the "
            "same pixels. Metrics are over the tile; networks are conditioned on the factor the slice actually got, "
            "√((n1/m1)·(n2/m2)). The k-space error and the HF energy ratio place the tile on its full slice and "
            "are left out (NaN) for maps whose mask reaches outside the tile "
            f"({sum(int((~d.mask_in_tile).sum()) for d in ctx.data.values())} of "
            f"{sum(len(d.ids) for d in ctx.data.values())} maps over all scales).")
    if ctx.opts.bf16:
        notes.append("bf16 autocast was on: expect differences of about 1% from float32.")
    return notes
