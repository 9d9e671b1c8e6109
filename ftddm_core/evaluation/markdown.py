"""report.md: the sections of the evaluation report, filled from the prose templates (prose.py)."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import __version__
from . import prose
from .methods import MODEL_ROLES, NFE_FACTOR, REFERENCE, SSIM_MARGIN
from .tables import DIGITS, md_table, mean_metric, num, pm

if TYPE_CHECKING:
    from .report import ReportContext
    from .runs import LoadedModel

# Where a headline gap comes from: a longer chain from the same re-noised start, the paper's flow start, and the
# start itself (flow only vs zero-filling). Each is an SSIM difference between two methods.
GAP_PROBES = (("a longer re-noised chain: t = 20 − t = 10", "ftddm_anc_20", REFERENCE),
              ("the paper's flow start: ancestral from Ttrunc − re-noised t = 10", "ftddm_anc_100", REFERENCE),
              ("the flow start itself: flow only − zero-filling", "flow_only", "zero_filled"))
METHOD_METRICS = ("nrmse", "psnr", "ssim", "nrmse_mask", "psnr_mask", "ssim_mask", "kspace_error", "gradient_ratio",
                  "high_frequency_ratio")


def report_markdown(ctx: ReportContext, method_rows, gt_kspace, tests, study_out, study_notes, figs,
                    headline) -> str:
    """The whole report.md text."""
    rel = lambda p: Path(p).relative_to(ctx.out_dir).as_posix()  # noqa: E731
    L = _header(ctx) + _data_and_models(ctx) + _headline(ctx, headline)
    L += _methods(ctx, method_rows, gt_kspace, figs, rel) + _wilcoxon(tests)
    L += ["", prose.STUDIES_HEADING, ""]
    if not ctx.opts.studies:
        L.append(prose.NO_STUDIES)
    for name in ctx.opts.studies:
        L += ctx.studies[name].markdown(study_out.get(name, []), study_notes.get(name, []),
                                        rel(figs[name]) if name in figs else None)
    panels = [k for k in figs if k.startswith("panels_")]
    if panels:
        L += ["", prose.PANELS_HEADING, "", prose.PANELS]
        L += [f"\n![{k}]({rel(figs[k])})" for k in panels]
    L += ["", prose.NOTES_HEADING, ""] + [f"- {n}" for n in notes(ctx)]
    L += ["", prose.FILES_HEADING, "", prose.FILES]
    return "\n".join(L) + "\n"


def _header(ctx) -> list[str]:
    opts = ctx.opts
    return [prose.TITLE, "",
            prose.RUNS.format(version=__version__, device=ctx.device, bf16=prose.BF16 if opts.bf16 else "",
                              runs=len(ctx.jobs), cached=ctx.from_cache()), "",
            prose.COMPUTE.format(minutes=ctx.compute_seconds() / 60, machine=machine_line(ctx.device))]


def _data_and_models(ctx) -> list[str]:
    opts, main = ctx.opts, ctx.models["main"]
    counts = ", ".join(f"s={s:g}: {len(d.ids)}" for s, d in ctx.data.items())
    L = ["", prose.DATA_HEADING, "",
         prose.DATASET.format(data_dir=ctx.data_dir, patients=len(ctx.all_ids), fold=opts.fold,
                              folds=min(5, len(ctx.all_ids)), split_seed=ctx.split_seed, test=", ".join(ctx.test_ids)),
         prose.MAPS.format(counts=counts, subset=prose.SUBSET.format(max_slices=opts.max_slices)
                           if opts.max_slices else prose.SUBSET_ALL),
         prose.SAMPLES.format(samples=opts.samples, seed=opts.seed, tau_d=opts.tau_d, tau_f=opts.tau_f)]
    recorded = main.training.get("data", {}) if isinstance(main.training, dict) else {}
    if recorded.get("test") and recorded.get("fold") == opts.fold and list(recorded["test"]) != list(ctx.test_ids):
        L.append(prose.SPLIT_WARNING.format(recorded=recorded["test"], fold=opts.fold, test=ctx.test_ids))
    L += ["", md_table(["role", "file", "sha256", "config", "T", "Ttrunc", "encoder params", "UNet params",
                        "flow params", "training"],
                       [[MODEL_ROLES[r], f"`{m.path.name}`", f"`{m.sha256[:12]}`", m.model.config.name,
                         m.last_index + 1, m.t_trunc, m.parameters("encoder"), m.parameters("unet"),
                         m.parameters("flow"), training_line(m)]
                        for r, m in ctx.models.items()])]
    if "ddpm" not in ctx.models:
        L.append(prose.NO_DDPM_MODEL.format(flag=MODEL_ROLES["ddpm"]))
    if "regression" not in ctx.models:  # FTDDM v2 (resolve_spec): the encoder is the one-pass regression
        L.append(prose.NO_REGRESSION_MODEL.format(flag=MODEL_ROLES["regression"]))
    return L


def _headline(ctx, headline) -> list[str]:
    L = ["", prose.HEADLINE_HEADING, "",
         prose.QUESTION.format(reference=REFERENCE, margin=SSIM_MARGIN, factor=NFE_FACTOR), ""]
    if headline["answer"] == "not evaluated":
        return L + [prose.NOT_ANSWERED.format(reason=headline["reason"])]
    L += [prose.ANSWER.format(answer=headline["answer"], margin=SSIM_MARGIN, factor=NFE_FACTOR), ""]
    L.append(md_table(["s", "FTDDM SSIM", "DDPM SSIM", "Δ SSIM", "NFE (FTDDM / DDPM)", "NFE ratio",
                       "Wilcoxon p (SSIM)", "s/map (FTDDM / DDPM)", f"within {SSIM_MARGIN}"],
                      [[f"{r['scale']:g}", num(r["ftddm_ssim"]), num(r["ddpm_ssim"]), f"{r['ssim_difference']:+.4f}",
                        f"{r['ftddm_nfe']} / {r['ddpm_nfe']}", f"{r['nfe_ratio']:.1f}×", num(r["wilcoxon_p"], 3),
                        f"{r['ftddm_s_per_map']:.3g} / {r['ddpm_s_per_map']:.3g}",
                        "yes" if r["within_margin"] else "no"] for r in headline["per_scale"]]))
    ftddm, ddpm = training_line(ctx.models["main"]), training_line(ctx.models["ddpm"])
    L += ["", prose.BOTH_MODELS.format(ftddm=ftddm, ddpm=ddpm, caveat="" if ftddm == ddpm else prose.NOT_SAME_TRAINING),
          prose.MEANS_OVER.format(counts=", ".join(f"s={k}: {v}" for k, v in headline["n_maps"].items()))]
    return L + gap_diagnosis(ctx, headline)


def _methods(ctx, method_rows, gt_kspace, figs, rel) -> list[str]:
    L = ["", prose.METHODS_HEADING, "", prose.METHODS_LEGEND]
    lpips = ["LPIPS"] if ctx.has_lpips else []
    cols = ["method", "model", "NFE", "flow", "s/map", "params", "NRMSE", "PSNR", "SSIM", "NRMSE (M)", "PSNR (M)",
            "SSIM (M)", "k-space err", "∇ ratio", "HF ratio"] + lpips
    for s in ctx.opts.scales:
        rows = [r for r in method_rows if r["scale"] == s]
        if not rows:
            continue
        L += ["", prose.SCALE_HEADING.format(scale=s, lr_text=ctx.data[s].lr_text, n=len(ctx.data[s].ids)), ""]
        body = [[r["label"], r["model"], r["nfe"], r["flow_passes"], f"{r['seconds_per_map']:.3g}",
                 f"{r['parameters']:,}"] + [pm(r[f"{k}_mean"], r[f"{k}_std"], DIGITS[k]) for k in METHOD_METRICS]
                + ([pm(r["lpips_mean"], r["lpips_std"], 4)] if lpips else []) for r in rows]
        gm, gsd, _ = gt_kspace[s]
        body.append([prose.GROUND_TRUTH_ROW] + ["–"] * 11 + [pm(gm, gsd, 4), "1", "1"] + (["–"] if lpips else []))
        L.append(md_table(cols, body))
    if ctx.skipped:
        L += ["", prose.SKIPPED, ""] + [f"- `{k}`: {v}" for k, v in ctx.skipped.items()]
    L += ["", f"- {ctx.lpips_note}"]
    if "quality_vs_nfe" in figs:
        L += ["", f"![SSIM vs NFE]({rel(figs['quality_vs_nfe'])})"]
    return L


def _wilcoxon(tests) -> list[str]:
    L = ["", prose.WILCOXON_HEADING, ""]
    if not tests:
        return L + [prose.WILCOXON_NOT_COMPUTED.format(reference=REFERENCE)]
    ssim = [t for t in tests if t["metric"] == "ssim"]
    psnr = {(t["scale"], t["method"]): t for t in tests if t["metric"] == "psnr"}
    return L + [prose.WILCOXON.format(reference=REFERENCE), "",
                md_table(["s", "method", "n", "Δ SSIM", "p (SSIM)", "Δ PSNR", "p (PSNR)"],
                         [[f"{t['scale']:g}", t["method"], t["n"], f"{t['median_difference']:+.4f}",
                           num(t["p_value"], 3), f"{psnr[(t['scale'], t['method'])]['median_difference']:+.2f}",
                           num(psnr[(t['scale'], t['method'])]["p_value"], 3)] for t in ssim])]


def gap_diagnosis(ctx, headline: dict[str, Any]) -> list[str]:
    """For the scales outside the margin: SSIM differences that localise the gap (solver, chain or start)."""
    failing = [r for r in headline.get("per_scale", []) if not r["within_margin"]]
    probes = [(label, a, b) for label, a, b in GAP_PROBES if a in ctx.methods and b in ctx.methods]
    if not failing or not probes:
        return []

    def probe(a, b, s):
        if (a, s) not in ctx.job_of or (b, s) not in ctx.job_of:
            return "–"
        return f"{mean_metric(ctx.metric_rows(a, s), 'ssim') - mean_metric(ctx.metric_rows(b, s), 'ssim'):+.4f}"

    rows = [[f"{r['scale']:g}", f"{r['ssim_difference']:+.4f}"] + [probe(a, b, r["scale"]) for _, a, b in probes]
            for r in failing]
    return ["", prose.GAP, "", md_table(["s", "FTDDM − DDPM"] + [label for label, _, _ in probes], rows)]


def notes(ctx: ReportContext) -> list[str]:
    """What is approximate, and how to read the report."""
    opts = ctx.opts
    out = [n.format(t_trunc=ctx.models["main"].t_trunc, tau_d=opts.tau_d, tau_f=opts.tau_f, max_batch=opts.max_batch,
                    split_seed=ctx.split_seed) for n in prose.NOTES]
    if any(d.tiled for d in ctx.data.values()):
        out.append(prose.TILES_NOTE.format(tile=next(iter(ctx.data.values())).gt.shape[-1],
                                           outside=sum(int((~d.mask_in_tile).sum()) for d in ctx.data.values()),
                                           total=sum(len(d.ids) for d in ctx.data.values())))
    if opts.bf16:
        out.append(prose.BF16_NOTE)
    return out


def training_line(lm: LoadedModel) -> str:
    """The training a model file records: dataset, fold, split seed and iterations."""
    d = lm.training.get("data", {}) if isinstance(lm.training, dict) else {}
    if not d:
        return prose.NO_TRAINING_RECORD
    return prose.TRAINING.format(dataset=Path(str(d.get("dataset", "?"))).name, fold=d.get("fold", "?"),
                                 split_seed=d.get("split_seed", "?"), step=lm.training.get("step", "?"))


def machine_line(device) -> str:
    """Where the timings come from: CPU model and torch threads, or the GPU's name."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{device} on {cpu}, {torch.get_num_threads()} torch threads"
