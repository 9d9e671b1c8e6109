"""Profile (issue 13): per-operator CPU time of the exam path, split into SR encoder, flow, ε-UNet and the rest.

Run: OMP_NUM_THREADS=2 .venv/bin/python -m bench.profile_v2 [--metabolites 7] [--samples 1] [--max-batch 0]
The exam of bench/speed.py (or its first metabolites) goes through ftddm_core.pipeline.super_resolve under
torch.profiler; the three networks are labelled by wrapping them in record_function here (the library is
not instrumented). Prints the labelled totals and the top operators; bench/profile_v2.txt is a summary of it.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ftddm_core import volume as V
from ftddm_core.demo import simulate_lr
from ftddm_core.model import load_model
from ftddm_core.phantom import make_patient
from ftddm_core.pipeline import super_resolve


def labelled(fn, label: str):
    def run(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--metabolites", type=int, default=7)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=0, help="0 = auto")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    model = load_model(None, device="cpu")
    patient = make_patient(2024, slices=39)
    maps = list(patient.maps.items())[:args.metabolites]
    lr = [simulate_lr(V.Volume(m, patient.affine, name), 16) for name, m in maps]
    t1, flair = V.Volume(patient.t1, patient.mri_affine), V.Volume(patient.flair, patient.mri_affine)
    mask = V.Volume(patient.quality_mask.astype("uint8"), patient.affine)
    super_resolve(lr, t1, flair, mask, model=model, samples=1, steps=2, max_batch=args.max_batch)  # warm-up
    model.encode = labelled(model.encode, "ENCODER")
    model.flow_sample = labelled(model.flow_sample, "FLOW")
    model.unet.forward = labelled(model.unet.forward, "EPS_UNET")
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("SUPER_RESOLVE"):
        out = super_resolve(lr, t1, flair, mask, model=model, samples=args.samples, max_batch=args.max_batch)
    print(f"wall {time.perf_counter() - started:.1f} s, timings {out.timings}, torch threads "
          f"{torch.get_num_threads()}, max_batch used {out.options['max_batch_used']}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
