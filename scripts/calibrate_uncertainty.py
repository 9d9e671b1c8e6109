"""Fit the uncertainty map's σ-scaling factor c of a model on its VALIDATION patients (never the test ones).

The model's default sampler (the options of `ftddm super-resolve`, samples = its default 8) runs on up to
--max-maps tiles per factor of the validation patients recorded in the model card (the same tiles the
evaluation takes of the test patients); c = RMSE / mean std over the in-mask voxels of each factor (applied
linear in log s between them) and of all factors together (ftddm_core.uncertainty). Writes the fit as JSON
and, with --write, stores it in the model file's metadata (tensors and everything else unchanged; the file's
sha256 changes, so re-run its evaluations) and in the model card JSON beside it.

Run: PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python scripts/calibrate_uncertainty.py --data runs/invivo50 \
         --out bench/calibrate_uncertainty.json [--write]          (about 2 minutes on one core)
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ftddm_core.atomic import atomic_write_text
from ftddm_core.checkpoint import read_safetensors
from ftddm_core.device import generator as make_generator
from ftddm_core.evaluation.runs import validation_maps
from ftddm_core.model import DEFAULT_MODEL, FTDDM, file_sha256
from ftddm_core.options import SuperResolveOptions
from ftddm_core.uncertainty import UncertaintyCalibration, fit_std_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--data", type=Path, required=True, help="the dataset the model was trained on")
    ap.add_argument("--factors", default="8,4,2")
    ap.add_argument("--max-maps", type=int, default=30, help="tiles per factor, evenly spread (as evaluate)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--write", action="store_true", help="store c in the model file's metadata")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = FTDDM.load(args.model)
    factors = [float(f) for f in args.factors.split(",")]
    validation, data = validation_maps(args.model, args.data, factors, args.max_maps)
    opts = SuperResolveOptions()
    flow_index = model.config.diffusion.t_trunc
    errors, stds, per_factor = [], [], {}
    for f in factors:
        d = data[f]
        res = model.sample(d.cond, torch.as_tensor(d.cond_scale, dtype=torch.float32), force_scale=True,
                           **opts.sample_kwargs(flow_index), max_batch=16,
                           generator=make_generator(torch.device("cpu"), opts.seed))
        m = d.mask
        e, s = (res.mean[:, 0].numpy() - d.gt)[m], res.std[:, 0].numpy()[m]
        per_factor[f"{f:g}"] = round(fit_std_scale(e, s), 4)
        errors.append(e), stds.append(s)
        print(f"F = {f:g}: {len(d.ids)} maps, RMSE / mean std = {per_factor[f'{f:g}']}", flush=True)
    scale = fit_std_scale(np.concatenate(errors), np.concatenate(stds))
    cal = UncertaintyCalibration(
        scale=round(scale, 4), sampler=opts.sampler, steps=opts.steps, tau_f=opts.tau_f, tau_d=opts.tau_d,
        samples=opts.samples, per_factor=per_factor, start=opts.start,
        t_trunc=0 if opts.start == "flow" else opts.chain_start(flow_index),
        fitted_on=f"{sum(len(data[f].ids) for f in factors)} tiles of the {len(validation)} validation patients "
                  f"(F = {args.factors})")
    print(f"c = {cal.scale}")
    report = {"model": str(args.model.name), "model_sha256_before": file_sha256(args.model),
              "validation": validation, "calibration": asdict(cal)}
    if args.write:
        model.uncertainty_calibration = cal
        model.save(args.model, overwrite=True, extra=_kept_metadata(args.model))
        report["model_sha256_after"] = file_sha256(args.model)
        sidecar = args.model.with_suffix(".json")  # the model card beside the shipped weights
        if sidecar.is_file():
            shown = json.loads(sidecar.read_text())
            shown["uncertainty_calibration"] = {**asdict(cal), "fit": "scripts/calibrate_uncertainty.py"}
            atomic_write_text(sidecar, json.dumps(shown, indent=2, ensure_ascii=False))
    atomic_write_text(args.out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def _kept_metadata(path: Path) -> dict:
    """Everything a model file records besides what FTDDM.save writes itself (the model card, `ftddm train`'s
    training record …), so that storing c loses nothing."""
    written_by_save = ("config", "format", "uncertainty_calibration")
    return {k: json.loads(v) for k, v in read_safetensors(path)[1].items() if k not in written_by_save}


if __name__ == "__main__":
    main()
