"""The report of `ftddm evaluate`: per-map and per-method rows, Wilcoxon tests, studies, panels and the headline
answer, written as CSVs, figures, report.md (see markdown) and the summary."""
from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, figures
from ..atomic import atomic_write_text
from ..uncertainty import scale_of
from .maps import METRICS, MODEL_UNITS, ScaleData
from .markdown import report_markdown
from .methods import HEADLINE_DDPM, MODEL_ROLES, NFE_FACTOR, REFERENCE, SSIM_MARGIN, RunSpec, parameters_of
from .options import EvaluateOptions
from .runs import Job, LoadedModel
from .stats import aggregate, finite_stats, wilcoxon_table
from .studies import Study
from .tables import display_path, write_csv


@dataclass
class ReportContext:
    """Everything the report is made of: the options, data, models, the plan and the finished runs."""

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
    studies: dict[str, Study]
    study_resolved: dict[str, tuple[RunSpec, str | None]]
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

    def from_cache(self) -> int:
        """How many runs were loaded from the cache."""
        return sum(bool(r.get("cached")) for r in self.results.values())

    def compute_seconds(self) -> float:
        """Wall time of all runs as recorded when each was computed (a re-run from the cache keeps the original)."""
        return sum(float(r.get("seconds", 0.0)) for r in self.results.values())


def write_report(ctx: ReportContext) -> dict[str, Any]:
    """Write CSVs, figures and report.md; returns the summary (also written to summary.json)."""
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
    for name in opts.studies:
        rows, notes, fig = ctx.studies[name].run(ctx, fig_dir)
        study_out[name], study_notes[name] = rows, notes
        if rows:
            ctx.studies[name].write_csvs(out, rows)
        if fig is not None:
            figs[name] = fig

    # --- qualitative panels -----------------------------------------------------------------------------
    for s in opts.scales:
        cols = _panel_columns(ctx, s)
        if len(cols) > 1:
            d = ctx.data[s]
            pid, z, met = d.ids[panel_map(d)]
            figs[f"panels_s{s:g}"] = figures.panels(cols, fig_dir / f"panels_s{s:g}.png",
                                                    title=f"s = {s:g} ({_panel_lr_text(d)})", units=MODEL_UNITS,
                                                    metabolite=met, slice_label=f"{pid} slice {z}",
                                                    mask=d.mask[panel_map(d)])

    headline = headline_answer(method_rows, tests, ctx)
    text = report_markdown(ctx, method_rows, gt_kspace, tests, study_out, study_notes, figs, headline)
    atomic_write_text(out / "report.md", text)
    return {"report": str(out / "report.md"), "version": __version__, "headline": headline,
            "options": asdict(opts), "device": str(ctx.device), "test_patients": ctx.test_ids,
            "maps_per_scale": {f"{s:g}": len(d.ids) for s, d in ctx.data.items()},
            "models": {r: {"path": display_path(m.path), "sha256": m.sha256, "config": m.model.config.name,
                           "t_trunc": m.t_trunc, "num_timesteps": m.last_index + 1} for r, m in ctx.models.items()},
            "methods": method_rows, "skipped": ctx.skipped, "wilcoxon": tests,
            "studies": {k: v for k, v in study_out.items()}, "figures": {k: str(v) for k, v in figs.items()},
            "kspace_error_ground_truth": {f"{s:g}": v[0] for s, v in gt_kspace.items()},
            "lpips": ctx.lpips_note, "jobs": len(ctx.jobs),
            "jobs_from_cache": ctx.from_cache(),
            "compute_seconds": ctx.compute_seconds()}  # recorded time of every run, cached ones included


def _lr_range(d: ScaleData) -> str:
    """'m' or 'min–max' of the per-slice LR sizes max(m1, m2) (methods.csv of tiled data)."""
    sizes = [max(m) for m in d.lr_shapes]
    return f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}–{max(sizes)}"


def _panel_lr_text(d: ScaleData) -> str:
    """The panel title's LR size: 'LR m² → 64²' (legacy) or ScaleData.lr_text (tiles)."""
    return f"LR {d.lr_size}² → 64²" if not d.tiled else d.lr_text


PANEL_METHODS = ("zero_filled", "bicubic", "regression", "flow_only", HEADLINE_DDPM, "ftddm_anc_100", REFERENCE)


def panel_map(d: ScaleData) -> int:
    """The map shown in the panels: the one with the largest mask."""
    return int(np.argmax(d.mask.reshape(len(d.ids), -1).sum(1)))


def _panel_columns(ctx: ReportContext, s: float) -> list[tuple[str, np.ndarray, str]]:
    """(title, image, colour role) columns for the panel map at scale s (model space: HR·M / norm)."""
    d = ctx.data[s]
    if not d.ids:
        return []
    i = panel_map(d)
    cols = [("ground truth", d.gt[i], "map")]
    for name in PANEL_METHODS:
        if name in ctx.methods:
            cols.append((_short(ctx.methods[name].label), ctx.result(name, s)["mean"][i], "map"))
    if REFERENCE in ctx.methods:
        ref = ctx.result(REFERENCE, s)
        c = scale_of(ctx.models["main"].model.uncertainty_calibration, s, ref["samples"])
        cols.append(("FTDDM − GT", ref["mean"][i] - d.gt[i], "error"))
        cols.append((f"FTDDM uncertainty\n({c:.3g} × std, {ref['samples']} samples)", c * ref["std"][i],
                     "uncertainty"))
    return cols


def _short(label: str) -> str:
    """A method label for a panel title: its part before any parenthesis, wrapped to the panel's width."""
    head = label.split(" (")[0] if not label.startswith("(") else label
    return textwrap.fill(head.replace(", re-noised flow start", " re-noised"), 22)


def headline_answer(method_rows: list[dict], tests: list[dict], ctx: ReportContext) -> dict[str, Any]:
    """Is FTDDM's default sampler (REFERENCE) within 0.01 SSIM of full-chain DDPM at ≥ 10× fewer NFE?"""
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

