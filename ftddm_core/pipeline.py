"""Super-resolve real volumes: geometry → model space → FTDDM sampling → volumes in physical units.

The stable Python API used by the CLI, the Slicer module and console scripts is :func:`super_resolve`;
:func:`run_super_resolve` adds file I/O, run reports and ratio maps for `ftddm super-resolve`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import kspace, masks, prep, volume as vol
from .atomic import atomic_write_text, deferred_interrupts
from .device import auto_batch, autocast, choose_precision, generator as make_generator, resolve_device
from .options import SuperResolveOptions
from .uncertainty import describe as describe_calibration

Progress = Callable[[int, int, str], None]


@dataclass
class SuperResolution:
    """Outputs on the model grid, in the input's physical units, channels as in the input."""

    sr: vol.Volume
    zero_filled: vol.Volume
    uncertainty: vol.Volume
    mask: vol.Volume
    grid: vol.ModelGrid
    nfe: int  # network evaluations per sample chain
    network_calls: int  # all batched network calls of the run
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    uncertainty_calibration: dict = field(default_factory=dict)  # uncertainty.describe: c and what it was fitted on


def as_volume(image, name: str) -> vol.Volume:
    """Accept a Volume, a path, a SimpleITK image or an (array, affine) pair."""
    if isinstance(image, vol.Volume):
        return image
    if isinstance(image, (str, Path)):
        return vol.load_volume(image)
    if isinstance(image, tuple) and len(image) == 2:
        return vol.volume_from_array(image[0], image[1], name)
    try:
        import SimpleITK as sitk

        if isinstance(image, sitk.Image):
            return vol.from_sitk(image, name)
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"{name}: expected a Volume, a file path, a SimpleITK image or an (array, affine) pair, "
                     f"got {type(image).__name__}")


def _lr_stack(lr) -> tuple[vol.Volume, list[str]]:
    """One 4D LR volume (metabolites last) from one volume or a list on one grid, plus channel names.

    A 4D volume with one channel (X, Y, Z, 1), as some scanners store a single map, is treated as 3D.
    """
    items = list(lr) if isinstance(lr, (list, tuple)) and not (
        len(lr) == 2 and isinstance(lr[0], np.ndarray)) else [lr]
    volumes = [as_volume(v, f"lr[{i}]") for i, v in enumerate(items)]
    if len(volumes) == 1:
        v = volumes[0]
        if v.data.ndim == 4 and v.n_channels == 1:
            v = vol.Volume(v.data[..., 0], v.affine, v.path)
        names = [v.name] if v.data.ndim == 3 else [f"{v.name}[{c}]" for c in range(v.n_channels)]
        data = v.data if v.data.ndim == 4 else v.data[..., None]
        return vol.Volume(data, v.affine, v.path), names
    if any(v.data.ndim != 3 for v in volumes):
        raise ValueError("several LR inputs must each be 3D (one metabolite per file)")
    return vol.stack_channels(volumes), [v.name for v in volumes]


#: A map is refused as signed when its negative voxels carry more than this share of its total |value|: the
#: model is trained on non-negative concentrations, while a few negative voxels (fit noise) are harmless.
SIGNED_SHARE_LIMIT = 0.25


def negative_share(data: np.ndarray) -> float:
    """Σ|negative values| / Σ|values| of a map (0 for an all-zero map)."""
    data = np.real(np.asarray(data, dtype=np.complex128 if np.iscomplexobj(data) else np.float64))
    total = float(np.abs(data).sum())
    return float(-data[data < 0].sum()) / total if total > 0 else 0.0


def check_not_signed(lr_vol: vol.Volume, names: Sequence[str]) -> None:
    """Refuse a map that is mostly negative (a difference or z-score map): the model cannot super-resolve it."""
    data = lr_vol.data if lr_vol.data.ndim == 4 else lr_vol.data[..., None]
    for c, name in enumerate(names):
        share = negative_share(data[..., c])
        if share > SIGNED_SHARE_LIMIT:
            raise ValueError(f"{name}: negative voxels carry {100 * share:.0f}% of the map's signal (limit "
                             f"{100 * SIGNED_SHARE_LIMIT:.0f}%); FTDDM is trained on non-negative concentration "
                             "maps and cannot super-resolve a signed (difference or z-score) map — super-resolve "
                             "the maps it is computed from, then subtract")


def zero_filled_in_input_units(lr_slices: np.ndarray, size) -> np.ndarray:
    """The zero-filled LR maps (…, n1, n2) on the target grid `size` (int or (n1, n2)) in the input's sign and
    units: the real part of the centred k-space zero-fill (a real map's band-limited interpolant is real)."""
    return np.real(kspace.zero_fill(lr_slices, size)).astype(np.float32)


def super_resolve(lr, t1=None, flair=None, mask=None, *, model, options: SuperResolveOptions | None = None,
                  progress: Progress | None = None, **overrides) -> SuperResolution:
    """Super-resolve LR metabolite volume(s) with FTDDM; T1/FLAIR/mask in any geometry (resampled physically).

    lr: a volume (3D, or 4D with metabolites last) or a list of 3D volumes on one grid, each a Volume, path,
    SimpleITK image or (array, affine). Options as :class:`SuperResolveOptions` fields, e.g. tau_d=0.7.
    Returns SR (mean of `samples` draws), zero-filled and uncertainty (per-voxel std) on the target grid
    (volume.target_grid: each in-plane axis m → round(F·m) with ``factor`` F, or 64×64 for a square m ≤ 32
    by default), always 4D (channels last).
    """
    opts = options or SuperResolveOptions()
    if overrides:
        opts = SuperResolveOptions(**{**asdict(opts), **overrides})
    t_start = time.perf_counter()
    lr_vol, names = _lr_stack(lr)
    check_not_signed(lr_vol, names)
    if t1 is None or flair is None:
        raise ValueError("FTDDM is conditioned on the patient's T1 and FLAIR: pass both (t1=…, flair=…)")
    t1_vol, flair_vol = as_volume(t1, "t1"), as_volume(flair, "flair")

    # --- geometry: slice axis, target grid (any m1×m2, each in-plane axis refined on its own) ---------
    axis = vol.slice_axis(lr_vol, None if opts.slice_axis < 0 else opts.slice_axis)
    # The trained 64×64 grid is only the default output of a square matrix (no --factor); the networks run
    # on any n1×n2 (model.sample pads to their multiple and crops back).
    default_size = int(model.config.unet.image_size)
    grid = vol.target_grid(lr_vol, axis, default_size, factor=opts.factor,
                           scale_range=tuple(model.config.scale_range), force=opts.force)
    # s = the physical in-plane upscaling: F, or the geometric mean of n_a/m_a when round(F·m_a) is inexact.
    s_cond = opts.scale or grid.factor
    size = grid.inplane  # (n1, n2)
    (m1, m2), (n1, n2) = grid.lr_inplane, grid.inplane

    # --- MRI and mask on the model grid ---------------------------------------------------------------
    user_mask = None
    if mask is not None:
        m_vol = as_volume(mask, "mask") if not isinstance(mask, (str, Path)) else vol.load_volume(mask, allow_all_zero=True)
        user_mask = vol.resample_mask(m_vol, grid.affine, grid.shape)
        if not user_mask.any():
            raise ValueError(f"{m_vol.name}: the quality mask is empty on the MRSI grid (no voxel to super-resolve)")
    # MRI scaled over the whole target volume, exactly as the training data (data.py) does.
    t1_g, flair_g = vol.prepare_mri(t1_vol, flair_vol, grid.affine, grid.shape, target_name=lr_vol.name)

    # --- model space: one derivation shared with training (prep.model_inputs) -------------------------
    lr_slices = vol.to_slices(lr_vol.data, axis)  # (C, N, m1, m2)
    n_chan, n_slices = lr_slices.shape[:2]
    lr_zf_all = zero_filled_in_input_units(lr_slices, size)
    if user_mask is not None:
        mask_slices = vol.to_slices(user_mask, axis)
    else:  # automatic: brain from T1 ∧ MRSI support of any metabolite
        cell = (n1 / m1, n2 / m2)  # HR pixels per LR voxel: the support is cleaned at the LR voxel scale
        support = np.any([masks.signal_support(c, 0, cell=cell) for c in lr_zf_all], axis=0)
        mask_slices = support & vol.to_slices(masks.brain_mask(t1_g, axis), axis)
    t1_s, flair_s = vol.to_slices(t1_g, axis), vol.to_slices(flair_g, axis)
    conds, intensities = [], []
    for c in range(n_chan):
        cond, intensity, _ = prep.model_inputs(lr_slices[c], mask_slices, t1_s, flair_s, size)
        conds.append(cond)
        intensities.append(intensity)
    cond = torch.cat(conds)  # (C·N, 4, n1, n2), metabolite-major
    norm = np.concatenate(intensities)  # per-map intensity scale: model space × norm = input units
    active = np.flatnonzero((norm > 0) & (cond[:, 1].flatten(1).sum(1).numpy() > 0))
    t_prep = time.perf_counter()

    # --- sampling -------------------------------------------------------------------------------------
    device = resolve_device(opts.device)
    model = model.to(device).eval()
    mean = torch.zeros(len(cond), 1, n1, n2)
    std = torch.zeros_like(mean)
    nfe, calls = 0, 0
    precision = choose_precision(device, "bf16" if opts.bf16 else opts.precision)
    max_batch = auto_batch(device, opts.max_batch, n1 * n2)
    flow_index = int(model.config.diffusion.t_trunc)  # the flow's index Ttrunc: no chain starts above it
    chain_start = opts.chain_start(flow_index)
    if len(active):
        gen = make_generator(device, opts.seed)
        kw = dict(opts.sample_kwargs(flow_index), generator=gen, max_batch=max_batch)
        sub = cond[active].to(device)
        if opts.data_consistency > 0:
            # Real images: keep only the Hermitian-paired (odd) block per axis; an even block's edge line has
            # no partner inside it, so replacing it and then taking the real part would not be consistent.
            block = tuple(m if m % 2 else m - 1 for m in (m1, m2))
            measured = kspace.truncate_kspace(kspace.fft2c(kspace.zero_fill(
                lr_slices.reshape(-1, m1, m2)[active], size)), block) / norm[active, None, None]
            kw.update(data_consistency=opts.data_consistency,
                      measured_kspace=torch.as_tensor(measured, dtype=torch.complex64, device=device)[:, None])

        def report(info):
            if progress:
                done = int(info["chunk"]) * int(info["total"]) + int(info["step"])
                progress(done, int(info["chunks"]) * int(info["total"]), f"{len(active)} maps × {opts.samples} samples")

        with autocast(device, precision.bf16):
            result = model.sample(sub, torch.full((len(active),), float(s_cond), device=device),
                                  force_scale=opts.force, callback=report, **kw)
        if progress:
            progress(1, 1, "done")  # chunks can end before their last reported step: close the bar at 100 %
        mean[active] = result.mean.float().cpu()
        std[active] = result.std.float().cpu()
        nfe, calls = result.nfe, result.network_calls
    t_sample = time.perf_counter()

    # --- back to physical units and volume order ------------------------------------------------------
    def to_volume(x: np.ndarray) -> vol.Volume:
        data = vol.from_slices(x.reshape(n_chan, n_slices, n1, n2), axis)  # (i, j, k, C)
        return vol.Volume(data.astype(np.float32), grid.affine.copy())

    to_units = norm[:, None, None]
    sr = to_volume(mean[:, 0].numpy() * to_units)
    calibration = describe_calibration(getattr(model, "uncertainty_calibration", None), float(s_cond), opts.samples,
                                       sampler=opts.sampler, steps=opts.steps, tau_f=opts.tau_f, tau_d=opts.tau_d,
                                       start=opts.start, t_trunc=chain_start)
    unc = to_volume(std[:, 0].numpy() * to_units * calibration["scale"])
    zf = to_volume(lr_zf_all.reshape(-1, n1, n2))
    mask_vol = vol.Volume(vol.from_slices(mask_slices, axis).astype(np.uint8), grid.affine.copy())
    timings = {"prepare_s": t_prep - t_start, "sample_s": t_sample - t_prep,
               "total_s": time.perf_counter() - t_start, "maps": int(len(cond)), "maps_sampled": int(len(active))}
    return SuperResolution(sr, zf, unc, mask_vol, grid, nfe, calls, timings,
                           {**asdict(opts), "scale": float(s_cond), "factor": float(grid.requested_factor),
                            "output_inplane": list(grid.inplane), "lr_inplane": list(grid.lr_inplane),
                            "slice_axis": int(axis), "chain_start_index": chain_start, "inputs": names,
                            "device": str(device), "mask": "user" if user_mask is not None else "automatic",
                            "precision_used": precision.as_dict(), "max_batch_used": max_batch},
                           calibration)


# ------------------------------------------------------------------------------------------ CLI layer
def output_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _split(volume: vol.Volume, c: int) -> vol.Volume:
    return vol.Volume(volume.data[..., c], volume.affine.copy())


def run_super_resolve(lr_paths: Sequence[str | Path], out_dir: str | Path, *, t1, flair, mask=None,
                      model_path=None, options: SuperResolveOptions | None = None, ratios: Sequence[str] = (),
                      overwrite: bool = False, progress: Progress | None = None, nan_policy: str = "raise") -> dict:
    """`ftddm super-resolve`: load files, super-resolve as one batch, write NIfTIs + <stem>_run.json atomically.

    Everything a user can get wrong is checked before the model is loaded: the output folder (a folder,
    writable, no output already there unless overwrite), the inputs (readable, finite under `nan_policy`,
    not a signed map), the mask's coverage of the MRSI field of view.
    """
    from .model import DEFAULT_MODEL, file_sha256, load_model

    opts = options or SuperResolveOptions()
    out_dir = Path(out_dir)
    stems = [output_stem(p) for p in lr_paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"LR inputs must have distinct file names, got {stems}")
    if t1 is None or flair is None:
        raise ValueError("--t1 and --flair are required: FTDDM is conditioned on the patient's T1 and FLAIR")
    ratio_pairs = [_parse_ratio(r, stems) for r in ratios]
    planned = [f"{s}_{kind}.nii.gz" for s in stems for kind in ("sr", "zerofilled", "uncertainty")]
    planned += [f"{a}_over_{b}_sr.nii.gz" for a, b in ratio_pairs] + [f"{s}_run.json" for s in stems]
    check_output_folder(out_dir, planned, overwrite)
    inputs = [vol.load_volume(p, nan_policy=nan_policy) for p in lr_paths]
    if any(v.data.ndim != 3 for v in inputs) and len(inputs) > 1:
        raise ValueError("several --lr inputs must each be a 3D map (one metabolite per file)")
    for v in inputs:
        check_not_signed(v, [v.name] if v.data.ndim == 3 else [f"{v.name}[{c}]" for c in range(v.n_channels)])
    t1_vol, flair_vol = (vol.load_volume(p, nan_policy=nan_policy) for p in (t1, flair))
    mask_vol = None
    if mask is not None:
        mask_vol = vol.load_volume(mask, nan_policy=nan_policy, allow_all_zero=True)
        check_mask_coverage(mask_vol, inputs[0])
    model_file = Path(model_path) if model_path else DEFAULT_MODEL
    model = load_model(model_file, device=opts.device)
    result = super_resolve(inputs if len(inputs) > 1 else inputs[0], t1_vol, flair_vol, mask_vol, model=model,
                           options=opts, progress=progress)
    single_4d = len(inputs) == 1 and inputs[0].data.ndim == 4
    files: dict[str, vol.Volume] = {}
    by_stem = {}
    for c, stem in enumerate(stems):
        pick = (lambda v: v) if single_4d else (lambda v, c=c: _split(v, c))
        for kind, volume in (("sr", result.sr), ("zerofilled", result.zero_filled), ("uncertainty", result.uncertainty)):
            files[f"{stem}_{kind}.nii.gz"] = pick(volume)
        by_stem[stem] = pick(result.sr)
    for a, b in ratio_pairs:
        num, den = by_stem[a].data, by_stem[b].data
        floor = 1e-6 * max(float(np.abs(den).max()), 1e-12)  # no ratio where the denominator has no signal
        ratio = np.where(den > floor, num / np.where(den > floor, den, 1.0), 0.0)
        files[f"{a}_over_{b}_sr.nii.gz"] = vol.Volume(ratio.astype(np.float32), result.sr.affine)
    report = {
        "ftddm_version": __import__("ftddm_core").__version__,
        "inputs": {str(p): file_sha256(p) for p in [*lr_paths, t1, flair, *([mask] if mask else [])]},
        "model": {"path": str(model_file), "sha256": file_sha256(model_file), "config": model.config.name},
        "options": result.options, "nfe_per_sample": result.nfe, "network_calls": result.network_calls,
        "timings": result.timings, "grid": {"affine": result.grid.affine.tolist(), "shape": list(result.grid.shape),
                                            "factor": result.grid.factor, "requested_factor":
                                                result.grid.requested_factor, "inplane": list(result.grid.inplane),
                                            "lr_inplane": list(result.grid.lr_inplane)},
        "uncertainty": uncertainty_note(opts.samples, result.uncertainty_calibration),
        "uncertainty_calibration": result.uncertainty_calibration,
        "outputs": [str(out_dir / name) for name in files] + [str(out_dir / f"{s}_run.json") for s in stems],
    }
    if opts.samples < 2:
        warnings.warn(report["uncertainty"], stacklevel=2)
    _write_outputs(out_dir, files, {f"{s}_run.json": json.dumps(report, indent=2) for s in stems}, overwrite)
    return report


def uncertainty_note(samples: int, calibration: dict | None = None) -> str:
    """What <stem>_uncertainty.nii.gz holds (recorded in run.json; a warning when it is undefined)."""
    if samples < 2:
        return ("undefined with --samples 1: <stem>_uncertainty.nii.gz holds zeros (the standard deviation of one "
                "sample); use --samples 2 or more for an uncertainty map")
    scaled = calibration.get("note") if calibration else None
    return f"per-voxel {scaled or 'standard deviation of the samples'} ({samples} samples), in the input's units"


#: Below this share of the MRSI grid's voxels kept by the user's mask a warning is printed.
MASK_KEEP_WARNING = 0.10
#: The mask's field of view must cover this share of the MRSI field of view, as the T1 and FLAIR must.
MASK_MIN_OVERLAP = 0.5


def check_mask_coverage(mask: vol.Volume, lr: vol.Volume) -> float:
    """Refuse a mask that covers < 50 % of the MRSI field of view (other coordinates, like the T1 rule), refuse
    an empty one, warn when it keeps < 10 % of the MRSI voxels; returns the share kept."""
    vol.check_overlap(mask, lr.affine, lr.shape, MASK_MIN_OVERLAP, lr.name)
    kept = vol.resample_mask(mask, lr.affine, lr.shape)
    n, total = int(kept.sum()), int(kept.size)
    if n == 0:
        raise ValueError(f"{mask.name}: the quality mask keeps no voxel of the MRSI grid of {lr.name} "
                         "(nothing to super-resolve); is it the mask of this exam?")
    if n < MASK_KEEP_WARNING * total:
        warnings.warn(f"{mask.name}: the quality mask keeps only {n} of {total} voxels ({100 * n / total:.1f}%) "
                      f"of the MRSI grid of {lr.name}; the SR map is 0 outside it — check that it is this exam's "
                      "mask", stacklevel=2)
    return n / total


def check_output_folder(out_dir: Path, names: Sequence[str], overwrite: bool) -> None:
    """Before any compute: `out_dir` is (or can be made as) a writable folder and holds none of `names`
    (unless overwrite, and never as a folder)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir}: a file of that name exists; expected a folder for the outputs")
    anchor = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    if not anchor.is_dir():
        raise ValueError(f"--out {out_dir}: {anchor} is a file, so the output folder cannot be created there")
    try:  # a real probe: os.access says yes to root and knows nothing of read-only mounts
        with tempfile.TemporaryFile(dir=anchor):
            pass
    except OSError as err:
        raise ValueError(f"--out {out_dir}: cannot write in {anchor} ({err.strerror}); choose a writable folder") \
            from err
    folders = [out_dir / n for n in names if (out_dir / n).is_dir()]
    if folders:
        raise FileExistsError(f"--out {out_dir}: {folders[0]} is a folder where an output file goes; move it away")
    existing = [out_dir / n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists (and {len(existing) - 1} more); "
                              "pass --overwrite to replace outputs")


def _write_outputs(out_dir: Path, volumes: dict, texts: dict, overwrite: bool) -> None:
    """Write every output into a hidden staging folder, then move them all in: an interruption or error at any
    point leaves either all the new outputs or none (earlier outputs are put back)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".ftddm-partial-", dir=out_dir))
    names = [*volumes, *texts]
    try:
        for name, volume in volumes.items():
            vol.save_volume(volume, stage / name)
        for name, text in texts.items():
            atomic_write_text(stage / name, text)
        for name in names:
            if (out_dir / name).exists() and not overwrite:
                raise FileExistsError(f"{out_dir / name} appeared while running; pass --overwrite to replace it")
        with deferred_interrupts():  # a signal during the renames is handled right after them
            _publish(stage, out_dir, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out_dir: Path, names: Sequence[str]) -> None:
    """Move stage/<name> → out_dir/<name> for every name, all or none: on failure undo the moves done so far."""
    backup = stage / ".replaced"
    backup.mkdir()
    moved, replaced = [], []
    try:
        for name in names:
            if (out_dir / name).exists():
                os.replace(out_dir / name, backup / name)
                replaced.append(name)
            os.replace(stage / name, out_dir / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            (out_dir / name).unlink(missing_ok=True)
        for name in replaced:
            os.replace(backup / name, out_dir / name)
        raise


def _parse_ratio(text: str, stems: Sequence[str]) -> tuple[str, str]:
    parts = text.split("/")
    if len(parts) != 2 or any(p not in stems for p in parts):
        raise ValueError(f"--ratio {text!r}: expected NUM/DEN with both names among the LR inputs {list(stems)}")
    return parts[0], parts[1]
