"""The studies of `ftddm evaluate`, one object each: its run points, rows, figure, CSVs and report section.

A study is planned with the methods (its specs are resolved and cached like theirs) and analysed after them,
from the ReportContext of the finished runs (ctx.result / ctx.metric_rows by spec name and scale).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import figures
from ..uncertainty import scale_of
from . import prose
from .maps import MODEL_UNITS
from .methods import HEADLINE_DDPM, REFERENCE, RunSpec
from .options import EvaluateOptions
from .stats import calibration
from .tables import md_table, mean_metric, num, write_csv

if TYPE_CHECKING:
    from .report import ReportContext
    from .runs import LoadedModel

TAU_D_VALUES = (0.0, 0.3, 0.6, 0.9, 1.0)  # Fig. 7
T_TRUNC_VALUES = (0, 10, 20, 50, 100)  # Fig. 5 (0 = flow only)


class Study:
    """One study: `specs()` to run, `rows()` from their results, a figure, CSVs and `markdown()` for the report."""

    name = ""
    heading = ""

    def __init__(self, opts: EvaluateOptions, models: dict[str, LoadedModel], methods: dict[str, RunSpec]):
        self.opts = opts
        self.points: list[RunSpec] = []  # the study's run points, set by each study

    def specs(self) -> list[RunSpec]:
        return list(self.points)

    def scales(self, spec: RunSpec) -> tuple[float, ...]:
        """The factors a spec of this study runs at (every evaluated one unless the study says otherwise)."""
        return self.opts.scales

    def rows(self, ctx: ReportContext) -> tuple[list[dict], list[str]]:
        """(result rows, notes on skipped points)."""
        raise NotImplementedError

    def figure(self, rows: list[dict], ctx: ReportContext, path: Path) -> Path:
        raise NotImplementedError

    def write_csvs(self, out_dir: Path, rows: list[dict]) -> None:
        write_csv(out_dir / f"study_{self.name}.csv", rows)

    def intro(self) -> str:
        raise NotImplementedError

    def table(self, rows: list[dict]) -> list[str]:
        raise NotImplementedError

    def run(self, ctx: ReportContext, fig_dir: Path) -> tuple[list[dict], list[str], Path | None]:
        """(rows, notes, figure path or None) once the study's runs are done."""
        rows, notes = self.rows(ctx)
        return rows, notes, self.figure(rows, ctx, fig_dir / f"{self.name}.png") if rows else None

    def markdown(self, rows: list[dict], notes: list[str], figure: str | None) -> list[str]:
        """The study's report section: heading, what it measures, its table, notes and figure (relative link)."""
        lines = [self.heading, "", self.intro()] + (["", *self.table(rows)] if rows else [])
        lines += [""] + [f"- {n}" for n in notes] if notes else []
        if figure is not None:
            lines += ["", f"![{self.name}]({figure})"]
        return lines + [""]


class TauDStudy(Study):
    """Fidelity vs sharpness over τ_d (paper Fig. 7): the ancestral chain from the flow at the model's Ttrunc."""

    name, heading = "tau_d", prose.TAU_D_HEADING

    def __init__(self, opts, models, methods):
        super().__init__(opts, models, methods)
        main = models.get("main")
        t_trunc = main.t_trunc if main else 100
        self.points = [RunSpec(f"tau_d_{v:g}", f"FTDDM ancestral, τ_d = {v:g}", "chain", "main", "ancestral", "flow",
                               t_start=t_trunc, tau_d=v) for v in TAU_D_VALUES]

    def rows(self, ctx):
        rows, notes = [], []
        for spec in self.points:
            _, why = ctx.study_resolved[spec.name]
            if why:
                notes.append(f"τ_d = {spec.tau_d:g} skipped: {why}")
                continue
            for s in self.opts.scales:
                res, mrows = ctx.result(spec.name, s), ctx.metric_rows(spec.name, s)
                rows.append({"scale": s, "tau_d": spec.tau_d, "nfe": res["nfe"], "samples": res["samples"],
                             **{k: mean_metric(mrows, k) for k in ("psnr", "ssim", "nrmse", "gradient_ratio",
                                                                   "high_frequency_ratio")}})
        return rows, notes

    def figure(self, rows, ctx, path):
        return figures.tau_d_plot(rows, path)

    def intro(self):
        return prose.TAU_D

    def table(self, rows):
        return [md_table(["s", "τ_d", "NFE", "PSNR", "SSIM", "NRMSE", "gradient ratio", "HF energy ratio"],
                         [[f"{r['scale']:g}", f"{r['tau_d']:g}", r["nfe"], f"{r['psnr']:.2f}", num(r["ssim"]),
                           num(r["nrmse"]), num(r["gradient_ratio"], 3), num(r["high_frequency_ratio"], 3)]
                          for r in rows])]


class ScaleMismatchStudy(Study):
    """The reference sampler conditioned on s' while the input was made with s (paper Fig. 6): every (s, s')."""

    name, heading = "scale_mismatch", prose.SCALE_MISMATCH_HEADING

    def __init__(self, opts, models, methods):
        super().__init__(opts, models, methods)
        ref = methods[REFERENCE]
        self.pairs = {(s, c): replace(ref, name=f"{REFERENCE}_s{s:g}_cond{c:g}", cond_scale=None if c == s else c,
                                      label=ref.label if c == s else f"{ref.label}, conditioned s' = {c:g}")
                      for s in opts.scales for c in opts.scales}
        self._actual = {spec.name: s for (s, _), spec in self.pairs.items()}

    def specs(self):
        return list(self.pairs.values())

    def scales(self, spec):
        return (self._actual[spec.name],)  # a point is one actual factor s

    def rows(self, ctx):
        rows, notes = [], []
        for (s, c), spec in self.pairs.items():
            _, why = ctx.study_resolved[spec.name]
            if why:
                notes.append(f"s' = {c:g} at s = {s:g} skipped: {why}")
                continue
            mrows = ctx.metric_rows(spec.name, s)
            rows.append({"actual_scale": s, "conditioned_scale": c, "psnr": mean_metric(mrows, "psnr"),
                         "ssim": mean_metric(mrows, "ssim"), "nrmse": mean_metric(mrows, "nrmse")})
        return rows, notes

    def figure(self, rows, ctx, path):
        return figures.scale_mismatch_plot(rows, path)

    def intro(self):
        return prose.SCALE_MISMATCH.format(reference=REFERENCE)

    def table(self, rows):
        conds = sorted({r["conditioned_scale"] for r in rows}, reverse=True)
        by = {(r["actual_scale"], r["conditioned_scale"]): r for r in rows}
        body = [[f"{s:g}"] + [num(by[(s, c)]["ssim"]) if (s, c) in by else "–" for c in conds]
                for s in sorted({r["actual_scale"] for r in rows}, reverse=True)]
        return ["SSIM:", "", md_table(["actual s \\ conditioned s'"] + [f"{c:g}" for c in conds], body)]


class TTruncStudy(Study):
    """Ancestral FTDDM from several truncation indices (paper Fig. 5); 0 = flow only, below Ttrunc re-noised."""

    name, heading = "t_trunc", prose.T_TRUNC_HEADING

    def __init__(self, opts, models, methods):
        super().__init__(opts, models, methods)
        self.points = [methods["flow_only"] if t == 0 else
                       RunSpec(f"t_trunc_{t}", f"FTDDM Ttrunc = {t} (ancestral)", "chain", "main", "ancestral",
                               "flow", t_start=t, tau_d=opts.tau_d) for t in T_TRUNC_VALUES]

    def rows(self, ctx):
        rows, notes = [], []
        for spec in self.points:
            resolved, why = ctx.study_resolved[spec.name]
            t = 0 if spec.kind == "flow" else spec.t_start
            if why:
                notes.append(f"Ttrunc = {t} skipped: {why}")
                continue
            for s in self.opts.scales:
                res, mrows = ctx.result(spec.name, s), ctx.metric_rows(spec.name, s)
                rows.append({"scale": s, "t_trunc": t, "start": resolved.start or "flow only", "nfe": res["nfe"],
                             "psnr": mean_metric(mrows, "psnr"), "ssim": mean_metric(mrows, "ssim"),
                             "nrmse": mean_metric(mrows, "nrmse")})
        return rows, notes

    def figure(self, rows, ctx, path):
        ddpm = {s: mean_metric(ctx.metric_rows(HEADLINE_DDPM, s), "ssim") for s in self.opts.scales
                if (HEADLINE_DDPM, s) in ctx.job_of}
        return figures.t_trunc_plot(rows, ddpm, path)

    def intro(self):
        return prose.T_TRUNC

    def table(self, rows):
        return [md_table(["s", "Ttrunc", "start", "NFE", "PSNR", "SSIM", "NRMSE"],
                         [[f"{r['scale']:g}", r["t_trunc"], r["start"], r["nfe"], f"{r['psnr']:.2f}",
                           num(r["ssim"]), num(r["nrmse"])] for r in rows])]


class CalibrationStudy(Study):
    """Per-voxel std of the reference sampler's samples against its absolute error: correlation, reliability."""

    name, heading = "calibration", prose.CALIBRATION_HEADING

    def __init__(self, opts, models, methods):
        super().__init__(opts, models, methods)
        self.spec = methods[REFERENCE]
        self.points = [self.spec]

    def rows(self, ctx):
        _, why = ctx.study_resolved[self.spec.name]
        if why:
            return [], [f"skipped: {why}"]
        if self.opts.samples < 2:
            return [], [f"skipped: per-voxel std needs --samples ≥ 2 (got {self.opts.samples})"]
        rows = []
        fitted = ctx.models["main"].model.uncertainty_calibration
        for s in self.opts.scales:
            d, res = ctx.data[s], ctx.result(self.spec.name, s)
            err = np.abs(res["mean"] - d.gt)[d.mask]
            rows.append({"scale": s, "method": self.spec.name, "samples": res["samples"],
                         **calibration(err, res["std"][d.mask]),
                         "calibration_scale": scale_of(fitted, s, res["samples"])})
        notes = [prose.CALIBRATION_FITTED.format(fitted_on=fitted.fitted_on, samples=fitted.samples)
                 if fitted is not None else prose.CALIBRATION_NONE]
        return rows, notes

    def figure(self, rows, ctx, path):
        return figures.calibration_plot(rows, path, units=MODEL_UNITS)

    def write_csvs(self, out_dir, rows):
        write_csv(out_dir / "study_calibration.csv", [{k: v for k, v in r.items() if k != "bins"} for r in rows])
        write_csv(out_dir / "study_calibration_bins.csv", [{"scale": r["scale"], **b} for r in rows for b in r["bins"]])

    def intro(self):
        return prose.CALIBRATION.format(samples=self.opts.samples, reference=REFERENCE)

    def table(self, rows):
        def ratio(r, c=1.0):
            return num(r["rmse"] / (c * r["mean_std"]), 3) if r["mean_std"] > 0 else "–"

        return [md_table(["s", "voxels", "Pearson r", "Spearman ρ", "RMSE", "mean std", "RMSE / mean std", "c",
                          "RMSE / (c · mean std)"],
                         [[f"{r['scale']:g}", r["n"], num(r["pearson"], 3), num(r["spearman"], 3), num(r["rmse"]),
                           num(r["mean_std"]), ratio(r), num(r["calibration_scale"], 3),
                           ratio(r, r["calibration_scale"])] for r in rows])]


STUDY_TYPES: dict[str, Callable[..., Study]] = {
    "tau_d": TauDStudy, "scale_mismatch": ScaleMismatchStudy, "t_trunc": TTruncStudy, "calibration": CalibrationStudy}


def build_studies(opts: EvaluateOptions, models: dict[str, Any], methods: dict[str, RunSpec]) -> dict[str, Study]:
    """The requested studies, in the fixed order of STUDIES (the order their runs are planned in)."""
    return {name: make(opts, models, methods) for name, make in STUDY_TYPES.items() if name in opts.studies}
