"""Benchmark (issue 11): held-out in-vivo-like phantoms per kind × factor, FTDDM vs zero-filling vs the regression.

Run (after training; the default model is ftddm_core/weights/ftddm_compact.safetensors):
    OMP_NUM_THREADS=2 .venv/bin/python -m bench.invivo_kinds   # from the repository root
For each kind (rectangular, noisy HR, 5 mm voxels, mixed) and factor F, N held-out patients are generated in
memory by ftddm_core.invivo with seeds SeedSequence(10000 + KINDS.index(kind), spawn_key=(i,)), which no
`ftddm phantom --seed S` cohort with S < 10000 can draw (those are SeedSequence(S, spawn_key=(i,))). Every 2D map
(slice × metabolite with ≥ 5 % of its pixels in M = quality ∧ brain) is derived on its full slice exactly as
training derives it (data.SliceDataset without tiles: T1/FLAIR on the map grid in [0, 1], make_example(factor=F)).

Methods per map: zero-filled (|LR_zf|/norm ⊙ M, the LR channel of the condition), the regression (the SR encoder's
one pass, sampler="regression", NFE 1) and FTDDM (super-resolve's default chain, SuperResolveOptions, mean of
n samples). Metrics against GT = x0 = HR⊙M/norm: PSNR and SSIM on the whole map as published (data_range from
GT), RMSE and NRMSE inside M, and the sharpness ratio mean|∇out| / mean|∇GT| inside M (1 = truth-like).
Each kind × factor is reported on its own (mean ± std, number of maps, paired Wilcoxon signed-rank p-values);
nothing is averaged across kinds.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from ftddm_core import invivo, metrics
from ftddm_core.atomic import atomic_write_text
from ftddm_core.data import SliceDataset
from ftddm_core.device import autocast, generator as make_generator, resolve_device
from ftddm_core.evaluation.stats import gradient_ratio
from ftddm_core.evaluation.tables import display_path
from ftddm_core.model import DEFAULT_MODEL, FTDDM, file_sha256, load_model
from ftddm_core.options import SuperResolveOptions
from ftddm_core.phantom import patient_seed

KINDS = ("rectangular", "noisy", "5mm", "mixed")  # the kinds; factor 2 is F = 2 on every kind
FACTORS = (2.0, 3.0, 4.0)
SEED_BASE = 10_000  # held-out cohorts: entropy 10000 + kind index (training: `ftddm phantom --seed 0`)
METHODS = ("zero-filled", "regression", "FTDDM")
METRICS = ("psnr", "ssim", "rmse_mask", "nrmse_mask", "gradient_ratio")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "rmse_mask": False, "nrmse_mask": False}
ALPHA = 0.05  # "beats zero-filling": higher mean and paired Wilcoxon p < ALPHA
MIN_MASK_FRACTION = 0.05


# ------------------------------------------------------------------------------------------- data

def heldout_seed(kind: str, index: int) -> np.random.SeedSequence:
    """Seed of held-out patient `index` of `kind`: phantom.patient_seed(10000 + kind index, index)."""
    return patient_seed(SEED_BASE + invivo.KINDS.index(kind), index)


def heldout_dataset(kind: str, patients: int) -> tuple[SliceDataset, list[dict]]:
    """Full-slice training-style dataset (no tiles, no augmentation) of `patients` held-out patients of a kind."""
    cohort, seeds = [], []
    for i in range(patients):
        seq = heldout_seed(kind, i)
        pid = f"{kind}-{i + 1:03d}"
        cohort.append(invivo.make_invivo_patient(seq, kind=kind, patient_id=pid))
        seeds.append({"patient": pid, "entropy": int(seq.entropy), "spawn_key": list(seq.spawn_key),
                      "matrix": list(cohort[-1].shape)})
    ds = SliceDataset(cohort, image_size=None, augment=False, min_mask_fraction=MIN_MASK_FRACTION)
    return ds, seeds


def spread_subset(n: int, limit: int | None) -> list[int]:
    """Indices 0…n−1, or `limit` of them evenly spread over the range (first and last included)."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, int(limit))})


@dataclass
class MapGroup:
    """Examples of one in-plane shape (maps of different sizes cannot share a network batch)."""

    shape: tuple[int, int]
    examples: list[dict]


def group_by_shape(examples: Sequence[dict]) -> list[MapGroup]:
    groups: dict[tuple[int, int], list[dict]] = {}
    for ex in examples:
        groups.setdefault(tuple(ex["x0"].shape[-2:]), []).append(ex)
    return [MapGroup(shape, exs) for shape, exs in groups.items()]


# ------------------------------------------------------------------------------------------- methods
@dataclass
class Settings:
    samples: int = 4
    seed: int = 0
    max_batch: int = 64
    bf16: bool = False


def sampler_summary(kw: dict) -> str:
    """super-resolve's default chain in a few words, for the report."""
    start = (f"re-noised flow mode at t={kw['t_trunc']}" if kw["start"] == "renoised"
             else f"flow draw at t={kw['t_trunc']}, tau_f={kw['tau_f']:g}")
    steps = "" if kw["sampler"] == "ancestral" else f" K={kw['steps']} {kw['spacing']}"
    return f"{kw['sampler']}{steps} from the {start}, tau_d={kw['tau_d']:g}"


def run_methods(model: FTDDM, group: MapGroup, settings: Settings, device: torch.device) -> tuple[dict, dict]:
    """({method: (B, H, W) outputs}, {method: seconds}) for one shape group."""
    cond = torch.stack([ex["cond"] for ex in group.examples]).to(device)
    scale = torch.tensor([ex["scale"] for ex in group.examples], dtype=torch.float32, device=device)
    opts = SuperResolveOptions()
    # s = √(n1/m1 · n2/m2) as in training; odd matrices put it a rounding below F = 2, which training also sees
    common = dict(force_scale=True, max_batch=settings.max_batch)
    outputs = {"zero-filled": (cond[:, 0] * cond[:, 1]).cpu().numpy()}
    seconds = {"zero-filled": 0.0}
    runs = {
        "regression": dict(sampler="regression"),
        "FTDDM": dict(opts.sample_kwargs(model.config.diffusion.t_trunc), n_samples=settings.samples,
                      generator=make_generator(device, settings.seed)),
    }
    for method, kw in runs.items():
        started = time.perf_counter()
        with torch.no_grad(), autocast(device, settings.bf16):
            result = model.sample(cond, scale, **common, **kw)
        outputs[method] = result.mean.float()[:, 0].cpu().numpy()
        seconds[method] = time.perf_counter() - started
    return outputs, seconds


def map_metrics(gt: np.ndarray, out: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR/SSIM on the whole map (published), RMSE/NRMSE and the gradient ratio inside the mask."""
    m = mask > 0
    return {"psnr": metrics.psnr(gt, out), "ssim": metrics.ssim(gt, out),
            "rmse_mask": float(np.sqrt(np.mean((np.asarray(gt, np.float64)[m] - out[m]) ** 2))),
            "nrmse_mask": metrics.nrmse(gt, out, m), "gradient_ratio": gradient_ratio(gt, out, m)}


# ------------------------------------------------------------------------------------------- statistics
def summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "std": float(v.std()) if v.size else float("nan"), "n": int(v.size)}


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired Wilcoxon signed-rank p (scipy.stats.wilcoxon); NaN when undefined (n < 2, all ties)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2 or np.all(a[keep] == b[keep]):
        return float("nan")
    return float(stats.wilcoxon(a[keep], b[keep]).pvalue)


def compare(rows: Sequence[dict], metric: str, method: str, baseline: str) -> dict[str, Any]:
    a = [r[method][metric] for r in rows]
    b = [r[baseline][metric] for r in rows]
    diff = float(np.nanmean(np.subtract(a, b))) if rows else float("nan")
    return {"mean_difference": diff, "wilcoxon_p": paired_wilcoxon(a, b)}


def beats(comparison: dict, metric: str) -> bool:
    """Better mean (in the metric's direction) and significant at ALPHA."""
    d, p = comparison["mean_difference"], comparison["wilcoxon_p"]
    better = d > 0 if HIGHER_IS_BETTER[metric] else d < 0
    return bool(better and np.isfinite(p) and p < ALPHA)


def cell_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """Per method × metric mean ± std and n; FTDDM vs zero-filled / regression; the ✓/✗ verdicts."""
    out: dict[str, Any] = {"maps": len(rows), "methods": {}, "ftddm_vs": {}, "beats_zero_filling": {}}
    for method in METHODS:
        out["methods"][method] = {k: summary([r[method][k] for r in rows]) for k in METRICS}
    for baseline in ("zero-filled", "regression"):
        out["ftddm_vs"][baseline] = {k: compare(rows, k, "FTDDM", baseline) for k in METRICS}
    for k in ("psnr", "ssim"):
        out["beats_zero_filling"][k] = beats(out["ftddm_vs"]["zero-filled"][k], k)
    return out


# ------------------------------------------------------------------------------------------- the run
def evaluate_kind(model: FTDDM, kind: str, factors: Sequence[float], patients: int, max_maps: int | None,
                  settings: Settings, device: torch.device, log=print) -> dict[str, Any]:
    ds, seeds = heldout_dataset(kind, patients)
    chosen = spread_subset(len(ds), max_maps)
    result: dict[str, Any] = {"patients": seeds, "available_maps": len(ds), "factors": {}}
    for factor in factors:
        examples = [ds[(i, float(factor))] for i in chosen]  # a float: the factor F (an int would be m)
        rows, seconds = [], {m: 0.0 for m in METHODS}
        for group in group_by_shape(examples):
            outputs, secs = run_methods(model, group, settings, device)
            for m in METHODS:
                seconds[m] += secs[m]
            for b, ex in enumerate(group.examples):
                gt, mask = ex["x0"][0].numpy(), ex["mask"][0].numpy()
                row = {"patient": ex["patient"], "slice": ex["slice"], "metabolite": ex["metabolite"],
                       "shape": list(group.shape), "lr_shape": list(ex["lr_shape"]), "scale": ex["scale"]}
                row.update({m: map_metrics(gt, outputs[m][b] * mask, mask) for m in METHODS})
                rows.append(row)
        cell = cell_summary(rows)
        cell["seconds"] = {m: round(s, 3) for m, s in seconds.items()}
        cell["seconds_per_map"] = {m: round(s / max(len(rows), 1), 4) for m, s in seconds.items()}
        cell["scale_range"] = [min(r["scale"] for r in rows), max(r["scale"] for r in rows)] if rows else []
        cell["per_map"] = rows
        result["factors"][f"{factor:g}"] = cell
        log(f"{kind} F={factor:g}: {len(rows)} maps, FTDDM {seconds['FTDDM']:.1f} s", flush=True)
    return result


def cpu_model() -> str:
    """lscpu's "Model name" (platform.processor() where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------- report
def _fmt(s: dict, digits: int) -> str:
    return "–" if not s["n"] else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _p(p: float) -> str:
    return "–" if not np.isfinite(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def markdown(result: dict) -> str:
    r = result
    lines = [
        "# Held-out in-vivo-like phantoms per kind (issue 11)", "",
        f"Model `{r['model']}` (sha256 {r['model_sha256'][:12]}…); FTDDM = {r['sampler']}, {r['samples']} samples, "
        f"seed {r['seed']}; regression = the SR encoder's one pass (NFE 1); zero-filled = |LR_zf| ⊙ M. "
        f"{r['patients_per_kind']} held-out patients per kind (seeds {r['seed_rule']})"
        + (f", at most {r['max_maps_per_kind']} maps per kind (evenly spread)" if r["max_maps_per_kind"] else "")
        + f". CPU: {r['cpu']}; device {r['device']}, {r['torch_threads']} torch threads; wall time "
        f"{r['seconds']:.0f} s.", "",
        "Mean ± std over maps (slice × metabolite, ≥ 5 % in M), each on its full slice; PSNR/SSIM on the whole map "
        "as published (data_range from GT), RMSE (units of the map's LR scale)/NRMSE inside M, ‖∇‖ ratio = mean "
        "‖∇out‖ / mean ‖∇GT‖ inside M (1 = truth-like sharpness). p: paired two-sided Wilcoxon signed-rank test "
        f"of FTDDM vs zero-filled (zf) and vs the regression (reg). Beats zero-filling ✓ = higher mean and "
        f"p < {ALPHA:g}, else ✗. Each kind is reported on its own; nothing is averaged across kinds.", "",
    ]
    for kind, kres in r["kinds"].items():
        lines += [f"## {kind}", "",
                  f"Patients: {len(kres['patients'])} (matrices "
                  f"{', '.join('×'.join(map(str, p['matrix'])) for p in kres['patients'])}), "
                  f"{kres['available_maps']} maps available.", "",
                  "| F | method | maps | PSNR (dB) | SSIM | RMSE in M | NRMSE in M | ‖∇‖ ratio | s/map |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for f, cell in kres["factors"].items():
            for m in METHODS:
                s = cell["methods"][m]
                lines.append(f"| {f} | {m} | {cell['maps']} | {_fmt(s['psnr'], 2)} | {_fmt(s['ssim'], 3)} | "
                             f"{_fmt(s['rmse_mask'], 4)} | {_fmt(s['nrmse_mask'], 3)} | "
                             f"{_fmt(s['gradient_ratio'], 2)} | {cell['seconds_per_map'][m]:.3f} |")
        lines += ["", "| F | FTDDM beats zero-filling: PSNR | SSIM | ΔPSNR vs zf (p) | ΔSSIM vs zf (p) | "
                      "ΔPSNR vs reg (p) | ΔSSIM vs reg (p) |", "|---|---|---|---|---|---|---|"]
        for f, cell in kres["factors"].items():
            zf, reg = cell["ftddm_vs"]["zero-filled"], cell["ftddm_vs"]["regression"]
            mark = {k: "✓" if cell["beats_zero_filling"][k] else "✗" for k in ("psnr", "ssim")}
            lines.append(
                f"| {f} | {mark['psnr']} | {mark['ssim']} | {zf['psnr']['mean_difference']:+.2f} "
                f"({_p(zf['psnr']['wilcoxon_p'])}) | {zf['ssim']['mean_difference']:+.3f} "
                f"({_p(zf['ssim']['wilcoxon_p'])}) | {reg['psnr']['mean_difference']:+.2f} "
                f"({_p(reg['psnr']['wilcoxon_p'])}) | {reg['ssim']['mean_difference']:+.3f} "
                f"({_p(reg['ssim']['wilcoxon_p'])}) |")
        lines.append("")
    return "\n".join(lines)


def without_per_map(result: dict) -> dict:
    """The result without the per-map rows (for printing)."""
    return {**result, "kinds": {k: {**v, "factors": {f: {kk: vv for kk, vv in c.items() if kk != "per_map"}
                                                     for f, c in v["factors"].items()}}
                                for k, v in result["kinds"].items()}}


def finite_or_null(obj):
    """The same structure with NaN/inf floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------- CLI
def parse_list(text: str, flag: str, cast, allowed=None) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SystemExit(f"{flag}: expected a comma-separated list, got {text!r}")
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if allowed is not None and any(v not in allowed for v in values):
        raise SystemExit(f"{flag}: expected kinds from {', '.join(allowed)}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="FTDDM v2 model (default: the shipped default)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(invivo.KINDS)}")
    ap.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS), help="in-plane factors F")
    ap.add_argument("--patients", type=int, default=3, help="held-out patients per kind")
    ap.add_argument("--samples", type=int, default=4, help="FTDDM samples per map (mean = the output)")
    ap.add_argument("--seed", type=int, default=0, help="FTDDM sampling seed")
    ap.add_argument("--max-maps-per-kind", type=int, default=0, help="evenly spread subset per kind (0 = all)")
    ap.add_argument("--max-batch", type=int, default=64, help="images per network call")
    ap.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, …")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (faster on AVX-512 CPUs)")
    ap.add_argument("--out-prefix", type=Path, default=Path(__file__).with_name("invivo_kinds"),
                    help="writes PREFIX.json and PREFIX.md")
    ap.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.json / PREFIX.md")
    return ap


def check_args(args, model: FTDDM) -> tuple[list[str], list[float]]:
    kinds = parse_list(args.kinds, "--kinds", str, invivo.KINDS)
    factors = parse_list(args.factors, "--factors", float)
    lo, hi = model.config.scale_range
    if any(not lo <= f <= hi for f in factors):
        raise SystemExit(f"--factors: {args.factors} outside the model's trained range [{lo:g}, {hi:g}]")
    for flag, value in (("--patients", args.patients), ("--samples", args.samples), ("--max-batch", args.max_batch)):
        if value < 1:
            raise SystemExit(f"{flag}: expected an integer ≥ 1, got {value}")
    if args.max_maps_per_kind < 0:
        raise SystemExit(f"--max-maps-per-kind: expected ≥ 0 (0 = all), got {args.max_maps_per_kind}")
    return kinds, factors


def output_paths(prefix: Path, overwrite: bool) -> tuple[Path, Path]:
    paths = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise SystemExit(f"--out-prefix: {', '.join(existing)} already exist(s); pass --overwrite to replace")
    return paths


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    json_path, md_path = output_paths(args.out_prefix, args.overwrite)
    model_path = Path(args.model) if args.model else DEFAULT_MODEL
    if not model_path.is_file():
        raise SystemExit(f"--model: {model_path} not found; expected an FTDDM v2 .safetensors file")
    device = resolve_device(args.device)
    model = load_model(model_path, device=device).eval()
    kinds, factors = check_args(args, model)
    settings = Settings(samples=args.samples, seed=args.seed, max_batch=args.max_batch, bf16=args.bf16)
    started = time.perf_counter()
    per_kind = {k: evaluate_kind(model, k, factors, args.patients, args.max_maps_per_kind or None, settings, device)
                for k in kinds}
    opts = SuperResolveOptions()
    result = {
        "model": display_path(model_path), "model_sha256": file_sha256(model_path), "samples": args.samples,
        "seed": args.seed, "sampler": sampler_summary(opts.sample_kwargs(model.config.diffusion.t_trunc)),
        "bf16": args.bf16, "device": str(device), "torch_threads": torch.get_num_threads(), "cpu": cpu_model(),
        "patients_per_kind": args.patients, "max_maps_per_kind": args.max_maps_per_kind,
        "seed_rule": f"SeedSequence({SEED_BASE} + invivo.KINDS.index(kind), spawn_key=(i,))",
        "factors": factors, "alpha": ALPHA, "command": " ".join(["bench/invivo_kinds.py", *(argv or sys.argv[1:])]),
        "seconds": time.perf_counter() - started, "kinds": per_kind,
    }
    result["seconds"] = round(result["seconds"], 1)
    atomic_write_text(json_path, json.dumps(finite_or_null(result), indent=1, allow_nan=False) + "\n")
    atomic_write_text(md_path, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
