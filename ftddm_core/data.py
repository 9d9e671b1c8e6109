"""Datasets on disk (one NIfTI folder per patient), patient-level folds and 2D training examples.

Layout (see docs/dataset_format.md)::

    DATASET/dataset.json                 metabolites, units "mM" or "a.u.", description, seed, patients
    DATASET/<patient>/<metabolite>.nii.gz   HR map, one per metabolite, all on one grid (any matrix)
    DATASET/<patient>/t1.nii.gz, flair.nii.gz   any geometry; resampled to the map grid in physical space
    DATASET/<patient>/mask.nii.gz        optional quality mask on the map grid
    DATASET/<patient>/lesion.nii.gz      optional lesion labels on the map grid

Training examples follow the paper (§1–2) with the derivation inference uses: LR = |downsample(HR, m)| by
centred k-space truncation of the full slice (m_a = round(n_a / F); legacy 64×64 data: m = 8 … 32), zero-filled,
y = [LR_zf, M, T1, FLAIR], then cut to a T×T tile. Unlike the published code, the intensity scale comes from
the LR input only (prep.model_inputs), as it must at inference.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import kspace, prep
from . import volume as vol
from .atomic import atomic_write_text
from .config import METABOLITES
from .nifti import read_nifti, save_nifti
from .phantom import Patient, make_patient, patient_seed

DATASET_JSON = "dataset.json"
PHANTOM_JSON = "phantom.json"
T1_FILE, FLAIR_FILE, MASK_FILE, LESION_FILE = "t1.nii.gz", "flair.nii.gz", "mask.nii.gz", "lesion.nii.gz"
RESERVED_FILES = (T1_FILE, FLAIR_FILE, MASK_FILE, LESION_FILE)
FORMAT_NAME, FORMAT_VERSION = "ftddm-mrsi-dataset", 1
LR_SIZES = tuple(range(8, 33))  # LR matrix 8…32 (paper: even sizes only; odd ones generalise to any scanner)
AFFINE_TOL_MM = 1e-3
MIN_LR_MATRIX = 4  # smallest LR matrix per axis a training example is degraded to
UNITS = ("mM", "a.u.")  # concentrations, or arbitrary (institutional) units
TRAINING_FACTORS = (2.0, 8.0)  # in-plane upscaling factors F drawn for data that is not the legacy 64×64


# ------------------------------------------------------------------------------------------- geometry
def resample_to_grid(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                     dst_shape: Sequence[int]) -> np.ndarray:
    """volume.resample_to_grid on plain arrays: the same physical-space resampling inference uses."""
    return vol.resample_to_grid(vol.Volume(np.asarray(data, dtype=np.float32), src_affine), dst_affine, dst_shape)


def to_map_grid(patient: Patient) -> Patient:
    """The same patient with T1 and FLAIR resampled onto the map grid (a no-op if they are already there)."""
    shape = patient.shape
    if patient.t1.shape == shape and np.allclose(patient.mri_affine, patient.affine, atol=AFFINE_TOL_MM):
        return patient
    t1 = resample_to_grid(patient.t1, patient.mri_affine, patient.affine, shape).astype(np.float32)
    flair = resample_to_grid(patient.flair, patient.mri_affine, patient.affine, shape).astype(np.float32)
    return replace(patient, t1=t1, flair=flair, mri_affine=patient.affine.copy())


# ------------------------------------------------------------------------------------------- writing
def _write_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder} is not empty; expected an empty or new folder (or pass overwrite=True)")
    folder.mkdir(parents=True, exist_ok=True)


def write_patient(patient: Patient, folder: str | Path, overwrite: bool = False) -> Path:
    """Write one patient folder: <metabolite>.nii.gz, t1/flair (own grid), mask, lesion, phantom.json."""
    folder = Path(folder)
    _prepare_folder(folder, overwrite)
    units = patient.info.get("units", "mM")
    for name, hr in patient.maps.items():
        save_nifti(hr.astype(np.float32), patient.affine, folder / f"{name}.nii.gz", f"{name} HR map [{units}]")
    save_nifti(patient.t1.astype(np.float32), patient.mri_affine, folder / T1_FILE, "T1")
    save_nifti(patient.flair.astype(np.float32), patient.mri_affine, folder / FLAIR_FILE, "FLAIR")
    save_nifti(patient.quality_mask.astype(np.uint8), patient.affine, folder / MASK_FILE, "MRSI quality mask")
    if patient.lesion is not None:
        save_nifti(patient.lesion.astype(np.uint8), patient.affine, folder / LESION_FILE,
                   "lesion 0 normal 1 core 2 rim 3 edema")
    if patient.info:
        _write_json(patient.info, folder / PHANTOM_JSON)
    return folder


def write_dataset_json(root: str | Path, metabolites: Sequence[str], patients: Sequence[str], description: str,
                       seed: int | None = None, units: str = "mM", **extra: Any) -> Path:
    """Write DATASET/dataset.json (metabolites, units "mM" or "a.u.", description, seed, patient folders)."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    root = Path(root)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "metabolites": list(metabolites), "units": units,
            "description": description, "seed": seed, "patients": list(patients), **extra}
    _write_json(meta, root / DATASET_JSON)
    return root / DATASET_JSON


REALISMS = ("legacy", "invivo")


def write_phantom_dataset(out_dir: str | Path, patients: int = 25, seed: int = 0, slices: int | None = None,
                          overwrite: bool = False, progress: Callable[[int, int, str], None] | None = None,
                          realism: str = "legacy", kind: str = "mixed") -> Path:
    """Generate and write a synthetic glioma cohort (sub-001 …); progress(done, total, patient_id) per patient.

    realism "legacy": phantom.make_patient (64×64 maps in mM); "invivo": invivo.make_invivo_patient of the
    given kind (any matrix, oblique slab, noisy k-space-limited maps with lipid, arbitrary units).
    """
    from . import invivo

    if int(patients) < 1:
        raise ValueError(f"number of patients must be ≥ 1, got {patients}")
    if realism not in REALISMS:
        raise ValueError(f"realism must be one of {', '.join(REALISMS)}, got {realism!r}")
    if realism == "invivo" and kind not in invivo.KINDS:
        raise ValueError(f"kind must be one of {', '.join(invivo.KINDS)}, got {kind!r}")
    if realism == "invivo" and slices is not None:
        raise ValueError("slices is drawn per patient by the invivo generator; expected slices=None")
    root = Path(out_dir)
    _prepare_folder(root, overwrite)
    ids = [f"sub-{i + 1:03d}" for i in range(int(patients))]
    for i, pid in enumerate(ids):
        if realism == "invivo":
            patient = invivo.make_invivo_patient(patient_seed(seed, i), kind=kind, patient_id=pid)
        else:
            patient = make_patient(patient_seed(seed, i), slices=slices, patient_id=pid)
        write_patient(patient, root / pid, overwrite=True)
        if progress is not None:
            progress(i + 1, len(ids), pid)
    if realism == "invivo":
        write_dataset_json(
            root, METABOLITES, ids, seed=int(seed), generator="ftddm_core.invivo", kind=kind, units=invivo.UNITS,
            description=(f"In-vivo-like synthetic glioma MRSI ({kind}) on MNI152 2009 anatomy: oblique slabs, "
                         "HR matrices 24–80 per axis at 2.5–7 mm, k-space-limited maps (none/Hamming) with "
                         "k-space noise (in-brain SNR 5–40), scalp lipid, B0 dropout, arbitrary units. "
                         "<metabolite>.nii.gz is the acquired map (lipid included); train on map × mask."),
        )
    else:
        write_dataset_json(
            root, METABOLITES, ids, seed=int(seed), generator="ftddm_core.phantom", slices=slices,
            description=("Synthetic high-grade-glioma MRSI phantom on MNI152 2009 anatomy: 64×64×N HR metabolite "
                         "maps at 3.4 mm, T1/FLAIR at 1.7 mm on their own grid, quality mask, lesion labels "
                         "(0 normal, 1 necrotic core, 2 enhancing rim, 3 edema)."),
        )
    return root


# ------------------------------------------------------------------------------------------- reading
def read_dataset_json(root: str | Path) -> dict[str, Any]:
    """Parsed dataset.json of a dataset folder, checked for metabolites and units."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        raise ValueError(f"{path}: missing; expected a dataset.json describing the dataset")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    mets = meta.get("metabolites") if isinstance(meta, dict) else None
    if not isinstance(mets, list) or not mets or not all(isinstance(m, str) and m for m in mets):
        raise ValueError(f"{path}: expected a non-empty list of metabolite names under 'metabolites'")
    if meta.get("units", "mM") not in UNITS:
        raise ValueError(f"{path}: units {meta.get('units')!r}; expected one of {', '.join(map(repr, UNITS))}")
    return meta


def list_patients(root: str | Path) -> list[str]:
    """Patient folder names of a dataset: dataset.json 'patients' if given, else every sub-folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder; expected a dataset folder")
    if (root / DATASET_JSON).is_file():
        ids = read_dataset_json(root).get("patients")
        if ids:
            return [str(i) for i in ids]
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_volume(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; expected the {what}")
    data, affine = read_nifti(path, expected=f"the {what}")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: shape {data.shape}; expected a 3D volume ({what})")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise ValueError(f"{path}: {bad} NaN/inf voxels; expected finite values ({what})")
    return data, affine


def _check_same_grid(path: Path, data: np.ndarray, affine: np.ndarray, ref_path: Path, ref_shape, ref_affine) -> None:
    if data.shape != tuple(ref_shape):
        raise ValueError(f"{path}: shape {data.shape}; expected {tuple(ref_shape)} like {ref_path.name}")
    if not np.allclose(affine, ref_affine, atol=AFFINE_TOL_MM):
        raise ValueError(f"{path}: affine differs from {ref_path.name}; expected the same map grid\n"
                         f"{np.round(affine, 4)}\nvs\n{np.round(ref_affine, 4)}")


def _metabolites_of(folder: Path) -> list[str]:
    """Metabolites from the parent dataset.json, else every non-reserved NIfTI in the folder."""
    if (folder.parent / DATASET_JSON).is_file():
        return list(read_dataset_json(folder.parent)["metabolites"])
    names = [p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz") if p.name not in RESERVED_FILES]
    known = [m for m in METABOLITES if m in names]
    return known + sorted(set(names) - set(known))


def load_patient(folder: str | Path, metabolites: Sequence[str] | None = None, resample_mri: bool = True) -> Patient:
    """Load and validate one patient folder; T1/FLAIR are resampled onto the map grid unless resample_mri=False.

    brain_mask = (T1 > 0) on the map grid (≥ half a voxel); quality_mask = mask.nii.gz, or the brain if absent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; expected a patient folder with <metabolite>.nii.gz files")
    names = list(metabolites) if metabolites is not None else _metabolites_of(folder)
    if not names:
        raise ValueError(f"{folder}: no metabolite maps; expected files such as NAA.nii.gz")
    maps, ref = {}, None
    for name in names:
        path = folder / f"{name}.nii.gz"
        data, affine = _read_volume(path, f"HR {name} map in mM ({name}.nii.gz)")
        if ref is None:
            ref = (path, data.shape, affine)
        else:
            _check_same_grid(path, data, affine, *ref)
        maps[name] = data
    ref_path, shape, map_affine = ref

    t1, t1_affine = _read_volume(folder / T1_FILE, "T1 image (t1.nii.gz, any geometry)")
    flair, flair_affine = _read_volume(folder / FLAIR_FILE, "FLAIR image (flair.nii.gz, any geometry)")
    for path, img in ((folder / T1_FILE, t1), (folder / FLAIR_FILE, flair)):
        if not np.any(img):
            raise ValueError(f"{path}: all zero; expected an MR image")
    inside = resample_to_grid((t1 > 0).astype(np.float32), t1_affine, map_affine, shape) >= 0.5
    if not inside.any():
        raise ValueError(f"{folder / T1_FILE}: no voxel with T1 > 0 overlaps the map grid of {ref_path.name}; "
                         "expected T1 covering the MRSI slab")

    quality = inside.copy()
    mask_path = folder / MASK_FILE
    if mask_path.exists():
        mask, mask_affine = _read_volume(mask_path, "quality mask on the map grid (mask.nii.gz)")
        _check_same_grid(mask_path, mask, mask_affine, ref_path, shape, map_affine)
        quality = mask > 0.5
        if not quality.any():
            raise ValueError(f"{mask_path}: empty mask; expected at least one voxel passing quality filtering")
        if not (quality & inside).any():
            raise ValueError(f"{mask_path}: no mask voxel lies inside the brain (T1 > 0); expected overlap")
    lesion = None
    if (folder / LESION_FILE).exists():
        lab, lab_affine = _read_volume(folder / LESION_FILE, "lesion labels on the map grid (lesion.nii.gz)")
        _check_same_grid(folder / LESION_FILE, lab, lab_affine, ref_path, shape, map_affine)
        lesion = np.rint(lab).astype(np.uint8)

    info: dict[str, Any] = {"source": str(folder), "mask_from": MASK_FILE if mask_path.exists() else "t1"}
    if (folder / PHANTOM_JSON).is_file():
        info["phantom"] = json.loads((folder / PHANTOM_JSON).read_text(encoding="utf-8"))
    if resample_mri:
        t1 = resample_to_grid(t1, t1_affine, map_affine, shape).astype(np.float32)
        flair = resample_to_grid(flair, flair_affine, map_affine, shape).astype(np.float32)
        t1_affine = map_affine
    elif not (flair.shape == t1.shape and np.allclose(flair_affine, t1_affine, atol=AFFINE_TOL_MM)):
        flair = resample_to_grid(flair, flair_affine, t1_affine, t1.shape).astype(np.float32)
    return Patient(patient_id=folder.name, maps=maps, affine=map_affine, t1=t1, flair=flair, mri_affine=t1_affine,
                   quality_mask=quality, brain_mask=inside, lesion=lesion, info=info)


def load_dataset(root: str | Path, patient_ids: Sequence[str] | None = None) -> list[Patient]:
    """Load the given patients (default: all) of a dataset folder, metabolites from dataset.json."""
    root = Path(root)
    ids = list(patient_ids) if patient_ids is not None else list_patients(root)
    mets = read_dataset_json(root)["metabolites"] if (root / DATASET_JSON).is_file() else None
    return [load_patient(root / pid, metabolites=mets) for pid in ids]


# ------------------------------------------------------------------------------------------- folds
def patient_folds(patient_ids: Sequence[str], k: int = 5, fold: int = 0, seed: int = 0) -> tuple[list, list, list]:
    """(train, val, test) patient lists: shuffled into k groups; test = group f, val = group f+1, train = rest."""
    ids = list(patient_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("patient ids must be unique")
    if k < 3 or len(ids) < k:
        raise ValueError(f"expected k ≥ 3 folds and at least k patients, got k={k} for {len(ids)} patients")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k}), got {fold}")
    order = np.random.default_rng(seed).permutation(len(ids))
    groups = [[ids[i] for i in g] for g in np.array_split(order, k)]
    test, val = groups[fold], groups[(fold + 1) % k]
    train = [p for g in range(k) if g not in (fold, (fold + 1) % k) for p in groups[g]]
    return train, val, test


# ------------------------------------------------------------------------------------------- examples
def augment(images: Sequence[np.ndarray], rng: np.random.Generator, max_shift: int = 3) -> list[np.ndarray]:
    """Same random rot90, flip and circular shift (±max_shift voxels) applied to every (H, W) image."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    shift = tuple(int(s) for s in rng.integers(-max_shift, max_shift + 1, size=2))
    out = []
    for img in images:
        img = np.rot90(img, k, axes=(-2, -1))
        if flip:
            img = img[..., ::-1]
        out.append(np.ascontiguousarray(np.roll(img, shift, axis=(-2, -1))))
    return out


def lr_matrix(shape: Sequence[int], factor: float) -> tuple[int, int]:
    """LR matrix of an HR slice for in-plane factor F: m_a = max(round(n_a / F), 4), at most n_a (half up)."""
    if not float(factor) >= 1.0:
        raise ValueError(f"upscaling factor must be ≥ 1, got {factor}")
    return tuple(min(int(n), max(int(np.floor(n / float(factor) + 0.5)), MIN_LR_MATRIX)) for n in shape[-2:])


def make_example(hr: np.ndarray, mask: np.ndarray, t1: np.ndarray, flair: np.ndarray,
                 lr_size: int | Sequence[int] | None = None, *, factor: float | None = None) -> dict[str, Any]:
    """One full-slice training example, derived exactly as inference derives its inputs (prep.model_inputs).

    The LR matrix is ``lr_size`` (m, square maps, or (m1, m2)) or, from ``factor`` F, m_a = max(round(n_a/F), 4).
    LR = |downsample(HR, m)| is the magnitude map a scanner gives (all the slab's signal, lipid included, not
    only M); then zero-fill onto the HR grid, intensity scale from |LR_zf| inside M and y = [|LR_zf|/scale, M,
    T1, FLAIR]; the target is x0 = HR·M / scale (the ground truth is never used for the scale). t1 and flair
    must already be in [0, 1]. Returns numpy arrays x0 (1, n1, n2), cond (4, n1, n2), mask (1, n1, n2), the
    conditioning factor scale = √((n1/m1)·(n2/m2)) (the physical in-plane upscaling; = n/m for square maps),
    lr_shape (m1, m2), lr_size = max(m1, m2) and norm.

    Inference zero-fills m_a onto round(F·m_a) and feeds s = F; here the target grid is the stored n_a, so
    n_a/m_a differs from F by the rounding of m_a (≤ F/(2·m_a) relative) and s is the factor actually applied.
    """
    if hr.ndim != 2:
        raise ValueError(f"expected a 2D HR map, got shape {hr.shape}")
    n1, n2 = hr.shape
    if factor is not None:
        m1, m2 = lr_matrix(hr.shape, factor)
    elif lr_size is None:
        raise ValueError("make_example needs lr_size or factor")
    elif np.ndim(lr_size) == 0:
        if n1 != n2:
            raise ValueError(f"an int LR size needs a square HR map, got shape {hr.shape}; pass (m1, m2) or factor")
        m1 = m2 = int(lr_size)
    else:
        m1, m2 = (int(v) for v in lr_size)
    for m, n in ((m1, n1), (m2, n2)):
        if not 1 <= m <= n:
            raise ValueError(f"LR size must be between 1 and {n}, got {m}")
    lr = np.abs(kspace.downsample(hr.astype(np.float64), (m1, m2)))
    cond, norm, _ = prep.model_inputs(lr[None], mask[None] > 0, t1[None], flair[None], (n1, n2))
    norm = float(norm[0]) if norm[0] > 0 else 1.0  # an all-zero map has no scale; keep it at zero
    m = mask.astype(np.float32)
    return {"x0": (hr * m / norm)[None].astype(np.float32), "cond": cond[0].numpy(), "mask": m[None],
            "scale": float(np.sqrt((n1 / m1) * (n2 / m2))), "lr_size": max(m1, m2), "lr_shape": (m1, m2),
            "norm": norm}


def _tile_window(n: int, tile: int, centre: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """(start in the slice, start in the tile) along one axis: crop around `centre` if n > tile, pad if smaller."""
    if n <= tile:
        return 0, (int(rng.integers(0, tile - n + 1)) if rng is not None else (tile - n) // 2)
    return int(np.clip(centre - tile // 2, 0, n - tile)), 0


def tile_example(example: dict[str, Any], tile: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Cut a tile×tile window from a full-slice example (after LR/cond were derived on the whole slice).

    Larger axes are cropped: with rng around a random mask voxel (± tile/4), without rng around the middle of
    the mask; smaller axes are zero-padded (padding has mask 0 and cond 0), at a random offset with rng.
    """
    mask = example["mask"][0] > 0
    n1, n2 = mask.shape
    if (n1, n2) == (tile, tile):
        return example
    inside = np.argwhere(mask)
    if inside.size == 0:
        centre = (n1 // 2, n2 // 2)
    elif rng is None:
        centre = tuple((inside.min(axis=0) + inside.max(axis=0) + 1) // 2)
    else:
        centre = tuple(inside[int(rng.integers(len(inside)))] + rng.integers(-(tile // 4), tile // 4 + 1, size=2))
    (a1, b1), (a2, b2) = (_tile_window(n, tile, int(c), rng) for n, c in zip((n1, n2), centre))
    h1, h2 = min(n1, tile), min(n2, tile)

    def cut(arr: np.ndarray) -> np.ndarray:
        out = np.zeros(arr.shape[:-2] + (tile, tile), dtype=arr.dtype)
        out[..., b1:b1 + h1, b2:b2 + h2] = arr[..., a1:a1 + h1, a2:a2 + h2]
        return out

    return {**example, "x0": cut(example["x0"]), "cond": cut(example["cond"]), "mask": cut(example["mask"]),
            "tile_origin": (a1 - b1, a2 - b2)}


class SliceDataset(Dataset):
    """2D examples (slice × metabolite) of patients on any in-plane map grid, as tiles of image_size².

    Each example is derived on the full slice (make_example: LR by k-space truncation, zero-fill, scale),
    then cut to an image_size×image_size tile (tile_example; image_size=None keeps the full slice). For 64×64
    maps and image_size 64 this is the paper's setting (§1–2) unchanged.

    An index is an int, a pair (int, m) with an int LR size m (as BatchSource asks on the legacy grid: factor
    F = image_size / m, i.e. exactly m×m for 64×64 maps), or a pair (int, F) with a float factor. A plain int
    uses the fixed lr_size, else draws per example: m from lr_sizes (factor_range None) or F ~ U(factor_range).
    """

    def __init__(self, patients: Sequence[Patient], metabolites: Sequence[str] | None = None,
                 lr_size: int | None = None, lr_sizes: Sequence[int] = LR_SIZES, augment: bool = False,
                 max_shift: int = 3, min_mask_fraction: float = 0.05, image_size: int | None = 64, seed: int = 0,
                 factor_range: tuple[float, float] | None = None):
        if not patients:
            raise ValueError("SliceDataset needs at least one patient")
        if image_size is not None and int(image_size) < 8:
            raise ValueError(f"image_size (tile) must be ≥ 8 or None, got {image_size}")
        if factor_range is not None and not 1.0 <= factor_range[0] <= factor_range[1]:
            raise ValueError(f"factor_range must be (low, high) with 1 ≤ low ≤ high, got {factor_range}")
        self.metabolites = tuple(metabolites) if metabolites is not None else tuple(patients[0].maps)
        self.lr_sizes = tuple(int(m) for m in lr_sizes)
        self.factor_range = None if factor_range is None else (float(factor_range[0]), float(factor_range[1]))
        self.augment, self.max_shift = augment, int(max_shift)
        self.image_size = None if image_size is None else int(image_size)
        self.rng = np.random.default_rng(seed)
        self._volumes = [self._prepare(p) for p in patients]
        self.index: list[tuple[int, int, str]] = []
        for pi, prepared in enumerate(self._volumes):
            fraction = prepared["mask"].mean(axis=(0, 1))
            self.index += [(pi, z, name) for z in np.flatnonzero(fraction >= min_mask_fraction)
                           for name in self.metabolites]
        self.set_lr_size(lr_size)

    def _prepare(self, patient: Patient) -> dict[str, Any]:
        """Map-grid volumes of one patient: maps, M = quality ∧ brain, T1/FLAIR in [0, 1] over the whole grid
        (as volume.prepare_mri at inference)."""
        p = to_map_grid(patient)
        missing = [m for m in self.metabolites if m not in p.maps]
        if missing:
            raise ValueError(f"patient {p.patient_id}: no map for {missing}; expected {list(self.metabolites)}")
        if min(p.shape[:2]) < 2 * MIN_LR_MATRIX:
            raise ValueError(f"patient {p.patient_id}: map grid {p.shape}; expected at least "
                             f"{2 * MIN_LR_MATRIX}×{2 * MIN_LR_MATRIX} in-plane")
        brain = p.brain_mask.astype(bool)
        return {"id": p.patient_id, "maps": p.maps, "mask": p.quality_mask.astype(bool) & brain,
                "t1": prep.unit_range(p.t1), "flair": prep.unit_range(p.flair)}

    def set_lr_size(self, lr_size: int | None) -> None:
        """Fix the LR matrix size m for every int index (None: draw per example)."""
        limit = self.image_size or 10**6
        if lr_size is not None and not 1 <= int(lr_size) <= limit:
            raise ValueError(f"LR size must be between 1 and {limit}, got {lr_size}")
        self.lr_size = None if lr_size is None else int(lr_size)

    def draw_factor(self, rng: np.random.Generator) -> int | float:
        """One LR size m (int, from lr_sizes) or factor F (float, U(factor_range)), as this dataset trains."""
        if self.factor_range is None:
            return int(rng.choice(self.lr_sizes))
        return float(rng.uniform(*self.factor_range))

    def _factor_of(self, spec: int | float, shape: tuple[int, int]) -> float:
        if isinstance(spec, (int, np.integer)):  # an LR size relative to the tile (or the larger axis)
            return (self.image_size or max(shape)) / int(spec)
        return float(spec)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item) -> dict[str, Any]:
        i, spec = item if isinstance(item, tuple) else (item, self.lr_size)
        if spec is None:
            spec = self.draw_factor(self.rng)
        pi, z, name = self.index[int(i)]
        prepared = self._volumes[pi]
        images = [prepared["maps"][name][:, :, z], prepared["mask"][:, :, z], prepared["t1"][:, :, z],
                  prepared["flair"][:, :, z]]
        if self.augment:  # on the full slice, before the degradation: a rotated/shifted acquisition
            images = augment(images, self.rng, self.max_shift)
        ex = make_example(*images, factor=self._factor_of(spec, images[0].shape))
        if self.image_size is not None:
            ex = tile_example(ex, self.image_size, self.rng if self.augment else None)
        return {"x0": torch.from_numpy(ex["x0"]), "cond": torch.from_numpy(ex["cond"]),
                "mask": torch.from_numpy(ex["mask"]), "scale": ex["scale"], "lr_size": ex["lr_size"],
                "lr_shape": ex["lr_shape"], "tile_origin": ex.get("tile_origin", (0, 0)), "norm": ex["norm"],
                "patient": prepared["id"], "slice": int(z),
                "metabolite": name}


# ------------------------------------------------------------------------------------------- training
class BatchSource:
    """Random training batches of a SliceDataset: one LR size m or factor F per batch (paper: one m per batch),
    reproducible from a generator."""

    def __init__(self, dataset: SliceDataset):
        self.dataset = dataset

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """dict(x0 (B,1,T,T), cond (B,4,T,T), scale (B,)) drawn with `generator` (indices, m/F, augmentation)."""
        ds = self.dataset
        if ds.factor_range is None:
            spec = ds.lr_sizes[int(torch.randint(len(ds.lr_sizes), (1,), generator=generator))]
        else:
            lo, hi = ds.factor_range
            spec = float(lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64))
        idx = torch.randint(len(ds), (int(batch_size),), generator=generator).tolist()
        ds.rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        items = [ds[(i, spec)] for i in idx]
        return {"x0": torch.stack([it["x0"] for it in items]), "cond": torch.stack([it["cond"] for it in items]),
                "scale": torch.tensor([it["scale"] for it in items], dtype=torch.float32)}


def is_legacy_grid(patients: Sequence[Patient], size: int = 64) -> bool:
    """True when every patient is on the paper's size×size in-plane grid (then LR sizes m = 8…32 are drawn)."""
    return all(tuple(p.shape[:2]) == (size, size) for p in patients)


def training_sources(root: str | Path, fold: int = 0, seed: int = 0, k: int = 5,
                     tile: int = 64) -> tuple[BatchSource, BatchSource, dict]:
    """(train, validation, info) batch sources of a dataset folder for patient-level fold `fold` of k, giving
    tile×tile examples."""
    root = Path(root)
    ids = list_patients(root)
    if len(ids) < 3:
        raise ValueError(f"{root}: {len(ids)} patient folder(s); expected at least 3 (train/validation/test)")
    train_ids, val_ids, test_ids = patient_folds(ids, k=min(k, len(ids)), fold=fold, seed=seed)
    train_patients, val_patients = load_dataset(root, train_ids), load_dataset(root, val_ids)
    # The paper's 64×64 phantoms keep m = 8…32 per batch; any other grid draws F ~ U(2, 8) per batch.
    factors = None if is_legacy_grid(train_patients + val_patients) else TRAINING_FACTORS
    train = SliceDataset(train_patients, augment=True, seed=seed, image_size=tile, factor_range=factors)
    val = SliceDataset(val_patients, augment=False, seed=seed + 1, image_size=tile, factor_range=factors)
    info = {"dataset": str(root), "fold": fold, "folds": min(k, len(ids)), "split_seed": seed, "tile": tile,
            "factor_range": list(factors) if factors else None, "lr_sizes": None if factors else list(LR_SIZES),
            "train": train_ids, "validation": val_ids, "test": test_ids,
            "train_examples": len(train), "validation_examples": len(val)}
    return BatchSource(train), BatchSource(val), info
