"""Datasets on disk (one NIfTI folder per patient), patient-level folds and 2D training examples.

Layout (see docs/dataset_format.md)::

    DATASET/dataset.json                 metabolites, units "mM", description, seed, patients
    DATASET/<patient>/<metabolite>.nii.gz   HR map, one per metabolite, all on one grid (e.g. NAA.nii.gz)
    DATASET/<patient>/t1.nii.gz, flair.nii.gz   any geometry; resampled to the map grid in physical space
    DATASET/<patient>/mask.nii.gz        optional quality mask on the map grid
    DATASET/<patient>/lesion.nii.gz      optional lesion labels on the map grid

Training examples follow the paper (§1–2) with the derivation inference uses: LR = |downsample(HR, m)| by
centred k-space truncation (m = 8 … 32, s = 64 / m), zero-filled, y = [LR_zf, M, T1, FLAIR]. Unlike the
published code, the intensity scale comes from the LR input only (prep.model_inputs), as it must at inference.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import kspace, prep
from . import volume as vol
from .config import METABOLITES
from .phantom import Patient, make_patient, patient_seed

DATASET_JSON = "dataset.json"
PHANTOM_JSON = "phantom.json"
T1_FILE, FLAIR_FILE, MASK_FILE, LESION_FILE = "t1.nii.gz", "flair.nii.gz", "mask.nii.gz", "lesion.nii.gz"
RESERVED_FILES = (T1_FILE, FLAIR_FILE, MASK_FILE, LESION_FILE)
FORMAT_NAME, FORMAT_VERSION = "ftddm-mrsi-dataset", 1
LR_SIZES = tuple(range(8, 33))  # LR matrix 8…32 (paper: even sizes only; odd ones generalise to any scanner)
AFFINE_TOL_MM = 1e-3


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
def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then os.replace: readers never see half a file; the file
    gets the mode the umask gives a new one (atomic.atomic_write)."""
    from .atomic import atomic_write  # local: keeps this module's import block untouched

    atomic_write(path, write)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, description: str = "") -> None:
    """Atomically save a volume with its voxel→RAS affine as qform and sform (scanner space, mm)."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description[:79].encode()
    _atomic_write(Path(path), lambda tmp: nib.save(img, tmp))


def _atomic_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    _atomic_write(path, write)


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
    for name, hr in patient.maps.items():
        save_nifti(hr.astype(np.float32), patient.affine, folder / f"{name}.nii.gz", f"{name} HR map [mM]")
    save_nifti(patient.t1.astype(np.float32), patient.mri_affine, folder / T1_FILE, "T1")
    save_nifti(patient.flair.astype(np.float32), patient.mri_affine, folder / FLAIR_FILE, "FLAIR")
    save_nifti(patient.quality_mask.astype(np.uint8), patient.affine, folder / MASK_FILE, "MRSI quality mask")
    if patient.lesion is not None:
        save_nifti(patient.lesion.astype(np.uint8), patient.affine, folder / LESION_FILE,
                   "lesion 0 normal 1 core 2 rim 3 edema")
    if patient.info:
        _atomic_json(patient.info, folder / PHANTOM_JSON)
    return folder


def write_dataset_json(root: str | Path, metabolites: Sequence[str], patients: Sequence[str], description: str,
                       seed: int | None = None, **extra: Any) -> Path:
    """Write DATASET/dataset.json (metabolites, units "mM", description, seed, patient folders)."""
    root = Path(root)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "metabolites": list(metabolites), "units": "mM",
            "description": description, "seed": seed, "patients": list(patients), **extra}
    _atomic_json(meta, root / DATASET_JSON)
    return root / DATASET_JSON


def write_phantom_dataset(out_dir: str | Path, patients: int = 25, seed: int = 0, slices: int | None = None,
                          overwrite: bool = False, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Generate and write a synthetic glioma cohort (sub-001 …); progress(done, total, patient_id) per patient."""
    if int(patients) < 1:
        raise ValueError(f"number of patients must be ≥ 1, got {patients}")
    root = Path(out_dir)
    _prepare_folder(root, overwrite)
    ids = [f"sub-{i + 1:03d}" for i in range(int(patients))]
    for i, pid in enumerate(ids):
        patient = make_patient(patient_seed(seed, i), slices=slices, patient_id=pid)
        write_patient(patient, root / pid, overwrite=True)
        if progress is not None:
            progress(i + 1, len(ids), pid)
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
    if meta.get("units", "mM") != "mM":
        raise ValueError(f"{path}: units {meta.get('units')!r}; expected 'mM'")
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
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for a corrupt file
        raise ValueError(f"{path}: cannot be read as NIfTI ({err}); expected the {what}") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: shape {data.shape}; expected a 3D volume ({what})")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise ValueError(f"{path}: {bad} NaN/inf voxels; expected finite values ({what})")
    return data, np.asarray(img.affine, dtype=np.float64)


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


def make_example(hr: np.ndarray, mask: np.ndarray, t1: np.ndarray, flair: np.ndarray, lr_size: int) -> dict[str, Any]:
    """One training example, derived exactly as inference derives its inputs (prep.model_inputs).

    LR = |downsample(HR, m)| is the m×m magnitude map a scanner gives (all the slab's signal, not only M);
    then zero-fill, intensity scale from |LR_zf| inside M and y = [|LR_zf|/scale, M, T1, FLAIR]; the target is
    x0 = HR·M / scale (the ground truth is never used for the scale). t1 and flair must already be in [0, 1].
    Returns numpy arrays x0 (1, H, W), cond (4, H, W), mask (1, H, W), scale s = H / m, lr_size m and norm.
    """
    size = hr.shape[-1]
    if hr.ndim != 2 or hr.shape[0] != size:
        raise ValueError(f"expected a square 2D HR map, got shape {hr.shape}")
    if not 1 <= int(lr_size) <= size:
        raise ValueError(f"LR size must be between 1 and {size}, got {lr_size}")
    lr = np.abs(kspace.downsample(hr.astype(np.float64), int(lr_size)))
    cond, norm, _ = prep.model_inputs(lr[None], mask[None] > 0, t1[None], flair[None], size)
    norm = float(norm[0]) if norm[0] > 0 else 1.0  # an all-zero map has no scale; keep it at zero
    m = mask.astype(np.float32)
    return {"x0": (hr * m / norm)[None].astype(np.float32), "cond": cond[0].numpy(), "mask": m[None],
            "scale": size / int(lr_size), "lr_size": int(lr_size), "norm": norm}


class SliceDataset(Dataset):
    """2D examples (slice × metabolite) of patients on a 64×64 map grid, as the paper trains (§1–2).

    An index is an int (LR size: the fixed one, else a random draw from lr_sizes) or a pair (int, m) as
    yielded by LRSizeBatchSampler, which gives every example of a batch the same m (paper: one m per batch).
    """

    def __init__(self, patients: Sequence[Patient], metabolites: Sequence[str] | None = None,
                 lr_size: int | None = None, lr_sizes: Sequence[int] = LR_SIZES, augment: bool = False,
                 max_shift: int = 3, min_mask_fraction: float = 0.05, image_size: int = 64, seed: int = 0):
        if not patients:
            raise ValueError("SliceDataset needs at least one patient")
        self.metabolites = tuple(metabolites) if metabolites is not None else tuple(patients[0].maps)
        self.lr_sizes = tuple(int(m) for m in lr_sizes)
        self.augment, self.max_shift, self.image_size = augment, int(max_shift), int(image_size)
        self.rng = np.random.default_rng(seed)
        self._volumes = [self._prepare(p) for p in patients]
        self.index: list[tuple[int, int, str]] = []
        for pi, vol in enumerate(self._volumes):
            fraction = vol["mask"].mean(axis=(0, 1))
            self.index += [(pi, z, name) for z in np.flatnonzero(fraction >= min_mask_fraction)
                           for name in self.metabolites]
        self.set_lr_size(lr_size)

    def _prepare(self, patient: Patient) -> dict[str, Any]:
        """Map-grid volumes of one patient: maps, M = quality ∧ brain, T1/FLAIR in [0, 1] over the whole grid
        (as volume.prepare_mri at inference)."""
        p = to_map_grid(patient)
        if p.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(f"patient {p.patient_id}: map grid {p.shape}; expected "
                             f"{self.image_size}×{self.image_size} in-plane")
        missing = [m for m in self.metabolites if m not in p.maps]
        if missing:
            raise ValueError(f"patient {p.patient_id}: no map for {missing}; expected {list(self.metabolites)}")
        brain = p.brain_mask.astype(bool)
        return {"id": p.patient_id, "maps": p.maps, "mask": p.quality_mask.astype(bool) & brain,
                "t1": prep.unit_range(p.t1), "flair": prep.unit_range(p.flair)}

    def set_lr_size(self, lr_size: int | None) -> None:
        """Fix the LR matrix size m for every int index (None: draw from lr_sizes per example)."""
        if lr_size is not None and not 1 <= int(lr_size) <= self.image_size:
            raise ValueError(f"LR size must be between 1 and {self.image_size}, got {lr_size}")
        self.lr_size = None if lr_size is None else int(lr_size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item) -> dict[str, Any]:
        i, m = item if isinstance(item, tuple) else (item, self.lr_size)
        if m is None:
            m = int(self.rng.choice(self.lr_sizes))
        pi, z, name = self.index[int(i)]
        vol = self._volumes[pi]
        images = [vol["maps"][name][:, :, z], vol["mask"][:, :, z], vol["t1"][:, :, z], vol["flair"][:, :, z]]
        if self.augment:
            images = augment(images, self.rng, self.max_shift)
        ex = make_example(*images, lr_size=m)
        return {"x0": torch.from_numpy(ex["x0"]), "cond": torch.from_numpy(ex["cond"]),
                "mask": torch.from_numpy(ex["mask"]), "scale": ex["scale"], "lr_size": ex["lr_size"],
                "norm": ex["norm"], "patient": vol["id"], "slice": int(z), "metabolite": name}


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker's SliceDataset its own augmentation/LR-size generator."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, SliceDataset):
        info.dataset.rng = np.random.default_rng(info.seed % 2**63)


class LRSizeBatchSampler(Sampler):
    """Batches of (index, m) pairs sharing one LR size m drawn uniformly from lr_sizes (paper: per batch)."""

    def __init__(self, dataset_size: int, batch_size: int, lr_sizes: Sequence[int] = LR_SIZES, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0):
        if dataset_size < 1 or batch_size < 1:
            raise ValueError(f"expected dataset_size ≥ 1 and batch_size ≥ 1, got {dataset_size}, {batch_size}")
        self.dataset_size, self.batch_size = int(dataset_size), int(batch_size)
        self.lr_sizes, self.shuffle, self.drop_last, self.seed = tuple(lr_sizes), shuffle, drop_last, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically per epoch."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.dataset_size) if self.shuffle else np.arange(self.dataset_size)
        for start in range(0, self.dataset_size, self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            m = int(rng.choice(self.lr_sizes))
            yield [(int(i), m) for i in batch]

    def __len__(self) -> int:
        full, rest = divmod(self.dataset_size, self.batch_size)
        return full if self.drop_last or not rest else full + 1


# ------------------------------------------------------------------------------------------- training
class BatchSource:
    """Random training batches of a SliceDataset: one LR size per batch (paper), reproducible from a generator."""

    def __init__(self, dataset: SliceDataset):
        self.dataset = dataset

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """dict(x0 (B,1,H,W), cond (B,4,H,W), scale (B,)) drawn with `generator` (indices, m, augmentation)."""
        ds = self.dataset
        m = ds.lr_sizes[int(torch.randint(len(ds.lr_sizes), (1,), generator=generator))]
        idx = torch.randint(len(ds), (int(batch_size),), generator=generator).tolist()
        ds.rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        items = [ds[(i, m)] for i in idx]
        return {"x0": torch.stack([it["x0"] for it in items]), "cond": torch.stack([it["cond"] for it in items]),
                "scale": torch.tensor([it["scale"] for it in items], dtype=torch.float32)}


def training_sources(root: str | Path, fold: int = 0, seed: int = 0, k: int = 5) -> tuple[BatchSource, BatchSource, dict]:
    """(train, validation, info) batch sources of a dataset folder for patient-level fold `fold` of k."""
    root = Path(root)
    ids = list_patients(root)
    if len(ids) < 3:
        raise ValueError(f"{root}: {len(ids)} patient folder(s); expected at least 3 (train/validation/test)")
    train_ids, val_ids, test_ids = patient_folds(ids, k=min(k, len(ids)), fold=fold, seed=seed)
    train = SliceDataset(load_dataset(root, train_ids), augment=True, seed=seed)
    val = SliceDataset(load_dataset(root, val_ids), augment=False, seed=seed + 1)
    info = {"dataset": str(root), "fold": fold, "folds": min(k, len(ids)), "split_seed": seed,
            "train": train_ids, "validation": val_ids, "test": test_ids,
            "train_examples": len(train), "validation_examples": len(val)}
    return BatchSource(train), BatchSource(val), info
