"""Issue 10: why DPM-Solver++ from noise (the probability-flow ODE) stays below DDPM respaced to 100.

On fold 0's VALIDATION patients of the full-chain comparison model (runs/ddpm_fold0; 20 tiles per factor, one
sample per map, seed 0) this measures two things:

1. Whether the gap is the solver's discretisation: the ODE at K = 100 with index and logSNR spacing, at K = 300,
   and DPM-Solver++(3M), against the stochastic chains (DDPM respaced to 100, SDE-DPM-Solver++(2M) K = 100).
   If the ODE variants agree with each other, the solver has converged and the gap is the model's ODE.
2. How the model's ε̂ deviates from the true noise by index t (x_t = q_sample(x0, t, ε⊙M) of the ground truth):
   the regression slope <ε̂, ε>/|ε|² (1 = unbiased) and the relative error |ε̂ − ε|/|ε|. The ground-truth maps
   carry their own fine texture, so a small added noise cannot be told from it and ε̂ shrinks at low t; an ODE
   has no fresh noise to correct such errors, while an ancestral step re-draws them.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m bench.ode_gap --data runs/invivo50   (about 10 minutes on one core)
     → bench/ode_gap.json
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
from ftddm_core.model import FTDDM, file_sha256

CHAINS = [
    ("ddpm_respaced_100", dict(sampler="respaced", steps=100, tau_d=1.0)),
    ("sde_dpmpp_2m_100", dict(sampler="dpmpp-sde", steps=100, tau_d=1.0)),
    ("ode_dpmpp_2m_100", dict(sampler="dpmpp", steps=100)),
    ("ode_dpmpp_2m_100_logsnr", dict(sampler="dpmpp", steps=100, spacing="logsnr")),
    ("ode_dpmpp_2m_300", dict(sampler="dpmpp", steps=300)),
    ("ode_dpmpp_3m_100", dict(sampler="dpmpp-3m", steps=100)),
]
EPS_INDICES = (0, 1, 3, 10, 20, 50, 100, 200, 400, 700, 990)


def chain_rows(model: FTDDM, data, factor: float) -> list[dict]:
    d = data[factor]
    scale = torch.as_tensor(d.cond_scale, dtype=torch.float32)
    rows = []
    for name, kw in CHAINS:
        res = model.sample(d.cond, scale, force_scale=True, max_batch=16, start="noise", n_samples=1,
                           generator=make_generator(torch.device("cpu"), 0), **kw)
        out = res.mean[:, 0].numpy()
        per_map = [map_metrics(d, i, out[i]) for i in range(len(d.ids))]
        row = {"factor": factor, "chain": name, "nfe": res.nfe, "maps": len(d.ids),
               **{k: float(np.nanmean([m[k] for m in per_map])) for k in ("psnr", "ssim", "gradient_ratio")}}
        print(f"F = {factor:g}  {name:26s} NFE {res.nfe:3d}  PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.4f}  "
              f"∇ ratio {row['gradient_ratio']:.3f}", flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def eps_rows(model: FTDDM, data, factor: float) -> list[dict]:
    d = data[factor]
    scale = torch.as_tensor(d.cond_scale, dtype=torch.float32)
    mask = d.cond[:, 1:2]
    x0 = torch.as_tensor(d.gt, dtype=torch.float32)[:, None]
    x0_enc, _ = model.encode(d.cond, scale)
    denoiser = model.denoiser(d.cond, x0_enc, scale)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for t in EPS_INDICES:
        eps = torch.randn(x0.shape, generator=generator) * mask
        index = torch.full((len(x0),), t, dtype=torch.long)
        eps_hat = denoiser(model.schedule.q_sample(x0, index, eps), index) * mask
        rows.append({"factor": factor, "t": t, "slope": float((eps_hat * eps).sum() / (eps * eps).sum()),
                     "relative_error": float((eps_hat - eps).norm() / eps.norm())})
        print(f"F = {factor:g}  t = {t:3d}  <ε̂,ε>/|ε|² {rows[-1]['slope']:.3f}  "
              f"|ε̂−ε|/|ε| {rows[-1]['relative_error']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ddpm-model", type=Path, default=Path("runs/ddpm_fold0/model.safetensors"))
    ap.add_argument("--data", type=Path, required=True, help="the dataset the model was trained on")
    ap.add_argument("--maps", type=int, default=20, help="validation tiles per factor")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("ode_gap.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = FTDDM.load(args.ddpm_model)
    factors = (8.0, 4.0, 2.0)
    validation, data = validation_maps(args.ddpm_model, args.data, factors, args.maps)
    chains = [row for f in factors for row in chain_rows(model, data, f)]
    eps = [row for f in factors for row in eps_rows(model, data, f)]
    report = {"model": display_path(args.ddpm_model), "model_sha256": file_sha256(args.ddpm_model),
              "validation_patients": validation, "samples": 1, "seed": 0, "chains": chains, "eps_hat": eps}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
