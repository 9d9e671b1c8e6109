"""Geometry, resampling and image I/O for `ftddm super-resolve`: NIfTI through :mod:`ftddm_core.nifti` (the one
NIfTI reader/writer, which data.py uses too), other formats and DICOM series folders through SimpleITK.

Conventions
-----------
* A :class:`Volume` holds ``data`` in nibabel order (i, j, k[, c]) — metabolites (or any channel) on the 4th
  axis — and ``affine``, the 4×4 voxel → RAS (mm) matrix: ``xyz = affine @ (i, j, k, 1)``.
* ITK/SimpleITK are LPS and store arrays as (k, j, i): converting negates the first two rows of the affine
  and transposes the array (:func:`to_sitk`, :func:`from_sitk`).

Target grid of the centred FFT zero-fill (sample-aligned)
---------------------------------------------------------
Each in-plane axis is refined on its own: m samples of spacing Δ → N samples (N = round(F·m), rounding half
up; or the model's 64 for the default square case), spacing Δ·m/N, so the field of view m·Δ = N·(Δ·m/N) is
kept exactly. ``kspace.fft2c`` puts DC at index N//2 (``ifftshift`` first), so image sample n of an N-point grid
sits at position (n − N//2)·Δ·m/N relative to the point the Fourier phase refers to (LR sample m//2).
Zero-filling keeps the spectrum (and that reference point) and evaluates the same band-limited
(trigonometric) interpolant on the finer grid. Equating positions,

    (n − N//2)·Δ·m/N = (i − m//2)·Δ   ⇔   i = m//2 + (n − N//2)·m/N,

so HR voxel n sits at LR continuous index i₀ + n·m/N with **i₀ = m//2 − (N//2)·m/N** (:func:`hr_origin_index`),
per axis. Even m and even N (every trained LR size 8…32 onto 64, and any even m with an integer F): i₀ = 0,
HR voxel 0 is LR voxel 0 — same origin. The odd-size rule, from the same formula:

* odd m, even N: i₀ = −½ (the HR grid starts half an LR voxel earlier);
* even m, odd N: i₀ = +m/(2N) (half an HR voxel later);
* odd m, odd N: i₀ = −½·(1 − m/N) (half an LR voxel minus half an HR voxel earlier: the outer voxel edges meet).

Direction and slice axis are untouched; the voxel *edges* are not aligned in general (that would be a
different, non-FFT convention). Verified in Testing/ftddm_core/test_volume.py against the unique band-limited
interpolant of LR samples evaluated at the HR voxel centres' physical positions, for rectangular, odd and
unequal-FOV matrices and F = 2, 2.5, 3, 4.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import kspace, prep
from .lr_grid import FOV_RTOL, check_axis, inplane_axes, inplane_target, realised_factor, slice_axis_rule
from .nifti import is_nifti, read_nifti, save_nifti

#: RAS ↔ LPS: negate x and y.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Relative tolerance for "same grid" and "same field of view" comparisons.
GRID_RTOL = 1e-4


# ---------------------------------------------------------------------------------------------- Volume
@dataclass
class Volume:
    """An image in nibabel order (i, j, k[, c]) with its voxel → RAS (mm) affine; `path` only for messages."""

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None

    def __post_init__(self):
        self.data = np.asarray(self.data)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim not in (3, 4):
            raise ValueError(f"{self.name}: expected a 3D volume (i, j, k) or 4D (i, j, k, channels), "
                             f"got shape {self.data.shape}")
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise ValueError(f"{self.name}: expected a finite 4×4 affine, got {self.affine.shape}")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise ValueError(f"{self.name}: the affine is singular (zero voxel size or degenerate axes)")

    @property
    def name(self) -> str:
        return self.path or "<array>"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial matrix (i, j, k); channels are not included."""
        return tuple(int(n) for n in self.data.shape[:3])

    @property
    def n_channels(self) -> int:
        return 1 if self.data.ndim == 3 else int(self.data.shape[3])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) along i, j, k = norms of the affine's columns."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3×3 unit direction cosines (columns = i, j, k axes) in RAS."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def fov(self) -> np.ndarray:
        """Field of view (mm) along i, j, k = matrix × spacing."""
        return np.asarray(self.shape) * self.spacing

    def with_data(self, data: np.ndarray, path: str | None = None) -> "Volume":
        """Same geometry, new data (same spatial shape)."""
        data = np.asarray(data)
        if data.shape[:3] != self.shape:
            raise ValueError(f"new data has spatial shape {data.shape[:3]}, expected {self.shape}")
        return Volume(data, self.affine.copy(), path if path is not None else self.path)

    def channel(self, c: int) -> "Volume":
        """The 3D volume of channel c (a 3D volume is its own channel 0)."""
        if self.data.ndim == 3:
            if c != 0:
                raise ValueError(f"{self.name} is 3D: only channel 0 exists")
            return self
        return Volume(self.data[..., c], self.affine.copy(), self.path)

    def voxel_to_world(self, ijk) -> np.ndarray:
        """RAS (mm) of (continuous) voxel indices (…, 3)."""
        return apply_affine(self.affine, ijk)

    def world_to_voxel(self, xyz) -> np.ndarray:
        """Continuous voxel indices of RAS points (…, 3)."""
        return apply_affine(np.linalg.inv(self.affine), xyz)


def apply_affine(affine, points) -> np.ndarray:
    """Points (…, 3) through a 4×4 affine: p @ A[:3, :3]ᵀ + A[:3, 3] (voxel → RAS mm for a voxel affine)."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def grid_centres(affine, shape) -> np.ndarray:
    """RAS (mm) of every voxel centre of a grid, shape (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1)
    return apply_affine(affine, ijk)


def volume_from_array(data, affine, path: str | None = None) -> Volume:
    """A :class:`Volume` from an (i, j, k[, c]) array and a voxel → RAS affine (validated)."""
    return Volume(np.asarray(data), np.asarray(affine, dtype=np.float64), path)


# ---------------------------------------------------------------------------------------- SimpleITK
def _geometry_to_lps(affine: np.ndarray) -> tuple[list, list, list]:
    """(spacing, direction (row-major), origin) of an ITK image with the given voxel → RAS affine."""
    lps = _LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return spacing.tolist(), direction.ravel().tolist(), lps[:3, 3].tolist()


def _affine_from_itk(image: sitk.Image) -> np.ndarray:
    """Voxel → RAS affine of the first three axes of an ITK image."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing())[:3]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = np.asarray(image.GetOrigin())[:3]
    return _LPS @ lps


def to_sitk(volume: Volume) -> sitk.Image:
    """SimpleITK image (LPS) of a volume; 4D data becomes a vector image (one component per channel)."""
    data = np.asarray(volume.data)
    if np.iscomplexobj(data):
        raise ValueError(f"{volume.name}: complex data cannot go to SimpleITK; take the magnitude first")
    if data.dtype == np.float16 or data.dtype == bool:
        data = data.astype(np.float32)
    # ITK arrays are (k, j, i[, c]).
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0) + ((3,) if data.ndim == 4 else ())))
    image = sitk.GetImageFromArray(arr, isVector=data.ndim == 4)
    spacing, direction, origin = _geometry_to_lps(volume.affine)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def from_sitk(image: sitk.Image, path: str | None = None) -> Volume:
    """Volume (RAS, (i, j, k[, c])) of a 3D scalar/vector or 4D scalar SimpleITK image."""
    name = path or "<SimpleITK image>"
    dim = image.GetDimension()
    if dim < 3:
        raise ValueError(f"{name}: a {dim}D image; expected a 3D volume (i, j, k) or 4D (i, j, k, channels)")
    if dim > 4:
        raise ValueError(f"{name}: a {dim}D image; expected at most 4D (i, j, k, channels)")
    arr = sitk.GetArrayFromImage(image)  # (k, j, i[, c]) or (t, k, j, i)
    if dim == 4:
        arr = np.moveaxis(arr, 0, -1)  # → (k, j, i, t)
    if arr.ndim == 4:
        data = np.transpose(arr, (2, 1, 0, 3))
    else:
        data = np.transpose(arr, (2, 1, 0))
    return Volume(np.ascontiguousarray(data), _affine_from_itk(image), path)


# ---------------------------------------------------------------------------------------------- loading
@contextlib.contextmanager
def _quiet_itk():
    """Silence ITK's own WARNING lines (e.g. "No Series were found" for a folder) while we read: the error we
    raise says what is wrong, in one line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_with_sitk(path: Path) -> sitk.Image:
    try:
        with _quiet_itk():
            return _read_series_or_file(path)
    except (RuntimeError, ValueError) as err:
        reason = next((ln.strip() for ln in reversed(str(err).splitlines()) if ln.strip()), type(err).__name__)
        raise ValueError(f"{path}: not a readable image ({reason}); "
                         "expected NIfTI (.nii/.nii.gz), a format SimpleITK reads (.nrrd, .mha, .mhd, …) "
                         "or a DICOM series folder") from err


def _read_series_or_file(path: Path) -> sitk.Image:
    """A DICOM series folder (exactly one series) or an image file, with SimpleITK."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ValueError("no DICOM series in the folder")
        if len(series) > 1:
            raise ValueError(f"{len(series)} DICOM series in the folder ({', '.join(series)}); "
                             "put one series per folder")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _squeeze_extra_axes(data: np.ndarray) -> np.ndarray:
    """Drop singleton axes after the third (NIfTI stores vectors on the 5th axis, e.g. (x, y, z, 1, c))."""
    keep = [a for a in range(data.ndim) if a < 3 or data.shape[a] != 1]
    return data.reshape([data.shape[a] for a in keep])


def _check_values(data: np.ndarray, name: str, nan_policy: str, allow_all_zero: bool) -> np.ndarray:
    if nan_policy not in ("raise", "zero"):
        raise ValueError(f"nan_policy must be 'raise' or 'zero', got {nan_policy!r}")
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        msg = f"{name}: {n_bad} of {data.size} voxels are NaN or inf"
        if nan_policy == "raise":
            raise ValueError(msg + "; fix the file, or pass --nan-policy zero (Python: nan_policy='zero') "
                             "to set them to 0")
        warnings.warn(msg + "; they were set to 0", stacklevel=3)
        data = np.where(bad, 0, data).astype(data.dtype)
    if not allow_all_zero and not np.any(data):
        raise ValueError(f"{name}: every voxel is 0; expected a map with signal")
    return data


def load_volume(path, *, nan_policy: str = "raise", allow_all_zero: bool = False) -> Volume:
    """Read a 3D (or 4D, channels last) image: NIfTI with nibabel, anything else (or a DICOM folder) with SimpleITK.

    Data come back in physical units (NIfTI scaling applied) as float32, the affine in mm RAS.
    NaN/inf voxels: ``nan_policy="raise"`` (default) refuses, ``"zero"`` sets them to 0 with a warning.
    An all-zero image is refused unless ``allow_all_zero`` (e.g. an optional mask).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; expected an image volume")
    if is_nifti(path):
        data, affine = read_nifti(path)
    else:
        image = _read_with_sitk(path)
        if image.GetDimension() < 3:
            raise ValueError(f"{path}: a {image.GetDimension()}D image; expected a 3D volume (i, j, k) "
                             "or 4D (i, j, k, channels)")
        vol = from_sitk(image, str(path))
        data, affine = vol.data, vol.affine
        if not np.iscomplexobj(data):
            data = data.astype(np.float32)
    if data.ndim < 3:
        raise ValueError(f"{path}: a {data.ndim}D image of shape {data.shape}; expected a 3D volume "
                         "(a single slice is (X, Y, 1)) or 4D (i, j, k, channels)")
    data = _squeeze_extra_axes(data)
    if data.ndim > 4:
        raise ValueError(f"{path}: a {data.ndim}D image of shape {data.shape}; expected 3D or 4D "
                         "(i, j, k, channels)")
    data = _check_values(data, str(path), nan_policy, allow_all_zero)
    return Volume(data, affine, str(path))


# ---------------------------------------------------------------------------------------------- saving
def save_volume(volume: Volume, path, *, overwrite: bool = False) -> Path:
    """Write a NIfTI (.nii/.nii.gz) with nifti.save_nifti: float32 data unchanged (input units), sform = affine
    and qform = affine unless it has a shear, mm.

    The file appears complete or not at all, with the mode the umask gives a new file (atomic.atomic_write).
    An existing file is refused unless overwrite=True.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: output must be a NIfTI file ending in .nii or .nii.gz")
    if np.iscomplexobj(volume.data):
        raise ValueError(f"{path}: complex data cannot be saved; take the magnitude (np.abs) first")
    return save_nifti(np.asarray(volume.data, dtype=np.float32), volume.affine, path, overwrite=overwrite)


# ------------------------------------------------------------------------------------------- slice axis
def slice_axis(volume: Volume, override: int | None = None) -> int:
    """The through-slab voxel axis of an MRSI volume (``override`` 0/1/2 wins): lr_grid.slice_axis_rule, the one
    rule (the Slicer module uses it too)."""
    if override is not None:
        return check_axis(override)
    return slice_axis_rule(volume.shape, volume.spacing, volume.direction[2])


# ------------------------------------------------------------------------------------------ target grid
def hr_origin_index(m: int, n: int) -> float:
    """LR continuous index of HR voxel 0 when the centred FFT zero-fills m samples onto n: m//2 − (n//2)·m/n."""
    return m // 2 - (n // 2) * m / n


@dataclass(frozen=True)
class ModelGrid:
    """Target (zero-filled / SR) grid and how it was derived from the LR volume.

    factor: the realised in-plane upscaling s = √((n1/m1)·(n2/m2)) (geometric mean over the two in-plane
    axes; equals F unless round(F·m) is not exact); requested_factor: F (--factor, or 64/m by default).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    factor: float
    axis: int
    lr_inplane: tuple[int, int]  # (m1, m2) along inplane_axes(axis)
    inplane: tuple[int, int]  # (n1, n2) along inplane_axes(axis)
    requested_factor: float

    @property
    def lr_matrix(self) -> int:
        """The largest in-plane LR matrix (the m of an m×m input)."""
        return max(self.lr_inplane)


def _refine_axes(affine: np.ndarray, shape: tuple, new_sizes: dict) -> tuple[np.ndarray, tuple]:
    """Affine/shape after zero-filling each axis a in new_sizes from its size to new_sizes[a] (sample-aligned,
    module doc): HR voxel 0 at LR index hr_origin_index(m, N), spacing Δ·m/N (the FOV kept), same direction."""
    out, shape = affine.copy(), list(shape)
    for a, n in new_sizes.items():
        m = shape[a]
        out[:3, 3] += affine[:3, a] * hr_origin_index(m, n)
        out[:3, a] = affine[:3, a] * (m / n)
        shape[a] = int(n)
    return out, tuple(shape)


def target_grid(lr: Volume, axis: int, model_size: int = 64, *, factor: float = 0.0, scale_range=(2.0, 8.0),
                force: bool = False) -> ModelGrid:
    """The output grid of an LR volume; direction, field of view and slice axis kept, sample-aligned (module doc).

    factor F > 0: each in-plane axis m_a → round(F·m_a) (rectangular, odd and unequal-FOV matrices alike).
    factor 0 (default): a square m×m matrix goes onto model_size² (F = model_size/m, the trained range
    lr_matrix_range); anything else is refused with a message naming --factor.
    """
    axes = inplane_axes(axis)
    lr_inplane = tuple(int(lr.shape[a]) for a in axes)
    requested, inplane = inplane_target(lr_inplane, model_size, factor=factor, scale_range=scale_range, force=force,
                                        name=lr.name)
    affine, shape = _refine_axes(lr.affine, lr.shape, dict(zip(axes, inplane)))
    return ModelGrid(affine, shape, realised_factor(lr_inplane, inplane), axis, lr_inplane, inplane, requested)


def squarify_inplane(volume: Volume, axis: int) -> Volume:
    """Zero-pad the k-space of a non-square in-plane matrix (m1 ≠ m2, equal FOVs) to max(m1, m2)².

    No longer needed by super_resolve (target_grid takes any m1×m2 with --factor); kept for callers that want
    a square LR matrix.

    Returns complex data (the exact band-limited interpolant, so a later zero-fill equals zero-filling the
    original block directly; take the magnitude after the final zero-fill). Refuses unequal fields of view:
    k-space padding can only refine the sampling of the same FOV.
    """
    axes = inplane_axes(axis)
    m1, m2 = (volume.shape[a] for a in axes)
    if m1 == m2:
        return volume
    fov1, fov2 = (volume.fov[a] for a in axes)
    if not math.isclose(fov1, fov2, rel_tol=FOV_RTOL):
        raise ValueError(f"{volume.name}: in-plane matrix {m1}×{m2} with fields of view {fov1:.2f}×{fov2:.2f} mm; "
                         "k-space zero-padding to a square matrix needs equal in-plane FOVs — resample the map "
                         "to a square grid first")
    size = max(m1, m2)
    slices = to_slices(volume.data, axis)
    padded = kspace.zero_fill(slices, size)  # per in-plane axis: m → size (a no-op on the larger one)
    affine, _ = _refine_axes(volume.affine, volume.shape, {a: size for a in axes})
    return Volume(from_slices(padded, axis), affine, volume.path)


# ---------------------------------------------------------------------------------------- slice layout
def to_slices(data, axis: int) -> np.ndarray:
    """(i, j, k[, c]) → (*c, N, a, b): channels first, then the slice axis; in-plane axes in order at (−2, −1)."""
    data = data.data if isinstance(data, Volume) else np.asarray(data)
    axis = check_axis(axis)
    if data.ndim not in (3, 4):
        raise ValueError(f"expected (i, j, k) or (i, j, k, c) data, got shape {data.shape}")
    if data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
    return np.moveaxis(data, data.ndim - 3 + axis, data.ndim - 3)


def from_slices(arr, axis: int) -> np.ndarray:
    """Inverse of :func:`to_slices`: (*c, N, a, b) → (i, j, k[, c])."""
    arr = np.asarray(arr)
    axis = check_axis(axis)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected (N, a, b) or (c, N, a, b) slices, got shape {arr.shape}")
    out = np.moveaxis(arr, arr.ndim - 3, arr.ndim - 3 + axis)
    return np.moveaxis(out, 0, 3) if out.ndim == 4 else out


# ------------------------------------------------------------------------------------------- resampling
def _reference_image(affine: np.ndarray, shape) -> sitk.Image:
    ref = sitk.Image([int(n) for n in shape[:3]], sitk.sitkFloat32)
    spacing, direction, origin = _geometry_to_lps(np.asarray(affine, dtype=np.float64))
    ref.SetSpacing(spacing)
    ref.SetDirection(direction)
    ref.SetOrigin(origin)
    return ref


def antialias_sigma_mm(source_spacing, target_affine) -> np.ndarray:
    """Gaussian pre-filter σ (mm) per source axis so a finer image is averaged over the coarser target voxel.

    σ = ½·√(Δ_target² − Δ_source²) with Δ_target the target's smallest voxel size (0 when not coarser).
    """
    target = float(np.linalg.norm(np.asarray(target_affine, dtype=np.float64)[:3, :3], axis=0).min())
    src = np.asarray(source_spacing, dtype=np.float64)
    return 0.5 * np.sqrt(np.clip(target ** 2 - src ** 2, 0.0, None))


def resample_to_grid(volume: Volume, affine, shape, *, interpolation: str = "linear",
                     default: float = 0.0, antialias: bool = True) -> np.ndarray:
    """Values of `volume` at the voxel centres of the (affine, shape) grid, in physical space (SimpleITK).

    Returns float32 (i, j, k[, c]); points outside the moving volume get `default`. With linear interpolation
    onto a coarser grid the image is first smoothed (antialias_sigma_mm), so a 1 mm T1 becomes what a 3.4 mm
    voxel sees instead of an aliased point sample. Training data (data.py) goes through this same function.
    """
    methods = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in methods:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    ref = _reference_image(affine, shape)
    channels = [volume.channel(c) for c in range(volume.n_channels)]
    sigma = antialias_sigma_mm(volume.spacing, affine)
    out = []
    for vol in channels:
        moving = to_sitk(Volume(np.asarray(vol.data, dtype=np.float32), vol.affine, vol.path))
        if antialias and interpolation == "linear" and np.any(sigma > 0.05 * volume.spacing):
            moving = sitk.SmoothingRecursiveGaussian(moving, [float(max(s, 1e-6)) for s in sigma])
        res = sitk.Resample(moving, ref, sitk.Transform(), methods[interpolation], float(default), sitk.sitkFloat32)
        out.append(np.transpose(sitk.GetArrayFromImage(res), (2, 1, 0)))
    return out[0] if volume.data.ndim == 3 else np.stack(out, axis=-1)


def overlap_fraction(moving: Volume, target_affine, target_shape) -> float:
    """Fraction of the target grid's voxel centres that lie inside the moving volume's voxels."""
    ijk = moving.world_to_voxel(grid_centres(target_affine, target_shape))
    inside = np.all((ijk >= -0.5) & (ijk <= np.asarray(moving.shape) - 0.5), axis=-1)
    return float(inside.mean())


def check_overlap(moving: Volume, target_affine, target_shape, min_fraction: float = 0.5,
                  target_name: str | None = None) -> float:
    """ValueError unless ≥ min_fraction of the target (MRSI) field of view is covered by `moving` (T1/FLAIR)."""
    frac = overlap_fraction(moving, target_affine, target_shape)
    if frac < min_fraction:
        raise ValueError(f"{moving.name} covers only {100 * frac:.0f}% of the MRSI field of view of "
                         f"{target_name or 'the target grid'} (need ≥ {100 * min_fraction:.0f}%); "
                         "are they from the same session and in the same scanner coordinates?")
    return frac


def resample_mask(mask: Volume, affine, shape) -> np.ndarray:
    """A (quality) mask on the target grid: nearest neighbour, non-zero → True; outside its FOV → False."""
    return resample_to_grid(mask, affine, shape, interpolation="nearest", default=0.0) != 0


def prepare_mri(t1: Volume, flair: Volume, affine, shape, mask=None, *, target_name: str | None = None,
                min_overlap: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """T1 and FLAIR resampled (linear) onto the target grid and scaled to [0, 1] by prep.unit_range.

    The robust percentiles are taken over the whole target volume (inside `mask`, a target-grid boolean array,
    when given). Each image must cover ≥ min_overlap of the target field of view.
    """
    out = []
    for image in (t1, flair):
        check_overlap(image, affine, shape, min_overlap, target_name)
        resampled = resample_to_grid(image, affine, shape, interpolation="linear")
        out.append(prep.unit_range(resampled, mask))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- grid checks
def same_grid(a: Volume, b: Volume) -> bool:
    """Same spatial matrix and affine (to GRID_RTOL of the voxel size)."""
    tol = GRID_RTOL * float(min(a.spacing.min(), b.spacing.min()))
    return a.shape == b.shape and np.allclose(a.affine, b.affine, rtol=0, atol=tol)


def check_same_grid(volumes) -> None:
    """ValueError naming the files whose matrix or affine differs from the first volume's."""
    volumes = list(volumes)
    if not volumes:
        raise ValueError("expected at least one volume")
    ref = volumes[0]
    differ = [(v, grid_differences(ref, v)) for v in volumes[1:] if not same_grid(ref, v)]
    if differ:
        what = ", ".join(f"{v.name} ({'; '.join(d)})" for v, d in differ)
        raise ValueError(f"metabolite volumes must share one grid: {what} differ from {ref.name}; "
                         "resample them to one MRSI grid first")


def grid_differences(a: Volume, b: Volume) -> list[str]:
    """What differs in b's grid from a's, in words with both values: matrix, spacing, origin, direction."""
    tol = GRID_RTOL * float(min(a.spacing.min(), b.spacing.min()))
    fmt = lambda x: "(" + ", ".join(f"{v:.4g}" for v in np.ravel(x)) + ")"  # noqa: E731
    out = []
    if a.shape != b.shape:
        out.append(f"matrix {b.shape} vs {a.shape}")
    if not np.allclose(a.spacing, b.spacing, rtol=0, atol=tol):
        out.append(f"spacing {fmt(b.spacing)} vs {fmt(a.spacing)} mm")
    if not np.allclose(a.origin, b.origin, rtol=0, atol=tol):
        out.append(f"origin {fmt(b.origin)} vs {fmt(a.origin)} mm (RAS)")
    if not np.allclose(a.direction, b.direction, rtol=0, atol=GRID_RTOL):
        out.append("direction (axes orientation)")
    return out or ["affine"]


def stack_channels(volumes) -> Volume:
    """3D volumes on one grid → one 4D volume (channels last)."""
    volumes = list(volumes)
    check_same_grid(volumes)
    if any(v.data.ndim != 3 for v in volumes):
        raise ValueError("stack_channels expects 3D volumes")
    return Volume(np.stack([v.data for v in volumes], axis=-1), volumes[0].affine.copy(), volumes[0].path)
