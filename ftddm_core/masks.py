"""Automatic quality masks on the target grid: the brain from the T1 and the LR maps' signal support.

Used when the user gives no --mask: mask = signal support of the zero-filled LR maps ∧ brain from the T1.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from . import prep
from .volume import from_slices, to_slices


def largest_component(binary: np.ndarray) -> np.ndarray:
    """The largest connected component (face connectivity) of a binary array, as bool; all of it if ≤ 1 piece."""
    labels, n = ndimage.label(binary)
    if n <= 1:
        return binary.astype(bool)
    sizes = ndimage.sum(binary, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def brain_mask(t1: np.ndarray, axis: int = 0, erosion: int = 1) -> np.ndarray:
    """Brain from a T1 on the target grid: Otsu threshold, largest 3D component, per-slice holes filled, eroded.

    The erosion treats outside the grid as brain (border_value=1), so a brain cut by the MRSI field of view
    (partial coverage) keeps its voxels at the grid edge; only the boundary with the background is eroded.
    """
    from skimage.filters import threshold_otsu

    t1 = np.asarray(t1, dtype=np.float64)
    if np.ptp(t1) == 0:
        return np.zeros(t1.shape, dtype=bool)
    brain = largest_component(t1 > threshold_otsu(t1.ravel()))  # ravel: 3D, not RGB
    slices = to_slices(brain, axis)
    out = np.empty_like(slices)
    for n, sl in enumerate(slices):
        filled = ndimage.binary_fill_holes(sl)
        out[n] = ndimage.binary_erosion(filled, iterations=erosion, border_value=1) if erosion > 0 else filled
    return from_slices(out, axis)


#: Connected pieces of the MRSI signal support smaller than this many LR voxels are noise, not signal.
MIN_SUPPORT_LR_VOXELS = 4


def _clean_support(raw: np.ndarray, cell: tuple[float, float]) -> np.ndarray:
    """One slice of a thresholded |LR_zf|: opening by one LR voxel (cell = HR pixels per LR voxel, ≥ 2 pixels),
    pieces under MIN_SUPPORT_LR_VOXELS dropped, holes filled. Noise in a zero-filled map is correlated over
    one LR voxel, so a speck of noise above the threshold is about that size (thinner at its peak)."""
    size = tuple(max(2, int(math.ceil(c - 1e-9))) for c in cell)
    pad = tuple((k, k) for k in size)
    opened = ndimage.binary_opening(np.pad(raw, pad, mode="edge"), structure=np.ones(size, bool))
    opened = opened[pad[0][0]:-pad[0][1], pad[1][0]:-pad[1][1]]  # edge padding: the FOV edge is not a boundary
    labels, n = ndimage.label(opened)
    if n:
        areas = ndimage.sum(opened, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(areas >= MIN_SUPPORT_LR_VOXELS * cell[0] * cell[1]) + 1
        opened = np.isin(labels, keep)
    return ndimage.binary_fill_holes(opened)


#: A support voxel must exceed this many noise standard deviations (besides `fraction` of the robust max).
NOISE_K = 3.0


def noise_sigma(slice_zf: np.ndarray, cell: tuple[float, float] = (1.0, 1.0)) -> float:
    """Robust noise σ of one zero-filled slice: MAD/0.6745 (Donoho & Johnstone, Biometrika 1994) of second
    differences taken one LR voxel apart (ceil(cell) HR pixels, so the samples are ~independent), / √6 (the
    variance of a second difference of white noise is 6σ²). The median ignores edges; a smooth map gives ≈ 0."""
    img = np.asarray(slice_zf, dtype=np.float64)
    diffs = []
    for ax, c in enumerate(cell):
        k = max(1, int(math.ceil(c - 1e-9)))
        if img.shape[ax] > 2 * k:
            a = np.take(img, np.arange(2 * k, img.shape[ax]), axis=ax)
            b = np.take(img, np.arange(k, img.shape[ax] - k), axis=ax)
            c0 = np.take(img, np.arange(0, img.shape[ax] - 2 * k), axis=ax)
            diffs.append(np.abs(a - 2 * b + c0).ravel())
    if not diffs:
        return 0.0
    return float(np.median(np.concatenate(diffs)) / 0.6745 / math.sqrt(6.0))


def signal_support(lr_zf: np.ndarray, axis: int = 0, fraction: float = 0.05,
                   percentile: float = prep.SCALE_PERCENTILE, cell: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Per slice: |LR_zf| > max(fraction × robust maximum, NOISE_K × noise σ), cleaned (:func:`_clean_support`).

    The robust maximum is the `percentile` of |LR_zf| in that slice and σ is :func:`noise_sigma`, so any
    intensity unit gives the same support; the noise term and the cleaning keep a noisy map's background
    (noise above 5 % of the maximum) from making the support salt-and-pepper. `cell` = HR pixels per LR voxel
    along the two in-plane axes (n_a/m_a).
    """
    mag = to_slices(np.abs(np.asarray(lr_zf)), axis)
    robust_max = np.percentile(mag.reshape(len(mag), -1), percentile, axis=1)
    out = np.zeros(mag.shape, dtype=bool)
    for n, (sl, peak) in enumerate(zip(mag, robust_max)):
        if peak > 0:
            threshold = max(fraction * peak, NOISE_K * noise_sigma(sl, cell))
            out[n] = _clean_support(sl > threshold, tuple(cell))
    return from_slices(out, axis)


def auto_mask(lr_zf: np.ndarray, t1: np.ndarray | None = None, axis: int = 0, *, fraction: float = 0.05,
              erosion: int = 1, cell: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Quality mask when the user gives none: brain_mask(T1) AND signal_support(|LR_zf|).

    * Brain (if a T1 resampled onto the target grid is given): voxels above the Otsu threshold of the T1
      volume, keep the largest 3D connected component (drops skull/eye fragments), fill holes slice by slice
      (ventricles and lesions stay in), erode by `erosion` voxels (drops the skull/lipid rim).
    * MRSI signal support, slice by slice: |zero-filled LR| > `fraction` (5%) of that slice's robust maximum
      (99.5th percentile, as prep.normalisation_scale) and > NOISE_K noise σ — excludes regions without MRSI
      signal; opened by one LR voxel (`cell` = n/m per in-plane axis), specks under MIN_SUPPORT_LR_VOXELS
      dropped, holes filled.
    Arrays share one shape, in volume order with slice `axis` (axis=0 for an (N, H, W) slice stack).
    """
    support = signal_support(lr_zf, axis, fraction, cell=cell)
    if t1 is None:
        return support
    t1 = np.asarray(t1)
    if t1.shape != support.shape:
        raise ValueError(f"T1 shape {t1.shape} differs from the LR shape {support.shape}; resample T1 first")
    return support & brain_mask(t1, axis, erosion)
