"""The one NIfTI-1 reader and writer of ftddm_core (nibabel): datasets (data.py) and super-resolve (volume.py).

The affine is voxel → RAS in mm. The writer stores it as the sform (code 1, scanner) and as the qform only
when its 3×3 part is a rotation times voxel sizes: a qform cannot hold a shear, so for a sheared affine it is
left unset (code 0) and every reader uses the exact sform (nifti1.h, methods 2 and 3).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_write

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: nibabel's names of the spatial units, as a factor to mm (every affine downstream is in mm).
_TO_MM = {"meter": 1000.0, "micron": 1e-3}


def is_nifti(path: str | Path) -> bool:
    """True when the file name ends in .nii or .nii.gz (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path, expected: str = "a .nii/.nii.gz volume") -> tuple[np.ndarray, np.ndarray]:
    """(float32 data in physical units (scl_slope/inter applied), voxel → RAS affine in mm) of a NIfTI file.

    ValueError naming the file and `expected` when nibabel cannot read it.
    """
    try:
        img = nib.load(str(path))
        data = img.get_fdata(dtype=np.float32)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise ValueError(f"{path}: not a readable NIfTI image ({err}); expected {expected}") from err
    affine = np.asarray(img.affine, dtype=np.float64)
    to_mm = _TO_MM.get(img.header.get_xyzt_units()[0], 1.0)
    if to_mm != 1.0:
        affine = affine.copy()
        affine[:3, :] *= to_mm
    return data, affine


def has_shear(affine: np.ndarray) -> bool:
    """True when the 3×3 part is not a rotation times voxel sizes (its columns are not orthogonal)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    rot = m / np.linalg.norm(m, axis=0)
    return not np.allclose(rot.T @ rot, np.eye(3), atol=1e-6)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, description: str = "", *,
               overwrite: bool = True) -> Path:
    """Write `array` (its dtype kept) with its voxel → RAS affine atomically (atomic.atomic_write), units mm.

    sform = affine (code 1); qform = affine (code 1) unless the affine has a shear, then unset (code 0).
    `description` goes into the header's descrip (at most 79 bytes). An existing file is refused unless overwrite.
    """
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=0 if has_shear(affine) else 1)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.header["descrip"] = description.encode()[:79].decode(errors="ignore").encode()  # no half character
    return atomic_write(path, lambda tmp: nib.save(img, tmp), overwrite=overwrite)
