"""Voxel grids without Slicer: array order, IJK → RAS affines, slice axis and upscaling factor.

The slice-axis rule and the LR matrix check are the engine's own (ftddm_core.lr_grid, torch-free).
Conventions (shared with ftddm_core.volume):
* Slicer arrays (``slicer.util.arrayFromVolume``) are indexed [k, j, i]; NIfTI/ftddm arrays are (i, j, k).
* An affine is the 4×4 voxel (i, j, k, 1) → RAS (mm) matrix, i.e. Slicer's IJKToRAS matrix and the NIfTI sform.
* The engine's output grid keeps the direction and the field of view of the LR grid (sample-aligned centred-FFT
  zero-fill, see ftddm_core/volume.py): each in-plane axis m → round(F·m) with --factor F, or a square m×m
  matrix → model size² by default (lr_grid.inplane_target, the engine's rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ftddm_core import lr_grid
from ftddm_core.options import TRAINED_SCALES

MODEL_SIZE = 64  # in-plane matrix of the engine's model grid
AUTOMATIC_MATRICES = lr_grid.lr_matrix_range(MODEL_SIZE, TRAINED_SCALES)  # square m×m the automatic grid takes


def kji_to_ijk(array: np.ndarray) -> np.ndarray:
    """Slicer [k, j, i(, c)] array → NIfTI (i, j, k(, c)) order (a view; no copy)."""
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a 3D [k, j, i] or 4D [k, j, i, c] array, got shape {array.shape}")
    return np.transpose(array, (2, 1, 0) + ((3,) if array.ndim == 4 else ()))


def ijk_to_kji(array: np.ndarray) -> np.ndarray:
    """NIfTI (i, j, k(, c)) array → Slicer [k, j, i(, c)] order (the transpose is its own inverse)."""
    return kji_to_ijk(array)


def check_affine(affine, name: str = "affine") -> np.ndarray:
    """A finite, invertible 4×4 voxel → RAS matrix with last row (0, 0, 0, 1), as float64."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"{name}: expected a 4×4 matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    if not np.allclose(a[3], (0, 0, 0, 1)):
        raise ValueError(f"{name}: expected last row (0, 0, 0, 1), got {a[3].tolist()}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"{name}: expected an invertible voxel → RAS matrix (zero spacing or collinear axes)")
    return a


def world_affine(ijk_to_ras, parent_to_world=None) -> np.ndarray:
    """IJK → world RAS of a volume under a linear parent transform (the transform applies after IJKToRAS)."""
    a = check_affine(ijk_to_ras, "IJKToRAS")
    if parent_to_world is None:
        return a
    return check_affine(parent_to_world, "parent transform to world") @ a


def lps_to_ras(affine) -> np.ndarray:
    """Flip an affine between LPS (ITK) and RAS (Slicer, NIfTI): negate the x and y rows."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ check_affine(affine)


def spacing(affine) -> np.ndarray:
    """Voxel size along i, j, k: the column norms of the 3×3 part."""
    return np.linalg.norm(check_affine(affine)[:3, :3], axis=0)


def direction(affine) -> np.ndarray:
    """Unit direction (RAS) of each voxel axis, as columns."""
    a = check_affine(affine)
    return a[:3, :3] / spacing(a)


def voxel_to_ras(affine, ijk) -> np.ndarray:
    """RAS position of voxel index/indices (..., 3)."""
    a = check_affine(affine)
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ a[:3, :3].T + a[:3, 3]


def detect_slice_axis(shape, affine) -> int:
    """The through-slab voxel axis of an MRSI grid: the engine's rule (ftddm_core.lr_grid.slice_axis_rule)."""
    return lr_grid.slice_axis_rule(shape, spacing(affine), direction(affine)[2])


@dataclass(frozen=True)
class OutputGrid:
    """The in-plane output grid the engine will produce (ftddm_core.volume.target_grid's, without the affine)."""

    axis: int  # slice axis
    lr_inplane: tuple[int, int]  # (m1, m2) along lr_grid.inplane_axes(axis)
    inplane: tuple[int, int]  # (n1, n2)
    factor: float  # F: the requested factor (--factor), or model_size/m by default
    scale: float  # s the model is conditioned on when automatic: √(n1/m1·n2/m2), = F unless round() is inexact


def lr_inplane(shape, affine, slice_axis: int = -1) -> tuple[int, tuple[int, int]]:
    """(slice axis, LR in-plane matrix (m1, m2)): the detected slice axis unless slice_axis is 0, 1 or 2."""
    axis = detect_slice_axis(shape, affine) if slice_axis < 0 else lr_grid.check_axis(slice_axis)
    return axis, tuple(int(shape[a]) for a in lr_grid.inplane_axes(axis))


def output_grid(shape, affine, factor: float = 0.0, *, model_size: int = MODEL_SIZE, slice_axis: int = -1,
                force: bool = False) -> OutputGrid:
    """The grid `ftddm super-resolve --factor F` (0: automatic) makes of this LR grid, by the engine's rule
    (lr_grid.inplane_target); ValueError (the engine's message) where the engine refuses it."""
    axis, matrix = lr_inplane(shape, affine, slice_axis)
    requested, inplane = lr_grid.inplane_target(matrix, model_size, factor=factor, scale_range=TRAINED_SCALES,
                                                force=force)
    return OutputGrid(axis, matrix, inplane, requested, lr_grid.realised_factor(matrix, inplane))


def detect_upscaling_factor(shape, affine, model_size: int = MODEL_SIZE,
                            slice_axis: int = -1) -> tuple[int, int, float]:
    """(slice axis, LR in-plane matrix m, factor s = model_size / m) the engine will use for this grid without
    a factor F: a square m×m in-plane matrix in the trained range; ValueError (the engine's) otherwise."""
    grid = output_grid(shape, affine, model_size=model_size, slice_axis=slice_axis)
    return grid.axis, grid.lr_inplane[0], grid.scale


def same_grid(shape_a, affine_a, shape_b, affine_b, rtol: float = 1e-4) -> bool:
    """True if two volumes share dimensions and voxel → RAS geometry (to rtol of the voxel size)."""
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        return False
    a, b = check_affine(affine_a), check_affine(affine_b)
    tol = rtol * float(np.max(spacing(a)))
    return bool(np.allclose(a[:3, :3], b[:3, :3], atol=tol) and np.allclose(a[:3, 3], b[:3, 3], atol=tol))


def slice_centre_ras(shape, affine, axis: int, index: int) -> np.ndarray:
    """RAS position of the centre of slice `index` along voxel axis `axis` (used to jump views to a slice)."""
    shape = tuple(int(n) for n in shape[:3])
    if not 0 <= index < shape[axis]:
        raise ValueError(f"slice index {index} outside 0 … {shape[axis] - 1}")
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    centre[axis] = index
    return voxel_to_ras(affine, centre)
