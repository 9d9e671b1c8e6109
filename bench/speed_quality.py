"""Benchmark (issue 13): the quality cost of each speed setting vs DPM-Solver++ K = 10 from the flow start (the
default sampler when it was measured; now `--start flow --sampler dpmpp`), on held-out in-vivo-like maps.

Run: OMP_NUM_THREADS=2 .venv/bin/python -m bench.speed_quality [--maps 24] [--out bench/speed_quality.json]
Maps as bench/invivo_kinds.py derives them (held-out patients of a kind, full slices, training's derivation),
evenly spread over the available maps. Every setting runs on the same maps with the same seed; SSIM and PSNR are
taken against the ground truth on the whole map (as published) and compared to that reference (DPM-Solver++
K = 10 from the flow, fp32) map by map: the mean paired difference and its standard error. A setting is kept as a default only if its
SSIM cost (default − setting) is ≤ 0.002 (issue 13).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.invivo_kinds import cpu_model, group_by_shape, heldout_dataset, map_metrics, spread_subset
from ftddm_core.atomic import atomic_write_text
from ftddm_core.device import autocast, generator as make_generator
from ftddm_core.model import load_model
from ftddm_core.pipeline import SuperResolveOptions

DEFAULT = "dpmpp K=10 fp32"
SETTINGS = {  # label: (sampler options, bf16)
    DEFAULT: (dict(sampler="dpmpp", steps=10), False),
    "dpmpp-3m K=5": (dict(sampler="dpmpp-3m", steps=5), False),
    "dpmpp-3m K=6": (dict(sampler="dpmpp-3m", steps=6), False),
    "dpmpp K=5 (2nd order)": (dict(sampler="dpmpp", steps=5), False),
    "dpmpp K=10 bf16": (dict(sampler="dpmpp", steps=10), True),
}
SSIM_BUDGET = 0.002


def run_setting(model, examples, options: dict, bf16: bool, samples: int, seed: int) -> tuple[list, float]:
    """SR means (one (H, W) array per example, in example order) and seconds, shape group by shape group."""
    defaults = SuperResolveOptions()
    outs, seconds = {}, 0.0
    for group in group_by_shape(examples):
        cond = torch.stack([ex["cond"] for ex in group.examples])
        scale = torch.tensor([ex["scale"] for ex in group.examples], dtype=torch.float32)
        started = time.perf_counter()
        with torch.no_grad(), autocast(torch.device("cpu"), bf16):
            result = model.sample(cond, scale, force_scale=True, max_batch=16, tau_d=defaults.tau_d,
                                  tau_f=defaults.tau_f, n_samples=samples, generator=make_generator(
                                      torch.device("cpu"), seed), **options)
        seconds += time.perf_counter() - started
        for ex, mean in zip(group.examples, result.mean.float()[:, 0].numpy()):
            outs[id(ex)] = mean
    return [outs[id(ex)] for ex in examples], seconds


def paired(reference: list[float], other: list[float]) -> dict:
    d = np.asarray(other, np.float64) - np.asarray(reference, np.float64)
    return {"mean_difference": float(d.mean()), "standard_error": float(d.std(ddof=1) / np.sqrt(len(d)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kind", default="mixed")
    ap.add_argument("--factors", default="2,4")
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--maps", type=int, default=24, help="maps per factor (evenly spread)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("speed_quality.json"))
    args = ap.parse_args()
    model = load_model(None, device="cpu")
    ds, seeds = heldout_dataset(args.kind, args.patients)
    result = {"kind": args.kind, "patients": seeds, "samples": args.samples, "cpu": cpu_model(),
              "torch_threads": torch.get_num_threads(), "default": DEFAULT, "ssim_budget": SSIM_BUDGET,
              "factors": {}}
    for factor in (float(f) for f in args.factors.split(",")):
        examples = [ds[(i, factor)] for i in spread_subset(len(ds), args.maps)]
        scores, cell = {}, {}
        for label, (options, bf16) in SETTINGS.items():
            outs, seconds = run_setting(model, examples, options, bf16, args.samples, seed=0)
            scores[label] = [map_metrics(ex["x0"][0].numpy(), out * ex["mask"][0].numpy(), ex["mask"][0].numpy())
                             for ex, out in zip(examples, outs)]
            cell[label] = {"ssim": float(np.mean([s["ssim"] for s in scores[label]])),
                           "psnr": float(np.mean([s["psnr"] for s in scores[label]])), "seconds": round(seconds, 2)}
            print(f"F={factor:g} {label:<24} SSIM {cell[label]['ssim']:.4f}  PSNR {cell[label]['psnr']:.2f}  "
                  f"{seconds:6.1f} s", flush=True)
        for label in SETTINGS:
            for metric in ("ssim", "psnr"):
                cell[label][f"{metric}_vs_default"] = paired([s[metric] for s in scores[DEFAULT]],
                                                             [s[metric] for s in scores[label]])
            cell[label]["within_ssim_budget"] = -cell[label]["ssim_vs_default"]["mean_difference"] <= SSIM_BUDGET
        result["factors"][f"{factor:g}"] = {"maps": len(examples), "settings": cell}
    atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
