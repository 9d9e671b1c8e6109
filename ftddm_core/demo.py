"""`ftddm demo`: a synthetic patient → low resolution → all metabolites super-resolved → NIfTIs, figure, metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import baselines, kspace, metrics, volume as vol
from .phantom import make_patient

FIGURE_METABOLITES = ("NAA", "tCho")


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
    """Run the whole product on one unseen synthetic patient and report metrics against its ground truth."""
    from .pipeline import SuperResolveOptions, run_super_resolve

    out = Path(out)
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
    plot_demo(patient, out, fig, lr_size)
    summary = {"patient": patient.patient_id, "lr_size": lr_size, "samples": samples,
               "nfe_per_sample": report["nfe_per_sample"], "seconds": time.perf_counter() - t0,
               "sampling_seconds": report["timings"]["sample_s"], "metrics": table, "figure": str(fig)}
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=2))
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


def plot_demo(patient, out: Path, path: Path, lr_size: int) -> Path:
    """Paper Fig. 3-style panel for the lesion slice: FLAIR, zero-filled, FTDDM, ground truth, |error|, uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax((patient.lesion > 0).sum(axis=(0, 1)))) if patient.lesion is not None else patient.shape[2] // 2
    flair = vol.resample_to_grid(vol.Volume(patient.flair, patient.mri_affine), patient.affine, patient.shape)
    m = patient.quality_mask[:, :, z]
    cols = ("FLAIR", f"zero-filled {lr_size}²", "FTDDM", "ground truth", "|FTDDM − GT|", "uncertainty (std)")
    fig, axes = plt.subplots(len(FIGURE_METABOLITES), len(cols), figsize=(2.2 * len(cols), 2.4 * len(FIGURE_METABOLITES)))
    show = lambda a: np.rot90(a)  # noqa: E731  (i → right, j → up, as radiological axial view of RAS data)
    for r, name in enumerate(FIGURE_METABOLITES):
        gt = patient.maps[name][:, :, z] * m
        sr = vol.load_volume(out / f"{name}_sr.nii.gz").data[:, :, z]
        zf = vol.load_volume(out / f"{name}_zerofilled.nii.gz").data[:, :, z]
        unc = vol.load_volume(out / f"{name}_uncertainty.nii.gz").data[:, :, z]
        vmax = float(np.percentile(gt[m], 99.5)) if m.any() else float(gt.max())
        images = (flair[:, :, z], zf * m, sr, gt, np.abs(sr - gt), unc)
        for c, (title, img) in enumerate(zip(cols, images)):
            ax = axes[r, c]
            if c == 0:
                ax.imshow(show(img), cmap="gray")
            elif c < 4:
                ax.imshow(show(img), cmap="jet", vmin=0, vmax=vmax)
            else:
                ax.imshow(show(img), cmap="magma", vmin=0, vmax=0.5 * vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(f"{name} (mM)")
    fig.tight_layout()
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
