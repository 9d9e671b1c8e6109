"""Issue 10, next step: a shorter chain from the re-noised flow mode, compared on fold 0's VALIDATION patients.

In the committed test evaluation, `ftddm_anc_20` (the flow's mode re-noised to t = 20, ancestral chain, NFE 21)
is within 0.5 dB of the regression and sharper at every scale. Any default built on it must be chosen on
validation maps, never on the test ones. This script compares, on the validation patients recorded in the model
card (30 tiles per factor, as the evaluation takes of the test patients; 3 samples, seed 0), PSNR, SSIM and the
∇ ratio (1 = as sharp as the truth) of the regression, the flow start with DPM-Solver++ K = 10 (the default
then) and re-noised starts at t = 5, 10 and 20. Its result made the re-noised t = 10 ancestral chain the default.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m bench.short_chain_validation --data runs/invivo50
     (about 5 minutes on one core) → bench/short_chain_validation.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ftddm_core.atomic import atomic_write_text
from ftddm_core.device import generator as make_generator
from ftddm_core.evaluation.maps import map_metrics
from ftddm_core.evaluation.runs import validation_maps
from ftddm_core.evaluation.tables import display_path
from ftddm_core.model import DEFAULT_MODEL, FTDDM, file_sha256
from ftddm_core.options import SuperResolveOptions

#: (name, sample() keywords) of the re-noised chains compared
RENOISED = [(f"renoised_t{t}_ancestral", dict(sampler="ancestral", start="renoised", t_trunc=t)) for t in (5, 10, 20)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--data", type=Path, required=True, help="the dataset the model was trained on")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("short_chain_validation.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = FTDDM.load(args.model)
    factors = (8.0, 4.0, 2.0)
    validation, data = validation_maps(args.model, args.data, factors, 30)
    opts = SuperResolveOptions()
    flow_dpmpp = dict(sampler="dpmpp", start="flow", steps=10, tau_f=opts.tau_f)  # the default before this study
    variants = [("regression", dict(sampler="regression")), ("flow_dpmpp_10", flow_dpmpp), *RENOISED]
    rows = []
    for f in factors:
        d = data[f]
        for name, kw in variants:
            extra = {} if kw["sampler"] == "regression" else dict(
                tau_d=opts.tau_d, n_samples=3, generator=make_generator(torch.device("cpu"), 0))
            res = model.sample(d.cond, torch.as_tensor(d.cond_scale, dtype=torch.float32), force_scale=True,
                               max_batch=16, **kw, **extra)
            mean = res.mean[:, 0].numpy()
            per_map = [map_metrics(d, i, mean[i]) for i in range(len(d.ids))]
            row = {"factor": f, "variant": name, "nfe": res.nfe, "maps": len(d.ids),
                   **{k: float(np.nanmean([m[k] for m in per_map])) for k in ("psnr", "ssim", "gradient_ratio")}}
            rows.append(row)
            print(f"F = {f:g}  {name:24s} NFE {res.nfe:3d}  PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.4f}  "
                  f"∇ ratio {row['gradient_ratio']:.3f}", flush=True)
    report = {"model": display_path(args.model), "model_sha256": file_sha256(args.model),
              "validation_patients": validation, "samples": 3, "seed": 0, "rows": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
