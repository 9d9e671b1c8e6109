"""`ftddm evaluate`'s plan: resolve every method and study point, dedupe the runs by cache key, run or load each
once, then measure every map and write the report."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..device import resolve_device
from .maps import dataset_fingerprint, load_test_maps, map_metrics, test_split
from .methods import MODEL_ROLES, RunSpec, method_specs, resolve_spec
from .options import EvaluateOptions
from .report import ReportContext, write_report
from .runs import Job, LoadedModel, cache_key, cache_path, execute, load_models, lpips_scorer, read_cache, write_cache
from .studies import Study, build_studies
from .tables import json_default

Progress = Callable[[int, int, str], None]


def run_evaluation(data_dir, model_path, out_dir, options: EvaluateOptions | None = None, *, ddpm_model=None,
                   regression_model=None, progress: Progress | None = None) -> dict[str, Any]:
    """`ftddm evaluate`: run (or load from cache) every method and study on the fold's test maps; write the report."""
    opts = options or EvaluateOptions()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data {data_dir}: not a folder; expected a dataset folder (see docs/dataset_format.md)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder; expected a report folder")
    started = time.perf_counter()
    device = resolve_device(opts.device)
    models = _load_checked_models(model_path, ddpm_model, regression_model, device, opts.scales)
    main = models["main"]
    recorded = main.training.get("data", {}) if isinstance(main.training, dict) else {}
    split_seed = opts.split_seed if opts.split_seed is not None else int(recorded.get("split_seed", 0) or 0)
    all_ids, test_ids = test_split(data_dir, opts.fold, split_seed)
    data = load_test_maps(data_dir, test_ids, opts.scales, opts.max_slices, int(main.model.config.unet.image_size))
    context = {"data": dataset_fingerprint(data_dir, test_ids), "fold": opts.fold, "split_seed": split_seed,
               "test": test_ids}

    methods = method_specs(opts.tau_d)
    resolved, skipped = _resolve_methods(opts.methods, methods, models)
    studies = build_studies(opts, models, methods)
    study_resolved, study_scales = _resolve_studies(studies, models)
    jobs: dict[str, Job] = {}
    job_of: dict[tuple[str, float], str] = {}  # (spec name, scale) → key

    def plan(spec: RunSpec, scale: float) -> None:  # identical runs (same cache key) are planned once
        key = cache_key(spec, data[scale], models, opts, context, device)
        jobs.setdefault(key, Job(spec, scale, key))
        job_of[(spec.name, scale)] = key

    for spec in resolved.values():
        for s in opts.scales:
            plan(spec, s)
    for name, (spec, why) in study_resolved.items():
        if why is None:
            for s in study_scales[name]:
                plan(spec, s)

    results = _run_jobs(jobs, data, models, opts, device, out_dir / "cache", progress)
    lpips_fn, lpips_note = lpips_scorer(device)
    ctx = ReportContext(opts=opts, data_dir=data_dir, out_dir=out_dir, models=models, data=data, test_ids=test_ids,
                        all_ids=all_ids, split_seed=split_seed, device=device, methods=resolved, skipped=skipped,
                        studies=studies, study_resolved=study_resolved, jobs=jobs, job_of=job_of, results=results,
                        job_metrics=_metrics_of_jobs(jobs, results, data, lpips_fn), lpips_note=lpips_note,
                        has_lpips=lpips_fn is not None)
    summary = write_report(ctx)
    summary["seconds"] = time.perf_counter() - started  # this invocation only (short when cached)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=json_default) + "\n")
    return summary


def _load_checked_models(model_path, ddpm_path, regression_path, device, scales) -> dict[str, LoadedModel]:
    """The models (load_models), each checked to be trained for the requested upscaling factors."""
    models = load_models(model_path, ddpm_path, regression_path, device)
    for lm in models.values():
        try:
            lm.model.check_scale(torch.tensor(scales))
        except ValueError as exc:
            raise ValueError(f"{MODEL_ROLES[lm.role]} {lm.path.name}: {exc}") from exc
    return models


def _resolve_methods(names, methods: dict[str, RunSpec], models) -> tuple[dict[str, RunSpec], dict[str, str]]:
    """(runnable resolved specs, why each other method is skipped), in the requested order."""
    resolved: dict[str, RunSpec] = {}
    skipped: dict[str, str] = {}
    for name in names:
        spec, why = resolve_spec(methods[name], models)
        if why:
            skipped[name] = why
        else:
            resolved[name] = spec
    return resolved, skipped


def _resolve_studies(studies: dict[str, Study], models):
    """Per study spec name: (resolved spec, why not runnable or None) and the factors it runs at."""
    resolved: dict[str, tuple[RunSpec, str | None]] = {}
    scales: dict[str, tuple[float, ...]] = {}
    for study in studies.values():
        for spec in study.specs():
            resolved[spec.name], scales[spec.name] = resolve_spec(spec, models), study.scales(spec)
    return resolved, scales


def _run_jobs(jobs: dict[str, Job], data, models, opts, device, cache_dir: Path, progress) -> dict[str, dict]:
    """Each job's outputs by cache key: loaded from the cache, else computed and cached."""
    results: dict[str, dict] = {}
    total = len(jobs)
    for done, job in enumerate(jobs.values()):
        path = cache_path(cache_dir, job.spec, job.scale, job.key)
        label = f"{job.spec.label} · s={job.scale:g}"
        if progress:
            progress(done, total, label)
        cached = read_cache(path, job.key)
        if cached is None:
            reporter = _step_reporter(progress, done, total, label)
            cached = execute(job.spec, data[job.scale], models, opts, device, reporter)
            write_cache(path, job.key, cached)
            cached = {**cached, "cached": False}
        results[job.key] = cached
    if progress:
        progress(total, total, "metrics and report")
    return results


def _metrics_of_jobs(jobs, results, data, lpips_fn) -> Callable[[str], list[dict]]:
    """key → per-map metric rows of that job's outputs (computed on first use, then kept)."""
    computed: dict[str, list[dict]] = {}

    def job_metrics(key: str) -> list[dict]:
        if key not in computed:
            d, mean = data[jobs[key].scale], results[key]["mean"]
            rows = []
            for i in range(len(d.ids)):
                row = map_metrics(d, i, mean[i])
                if lpips_fn is not None:
                    row["lpips"] = lpips_fn(d.gt[i], mean[i])
                rows.append(row)
            computed[key] = rows
        return computed[key]

    return job_metrics


def _step_reporter(progress: Progress | None, done: int, total: int, label: str):
    """Sampler callback → progress lines at about every 10% of a chain (chunk and step shown)."""
    if progress is None:
        return None

    def report(info):
        every = max(1, int(info["total"]) // 10)
        if info["step"] % every == 0 or info["step"] == info["total"] - 1:
            chunk = f"chunk {info['chunk'] + 1}/{info['chunks']} " if "chunk" in info else ""
            progress(done, total, f"{label} · {chunk}step {info['step'] + 1}/{info['total']}")

    return report

