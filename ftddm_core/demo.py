"""`ftddm demo`: a synthetic patient → low resolution → all metabolites super-resolved → NIfTIs, figure, metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import baselines, kspace, metrics, volume as vol
from .atomic import atomic_write_text
from .phantom import make_patient

FIGURE_METABOLITES = ("NAA", "tCho")
#: Units of the legacy phantom's maps (concentrations), which the demo runs on.
UNITS = "mM"


def simulate_lr(hr: vol.Volume, lr_size: int, axis: int = 2) -> vol.Volume:
    """The LR volume a scanner would give: in-plane k-space truncation to lr_size², magnitude, LR affine.

    The LR grid is the sample-aligned coarse grid of the HR one (volume.target_grid inverts it exactly).
    """
    slices = vol.to_slices(hr.data, axis)
    lr = np.abs(kspace.downsample(slices, lr_size)).astype(np.float32)
    n = hr.shape[vol.inplane_axes(axis)[0]]
    affine = hr.affine.copy()
    for a in vol.inplane_axes(axis):
        affine[:3, a] *= n / lr_size
        affine[:3, 3] -= affine[:3, a] * vol.hr_origin_index(lr_size, n)
    return vol.Volume(vol.from_slices(lr, axis), affine, hr.path)


def run_demo(out: str | Path, *, model_path=None, overwrite: bool = False, seed: int = 1234, samples: int = 4,
             lr_size: int = 16, progress=None) -> dict:
    """Run the whole product on one unseen synthetic patient and report metrics against its ground truth.

    Interrupted (Ctrl-C, SIGTERM), it removes every file it had written in `out` and the folders it made, and
    says so in the KeyboardInterrupt it re-raises.
    """
    out = Path(out)
    before = _files_under(out)
    folders_before = {p for p in [out, out / "inputs"] if p.exists()}
    try:
        return _run_demo(out, model_path, overwrite, seed, samples, lr_size, progress)
    except KeyboardInterrupt as exc:
        removed, replaced = _remove_written(out, before, folders_before)
        note = f"removed the {removed} files this demo had written in {out}"
        if replaced:
            note += f" ({replaced} had replaced files of an earlier run, which are gone)"
        raise KeyboardInterrupt(note) from exc


def _files_under(folder: Path) -> dict[Path, tuple[int, int]]:
    """Every file below `folder` with (inode, mtime_ns): what was there before this run."""
    if not folder.is_dir():
        return {}
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _remove_written(out: Path, before: dict, folders_before: set) -> tuple[int, int]:
    """Delete the files that are new or changed since `before`, then the folders this run made if empty."""
    removed = replaced = 0
    for path, stamp in _files_under(out).items():
        if before.get(path) != stamp:
            path.unlink(missing_ok=True)
            removed += 1
            replaced += path in before
    for folder in (out / "inputs", out):
        if folder not in folders_before and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed, replaced


def _run_demo(out: Path, model_path, overwrite: bool, seed: int, samples: int, lr_size: int, progress) -> dict:
    from .options import SuperResolveOptions
    from .pipeline import run_super_resolve

    t0 = time.perf_counter()
    patient = make_patient(seed, patient_id=f"demo-{seed}")
    inputs = out / "inputs"
    lr_paths = []
    for name, hr in patient.maps.items():
        lr = simulate_lr(vol.Volume(hr, patient.affine, name), lr_size)
        lr_paths.append(vol.save_volume(lr, inputs / f"{name}.nii.gz", overwrite=overwrite))
    t1 = vol.save_volume(vol.Volume(patient.t1, patient.mri_affine), inputs / "t1.nii.gz", overwrite=overwrite)
    flair = vol.save_volume(vol.Volume(patient.flair, patient.mri_affine), inputs / "flair.nii.gz", overwrite=overwrite)
    mask = vol.save_volume(vol.Volume(patient.quality_mask.astype(np.uint8), patient.affine), inputs / "mask.nii.gz",
                           overwrite=overwrite)
    print(f"synthetic patient {patient.patient_id}: {len(lr_paths)} metabolites, {patient.shape[2]} slices, "
          f"LR {lr_size}×{lr_size} → 64×64 (s = {64 / lr_size:g})")

    opts = SuperResolveOptions(samples=samples)
    report = run_super_resolve(lr_paths, out, t1=t1, flair=flair, mask=mask, model_path=model_path, options=opts,
                               overwrite=overwrite, progress=progress)
    if progress is not None and hasattr(progress, "close"):
        progress.close()

    table = evaluate_outputs(patient, out, lr_size)
    fig = out / "demo_figure.png"
    plot_demo(patient, out, fig, lr_size, samples=samples)
    summary = {"patient": patient.patient_id, "lr_size": lr_size, "samples": samples,
               "uncertainty": report["uncertainty"],
               "nfe_per_sample": report["nfe_per_sample"], "seconds": time.perf_counter() - t0,
               "sampling_seconds": report["timings"]["sample_s"], "metrics": table, "figure": str(fig)}
    atomic_write_text(out / "demo_metrics.json", json.dumps(summary, indent=2))
    print(format_table(table))
    print(f"\nNFE per sample {report['nfe_per_sample']}, {samples} samples, sampling "
          f"{report['timings']['sample_s']:.1f} s, total {summary['seconds']:.1f} s")
    print(f"figure: {fig}\noutputs: {out}")
    return summary


def evaluate_outputs(patient, out: Path, lr_size: int) -> dict:
    """Mean masked metrics per method over every slice and metabolite (ground truth = HR ⊙ quality mask)."""
    scores: dict[str, dict[str, list]] = {}
    m = patient.quality_mask
    for name, hr in patient.maps.items():
        gt = hr * m
        sr = vol.load_volume(out / f"{name}_sr.nii.gz").data
        zf = vol.load_volume(out / f"{name}_zerofilled.nii.gz").data
        lr = vol.load_volume(out / "inputs" / f"{name}.nii.gz").data
        bic = vol.from_slices(baselines.bicubic(vol.to_slices(lr, 2)), 2)
        for z in range(gt.shape[2]):
            if m[:, :, z].sum() < 0.05 * m[:, :, z].size:
                continue
            for method, img in (("zero-filled", zf), ("bicubic", bic), ("FTDDM", sr)):
                res = metrics.all_metrics(gt[:, :, z], img[:, :, z] * m[:, :, z])
                for k, v in res.items():
                    scores.setdefault(method, {}).setdefault(k, []).append(v)
    return {meth: {k: float(np.mean(v)) for k, v in d.items()} for meth, d in scores.items()}


def format_table(table: dict) -> str:
    lines = [f"{'method':<14}{'PSNR (dB)':>11}{'SSIM':>8}{'NRMSE':>8}", "-" * 41]
    for meth, d in table.items():
        lines.append(f"{meth:<14}{d['psnr']:>11.2f}{d['ssim']:>8.3f}{d['nrmse']:>8.3f}")
    return "\n".join(lines)


def plot_demo(patient, out: Path, path: Path, lr_size: int, samples: int = 2) -> Path:
    """Paper Fig. 3-style panel for the lesion slice: FLAIR, zero-filled, FTDDM, ground truth, error, uncertainty.

    Radiological convention (patient-left on the viewer's right) with L/R markers, the metabolite and slice
    position in mm named, voxels outside the quality mask in grey. Per metabolite: one stated map window
    (0 … 99.5th percentile of the ground truth in the mask) for the three maps, the signed error FTDDM − truth
    on a symmetric window ±x (diverging) and the std on 0 … x (sequential), x = figures.error_limit of both;
    every colour bar names its quantity, its units (UNITS) and its window.
    """
    from . import figures as F

    plt = F._pyplot()
    z = int(np.argmax((patient.lesion > 0).sum(axis=(0, 1)))) if patient.lesion is not None else patient.shape[2] // 2
    position = F.slice_position_mm(patient.affine, patient.shape, 2, z)
    flair = vol.resample_to_grid(vol.Volume(patient.flair, patient.mri_affine), patient.affine, patient.shape)
    m = patient.quality_mask[:, :, z] > 0
    cols = ("FLAIR", f"zero-filled {lr_size}²", "FTDDM", "ground truth", "FTDDM − truth", "uncertainty")
    fig, axes = plt.subplots(len(FIGURE_METABOLITES), len(cols), figsize=(2.4 * len(cols), 2.7 * len(FIGURE_METABOLITES)),
                             squeeze=False, constrained_layout=True)
    for r, name in enumerate(FIGURE_METABOLITES):
        gt = patient.maps[name][:, :, z]
        sr = vol.load_volume(out / f"{name}_sr.nii.gz").data[:, :, z]
        zf = vol.load_volume(out / f"{name}_zerofilled.nii.gz").data[:, :, z]
        unc = vol.load_volume(out / f"{name}_uncertainty.nii.gz", allow_all_zero=True).data[:, :, z]
        vmax = float(np.percentile(gt[m], 99.5)) if m.any() else float(gt.max()) or 1.0
        x = F.error_limit([sr - gt, unc], m, fallback=0.5 * vmax)
        mri = flair[:, :, z]
        mri_window = (float(np.percentile(mri, 0.5)), float(np.percentile(mri, 99.5)))
        roles = {"mri": (mri_window, F.ANATOMY_CMAP, "FLAIR (a.u.), 0.5–99.5th percentile"),
                 "map": ((0.0, vmax), F.MAP_CMAP, F.map_label(name, UNITS, (0.0, vmax))),
                 "error": ((-x, x), F.ERROR_CMAP, F.error_label(UNITS, x, "FTDDM − truth")),
                 "uncertainty": ((0.0, x), F.UNCERTAINTY_CMAP, F.uncertainty_label(UNITS, x))}
        panels = (("mri", mri, None), ("map", zf, m), ("map", sr, m), ("map", gt, m), ("error", sr - gt, m),
                  ("uncertainty", unc, m))
        images = {}
        for c, (role, img, mask) in enumerate(panels):
            window, cmap, _ = roles[role]
            images[role] = F.map_panel(axes[r, c], img, patient.affine, 2, window=window, cmap=cmap,
                                       title=cols[c] if c == 0 else f"{name}: {cols[c]}", mask=mask)
        if samples < 2:
            axes[r, 5].text(0.5, 0.5, "undefined\n(1 sample)", transform=axes[r, 5].transAxes, ha="center",
                            va="center", color="w", fontsize=8)
        for role, where, fraction, shrink in (("mri", axes[r, 0], 0.05, 1.0), ("map", list(axes[r, 1:4]), 0.025, 0.8),
                                              ("error", axes[r, 4], 0.05, 1.0),
                                              ("uncertainty", axes[r, 5], 0.05, 1.0)):
            F.colour_bar(fig, images[role], where, roles[role][2], fraction=fraction, shrink=shrink, pad=0.01)
        axes[r, 0].set_ylabel(f"{name}\n{position}", fontsize=8)
    fig.suptitle(f"{', '.join(FIGURE_METABOLITES)}: radiological view (patient-left on the right), slice {z} at "
                 f"{position}; grey: outside the quality mask", fontsize=8)
    return F._save(fig, path, dpi=110)
