"""Benchmark: NFE and wall time to super-resolve one 64×64×39 exam × 7 metabolites (273 maps) on this machine.

Run: .venv/bin/python bench/speed.py [--model PATH] [--out bench/speed.json]
A 16×16×39 LR exam of a synthetic patient goes through the user's path (ftddm_core.pipeline.super_resolve);
timings are of that call (geometry + sampling), measured once each in one process, after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ftddm_core import volume as V
from ftddm_core.demo import simulate_lr
from ftddm_core.model import DEFAULT_MODEL, FTDDM, load_model
from ftddm_core.phantom import make_patient
from ftddm_core.pipeline import super_resolve

CASES = [  # (label, options)
    ("dpmpp K=10, 1 sample, fp32", dict(sampler="dpmpp", steps=10, samples=1)),
    ("dpmpp K=10, 1 sample, bf16", dict(sampler="dpmpp", steps=10, samples=1, bf16=True)),
    ("dpmpp K=10, 8 samples (uncertainty), bf16", dict(sampler="dpmpp", steps=10, samples=8, bf16=True)),
    ("ancestral Ttrunc=100 (paper), 1 sample, bf16", dict(sampler="ancestral", samples=1, bf16=True)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("speed.json"))
    ap.add_argument("--cases", default="all", help="comma-separated case indices, or all")
    args = ap.parse_args()
    if args.model is None and not DEFAULT_MODEL.exists():
        model, model_name = FTDDM("compact").eval(), "compact (random weights: timing only)"
    else:
        model, model_name = load_model(args.model, device="cpu"), str(args.model or DEFAULT_MODEL.name)
    patient = make_patient(2024, slices=39)
    lr = [simulate_lr(V.Volume(m, patient.affine, name), 16) for name, m in patient.maps.items()]
    t1, flair = V.Volume(patient.t1, patient.mri_affine), V.Volume(patient.flair, patient.mri_affine)
    mask = V.Volume(patient.quality_mask.astype("uint8"), patient.affine)
    super_resolve(lr, t1, flair, mask, model=model, samples=1, steps=2, max_batch=64)  # warm-up
    chosen = range(len(CASES)) if args.cases == "all" else [int(i) for i in args.cases.split(",")]
    rows = []
    for i in chosen:
        label, opts = CASES[i]
        t0 = time.perf_counter()
        out = super_resolve(lr, t1, flair, mask, model=model, max_batch=64, **opts)
        total = time.perf_counter() - t0
        rows.append({"case": label, "options": opts, "maps": out.timings["maps"], "nfe_per_sample": out.nfe,
                     "network_calls": out.network_calls, "seconds_total": round(total, 1),
                     "seconds_sampling": round(out.timings["sample_s"], 1)})
        print(f"{label:<48} NFE {out.nfe:>4}  {total:7.1f} s", flush=True)
    result = {"exam": "64×64×39 × 7 metabolites (LR 16×16×39, s = 4)", "model": model_name,
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "processor": platform.processor(), "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d"), "results": rows}
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
