"""Benchmark (issue 13): wall time of one 64×64×39 exam × 7 metabolites (273 maps) on this machine, in one run.

Run: OMP_NUM_THREADS=2 .venv/bin/python -m bench.speed [--model PATH] [--out bench/speed.json] [--cases 0,1]
A 16×16×39 LR exam of a synthetic patient goes through the user's path (ftddm_core.pipeline.super_resolve);
each case is that call (geometry + sampling) timed once, after one warm-up, in one process. Reported with the
CPU (model, torch's kernel capability, bf16 features), torch threads, the machine's load average before and
after, NFE and network calls per case, the issue's goals, and the ratios to the paper's ancestral chain (NFE
101, timed on the whole exam) and to a 1000-step DDPM (the same ε-UNet from noise, every index: timed on the
first DDPM_SUBSET maps of the exam and extrapolated linearly to all of them — stated as extrapolated).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.invivo_kinds import cpu_model
from ftddm_core import volume as V
from ftddm_core.atomic import atomic_write_text
from ftddm_core.demo import simulate_lr
from ftddm_core.device import cpu_features, generator as make_generator
from ftddm_core.model import DEFAULT_MODEL, FTDDM, load_model
from ftddm_core.phantom import make_patient
from ftddm_core.pipeline import super_resolve

DEFAULT_8 = "default (ancestral, re-noised t=10), 8 samples (SR + uncertainty)"
DEFAULT_1 = "default (ancestral, re-noised t=10), 1 sample"
ANCESTRAL = "paper: ancestral from the flow at Ttrunc=100 (NFE 101), 1 sample"
CASES = [  # (label, options): precision and max_batch are the defaults (auto) unless named; short cases first
    (DEFAULT_1, dict(samples=1)),
    ("default, 1 sample, max_batch 64 (the v1 setting)", dict(samples=1, max_batch=64)),
    ("default, 1 sample, bf16 asked", dict(samples=1, precision="bf16")),
    ("dpmpp K=10 from the flow (the previous default), 1 sample", dict(sampler="dpmpp", start="flow", samples=1)),
    ("dpmpp-3m K=5 from the flow, 1 sample", dict(sampler="dpmpp-3m", start="flow", steps=5, samples=1)),
    (DEFAULT_8, dict(samples=8)),
    ("dpmpp K=10 from the flow, 8 samples", dict(sampler="dpmpp", start="flow", samples=8)),
    (ANCESTRAL, dict(sampler="ancestral", start="flow", samples=1)),
]
GOALS_S = {DEFAULT_8: 240.0, DEFAULT_1: 30.0}  # issue 13: ≤ 4 min with 8 samples, ≤ 30 s with 1, on 2 cores
DDPM_SUBSET = 16  # maps of the exam timed for the 1000-step DDPM (one CPU network batch)


class RecordingModel:
    """The model with its sample() inputs kept: the DDPM-1000 subset runs on the exam's own conditions."""

    def __init__(self, model):
        self.model, self.inputs = model, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def to(self, device):
        self.model = self.model.to(device)
        return self

    def eval(self):
        self.model.eval()
        return self

    def sample(self, cond, scale, **kw):
        self.inputs = (cond, scale)
        return self.model.sample(cond, scale, **kw)


def machine() -> dict:
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "torch": torch.__version__}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def time_ddpm_1000(model, cond, scale, maps_in_exam: int) -> dict:
    """A 1000-step ancestral DDPM from noise (the ε-UNet at every index) on DDPM_SUBSET maps, extrapolated."""
    n = min(DDPM_SUBSET, len(cond))
    started = time.perf_counter()
    result = model.sample(cond[:n], scale[:n], sampler="ancestral", start="noise", n_samples=1, max_batch=n,
                          generator=make_generator(torch.device("cpu"), 0), force_scale=True)
    seconds = time.perf_counter() - started
    return {"case": "DDPM-1000 from noise (ancestral, NFE 1000), 1 sample", "maps_timed": n,
            "nfe_per_sample": result.nfe, "seconds_subset": round(seconds, 1),
            "seconds_extrapolated_to_exam": round(seconds * maps_in_exam / n, 1), "extrapolated": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("speed.json"))
    ap.add_argument("--cases", default="all", help="comma-separated case indices, or all (the DDPM-1000 subset "
                                                   "runs with all)")
    args = ap.parse_args()
    if args.model is None and not DEFAULT_MODEL.exists():
        model, model_name = FTDDM("compact").eval(), "compact (random weights: timing only)"
    else:
        model, model_name = load_model(args.model, device="cpu"), str(args.model or DEFAULT_MODEL.name)
    model = RecordingModel(model)
    patient = make_patient(2024, slices=39)
    lr = [simulate_lr(V.Volume(m, patient.affine, name), 16) for name, m in patient.maps.items()]
    t1, flair = V.Volume(patient.t1, patient.mri_affine), V.Volume(patient.flair, patient.mri_affine)
    mask = V.Volume(patient.quality_mask.astype("uint8"), patient.affine)
    load_before = load_average()
    super_resolve(lr, t1, flair, mask, model=model, samples=1, t_trunc=2)  # warm-up
    chosen = range(len(CASES)) if args.cases == "all" else [int(i) for i in args.cases.split(",")]
    rows, seconds = [], {}
    result = {"exam": "64×64×39 × 7 metabolites (LR 16×16×39, s = 4)", "model": model_name, "machine": machine(),
              "load_average_before": load_before, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "results": rows, "ratios": {}}
    for i in chosen:
        label, opts = CASES[i]
        t0 = time.perf_counter()
        out = super_resolve(lr, t1, flair, mask, model=model, **opts)
        seconds[label] = total = time.perf_counter() - t0
        row = {"case": label, "options": opts, "maps": out.timings["maps"], "nfe_per_sample": out.nfe,
               "network_calls": out.network_calls, "seconds_total": round(total, 1),
               "seconds_sampling": round(out.timings["sample_s"], 1), "precision": out.options["precision_used"],
               "max_batch": out.options["max_batch_used"]}
        if label in GOALS_S:
            row["goal_s"], row["meets_goal"] = GOALS_S[label], total <= GOALS_S[label]
        rows.append(row)
        print(f"{label:<52} NFE {out.nfe:>4}  {total:7.1f} s", flush=True)
        result["load_average_after"] = load_average()
        atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False))  # what is done so far
    if args.cases == "all":
        cond, scale = model.inputs
        ddpm = time_ddpm_1000(model.model, cond, scale, len(cond))
        print(f"{ddpm['case']:<52} NFE 1000  {ddpm['seconds_extrapolated_to_exam']:7.1f} s (extrapolated "
              f"from {ddpm['maps_timed']} maps)", flush=True)
        result["ddpm_1000"] = ddpm
        result["ratios"] = {"paper_ancestral_over_default_1_sample": round(seconds[ANCESTRAL] / seconds[DEFAULT_1], 1),
                            "ddpm_1000_over_default_1_sample (extrapolated)":
                                round(ddpm["seconds_extrapolated_to_exam"] / seconds[DEFAULT_1], 1)}
    result["load_average_after"] = load_average()
    atomic_write_text(args.out, json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
