"""Benchmark: held-out quality of a model against zero-filling and bicubic at s = 8, 4, 2 (+ data consistency).

Run (the dataset is regenerated bit-for-bit by `ftddm phantom --out runs/phantom25 --patients 25 --seed 0`):
    .venv/bin/python bench/heldout.py --data runs/phantom25 --model ftddm_core/weights/ftddm_compact.safetensors
Each test patient of the fold (never seen in training or validation) goes through the user's path: its 7 HR maps
are truncated in k-space to the LR matrix 64/s (ftddm_core.demo.simulate_lr), then super_resolve() with the
patient's T1, FLAIR (own grid) and quality mask. Metrics per 2D map as published (whole 64×64 map, GT = HR ⊙ M,
outputs ⊙ M) and inside M, over every slice with ≥ 5 % of its pixels in M.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ftddm_core import baselines, metrics, volume as V
from ftddm_core.atomic import atomic_write_text
from ftddm_core.data import list_patients, load_patient, patient_folds
from ftddm_core.demo import simulate_lr
from ftddm_core.model import load_model
from ftddm_core.pipeline import super_resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--scales", default="8,4,2")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--dc", default="0", help="data-consistency weights λ to evaluate, e.g. 0,0.5,1")
    ap.add_argument("--patients", type=int, default=0, help="use only the first N test patients (0 = all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("heldout.json"))
    args = ap.parse_args()

    model = load_model(args.model, device="cpu")
    ids = list_patients(args.data)
    _, _, test_ids = patient_folds(ids, k=5, fold=args.fold, seed=0)
    test_ids = test_ids[: args.patients or None]
    scales = [float(s) for s in args.scales.split(",")]
    lambdas = [float(x) for x in args.dc.split(",")]
    scores: dict = {}
    started = time.perf_counter()
    sampling_seconds = 0.0
    for pid in test_ids:
        p = load_patient(args.data / pid, resample_mri=False)
        mask = p.quality_mask & p.brain_mask
        keep = [z for z in range(p.shape[2]) if mask[:, :, z].mean() >= 0.05]
        names = list(p.maps)
        hr_vols = [V.Volume(p.maps[n], p.affine, n) for n in names]
        t1, flair = V.Volume(p.t1, p.mri_affine), V.Volume(p.flair, p.mri_affine)
        mask_vol = V.Volume(mask.astype(np.uint8), p.affine)
        for s in scales:
            m = int(round(64 / s))
            lr = [simulate_lr(h, m) for h in hr_vols]
            outputs = {"zero-filled": None, "bicubic": None}
            for lam in lambdas:
                res = super_resolve(lr, t1, flair, mask_vol, model=model, samples=args.samples, seed=0,
                                    data_consistency=lam, bf16=True)
                sampling_seconds += res.timings["sample_s"]
                label = "FTDDM" if lam == 0 else f"FTDDM + DC λ={lam:g}"
                outputs[label] = res.sr.data
                outputs["zero-filled"] = res.zero_filled.data
            outputs["bicubic"] = np.stack([V.from_slices(baselines.bicubic(V.to_slices(v.data, 2)), 2)
                                           for v in lr], axis=-1)
            for c, name in enumerate(names):
                gt = p.maps[name] * mask
                for z in keep:
                    for method, out in outputs.items():
                        r = metrics.all_metrics(gt[:, :, z], out[:, :, z, c] * mask[:, :, z], mask[:, :, z])
                        for k, v in r.items():
                            scores.setdefault(f"{s:g}", {}).setdefault(method, {}).setdefault(k, []).append(v)
        print(f"{pid} done ({time.perf_counter() - started:.0f} s)", flush=True)

    table = {s: {meth: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                        for k, v in d.items()} for meth, d in by.items()} for s, by in scores.items()}
    result = {"model": str(args.model), "data": str(args.data), "fold": args.fold, "test_patients": test_ids,
              "samples": args.samples, "sampler": "dpmpp K=10 (default)", "bf16": True,
              "seconds": round(time.perf_counter() - started), "sampling_seconds": round(sampling_seconds),
              "metrics": table}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"Held-out test patients {', '.join(result['test_patients'])} (fold {result['fold']}), "
             f"{result['samples']} samples, {result['sampler']}; mean ± std over maps "
             "(whole-map metrics as published; SSIM-in-mask in the last column).", "",
             "| s | method | PSNR (dB) | SSIM | NRMSE | SSIM in mask | maps |", "|---|---|---|---|---|---|---|"]
    for s, by in result["metrics"].items():
        for meth, d in by.items():
            lines.append(f"| {s} | {meth} | {d['psnr']['mean']:.2f} ± {d['psnr']['std']:.2f} | "
                         f"{d['ssim']['mean']:.3f} ± {d['ssim']['std']:.3f} | {d['nrmse']['mean']:.3f} | "
                         f"{d['ssim_mask']['mean']:.3f} | {d['psnr']['n']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
