"""A small synthetic glioma patient for Slicer's Sample Data module (numpy only, works offline).

Analytic anatomy in RAS millimetres (head, cortex, white matter, ventricles, a lesion with a necrotic core)
sampled onto:
* T1 and FLAIR: 2.5 mm isotropic, LAS voxel axes (i points left, as in many NIfTI exports), int16;
* MRSI NAA and tCho: 16×16×6 slab, 13.75 mm in-plane, 10 mm slices, tilted 12° about the R axis, float32.
  Each LR map is made like an acquisition: the map at 64×64 (3.44 mm, three sub-slices averaged for the slice
  profile) is truncated to its central 16×16 k-space (centred FFT), so the LR grid has the same origin as the
  model grid (ftddm_core's sample-aligned convention).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from . import geometry, niftiio

SEED = 20240
MRSI_MATRIX, MODEL_MATRIX, MRSI_SLICES = 16, 64, 6
MRSI_SPACING = (13.75, 13.75, 10.0)
MRI_SPACING = 2.5
MRI_SHAPE = (88, 104, 72)
TILT_DEG = 12.0

# tissue → (T1, FLAIR, NAA, tCho): arbitrary MR units and millimolar-like metabolite levels
TISSUES = {
    "background": (0, 0, 0.0, 0.0),
    "scalp": (80, 60, 0.0, 0.0),
    "csf": (25, 8, 0.0, 0.0),
    "grey": (65, 85, 9.0, 1.8),
    "white": (105, 65, 11.0, 2.0),
    "lesion": (55, 160, 3.0, 4.5),
    "necrosis": (30, 40, 0.5, 1.0),
}
_ORDER = tuple(TISSUES)

# file name → (node name, SHA-256 of the shipped file); refreshed by Resources/SampleData/make_sample_patient.py
SAMPLE_FILES = {
    "MRSISR_Synthetic_NAA.nii.gz": ("Synthetic_NAA", "b8432dfad7abc57187b8aa8763707b9b1ebe394428eb1f5effb921c2e52f53a8"),
    "MRSISR_Synthetic_tCho.nii.gz": ("Synthetic_tCho", "9613a1b72d88552d977f87f8f43a564c4bfa1b24e768c71a097263ace8128c11"),
    "MRSISR_Synthetic_T1.nii.gz": ("Synthetic_T1", "f108340aecea0a295ae1f4ff4408ad970def92cf230ac74d4d8199e1324262e8"),
    "MRSISR_Synthetic_FLAIR.nii.gz": ("Synthetic_FLAIR", "911d978556b99857daf892976ca33cc09cf069b2671211879daa80e3993f2036"),
}
SAMPLE_NAME = "MRSISyntheticPatient"


def tissue_labels(ras: np.ndarray) -> np.ndarray:
    """Index into TISSUES of each RAS point (..., 3), by nested ellipsoids (later regions win)."""
    p = np.asarray(ras, dtype=np.float64) - np.array([0.0, 0.0, 10.0])

    def inside(centre, semi):
        return np.sum(((p - np.asarray(centre)) / np.asarray(semi)) ** 2, axis=-1) <= 1.0

    label = np.zeros(p.shape[:-1], dtype=np.int8)
    label[inside((0, 0, 0), (75, 95, 80))] = _ORDER.index("scalp")
    label[inside((0, 0, 0), (66, 86, 69))] = _ORDER.index("csf")
    label[inside((0, 0, 0), (64, 84, 67))] = _ORDER.index("grey")
    label[inside((0, 0, 0), (59, 79, 62))] = _ORDER.index("white")
    for x in (-10.0, 10.0):
        label[inside((x, 5, 8), (6, 22, 9))] = _ORDER.index("csf")
    label[inside((28, -20, 15), (14, 14, 14))] = _ORDER.index("lesion")
    label[inside((28, -20, 15), (5, 5, 5))] = _ORDER.index("necrosis")
    return label


def _property(labels: np.ndarray, column: int) -> np.ndarray:
    table = np.array([TISSUES[t][column] for t in _ORDER], dtype=np.float64)
    return table[labels]


def mri_affine() -> np.ndarray:
    """T1/FLAIR voxel → RAS: LAS axes, 2.5 mm, centred on the head."""
    a = np.diag([-MRI_SPACING, MRI_SPACING, MRI_SPACING, 1.0])
    centre = (np.asarray(MRI_SHAPE) - 1) / 2
    a[:3, 3] = np.array([0.0, 0.0, 10.0]) - a[:3, :3] @ centre
    return a


def mrsi_affine() -> np.ndarray:
    """LR MRSI voxel → RAS: 13.75 × 13.75 × 10 mm, slab tilted TILT_DEG about R, centred on the brain."""
    t = np.deg2rad(TILT_DEG)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(MRSI_SPACING)
    centre = np.array([(MRSI_MATRIX - 1) / 2, (MRSI_MATRIX - 1) / 2, (MRSI_SLICES - 1) / 2])
    a[:3, 3] = np.array([0.0, 0.0, 22.0]) - a[:3, :3] @ centre
    return a


def _grid_points(affine: np.ndarray, shape) -> np.ndarray:
    """RAS (mm) of every voxel centre of a grid, shape (*shape, 3)."""
    return geometry.voxel_to_ras(affine, np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1))


def _truncate_kspace(hr: np.ndarray, m: int) -> np.ndarray:
    """Keep the central m×m of the centred 2D spectrum of each (i, j) slice; image scale preserved."""
    n = hr.shape[0]
    spec = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(hr, axes=(0, 1)), axes=(0, 1)), axes=(0, 1))
    lo = n // 2 - m // 2
    centre = spec[lo:lo + m, lo:lo + m]
    lr = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(centre, axes=(0, 1)), axes=(0, 1)), axes=(0, 1))
    return np.real(lr) * (m / n) ** 2


def synthetic_patient(seed: int = SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"NAA", "tCho", "T1", "FLAIR"} → (array (i, j, k), voxel → RAS affine)."""
    rng = np.random.default_rng(seed)
    out = {}
    mri = mri_affine()
    labels = tissue_labels(_grid_points(mri, MRI_SHAPE))
    for name, column in (("T1", 0), ("FLAIR", 1)):
        image = _property(labels, column)
        image = image + rng.normal(0.0, 2.0, image.shape) * (labels > 0)
        out[name] = (np.clip(np.round(image), 0, None).astype(np.int16), mri)

    lr_affine = mrsi_affine()
    hr_affine = lr_affine.copy()
    hr_affine[:3, :2] /= MODEL_MATRIX / MRSI_MATRIX  # same origin and directions, in-plane spacing / 4
    hr_shape = (MODEL_MATRIX, MODEL_MATRIX, MRSI_SLICES)
    profile = [_grid_points(hr_affine, hr_shape) + hr_affine[:3, 2] * dk for dk in (-1 / 3, 0.0, 1 / 3)]
    hr_labels = [tissue_labels(p) for p in profile]
    for name, column in (("NAA", 2), ("tCho", 3)):
        hr = np.mean([_property(lab, column) for lab in hr_labels], axis=0)
        lr = _truncate_kspace(hr, MRSI_MATRIX)
        lr = lr + rng.normal(0.0, 0.03 * float(lr.max()), lr.shape)
        out[name] = (np.clip(lr, 0, None).astype(np.float32), lr_affine)
    return out


def sample_file_names() -> dict[str, str]:
    """Metabolite/MRI key → shipped file name."""
    return {"NAA": "MRSISR_Synthetic_NAA.nii.gz", "tCho": "MRSISR_Synthetic_tCho.nii.gz",
            "T1": "MRSISR_Synthetic_T1.nii.gz", "FLAIR": "MRSISR_Synthetic_FLAIR.nii.gz"}


def write_sample_patient(folder, seed: int = SEED) -> dict[str, Path]:
    """Write the synthetic patient as reproducible .nii.gz files; returns key → path."""
    folder = Path(folder)
    names = sample_file_names()
    return {key: niftiio.write_nifti(folder / names[key], data, affine)
            for key, (data, affine) in synthetic_patient(seed).items()}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
