"""Non-learned baselines on the sample-aligned model grid: zero-filling and bicubic interpolation."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

from . import kspace
from .volume import hr_origin_index


def zero_filled(lr: np.ndarray, size: int = 64) -> np.ndarray:
    """|centred k-space zero-fill| of LR maps (…, m, m) onto size×size (the paper's 'zero-filling')."""
    return np.abs(kspace.zero_fill(np.asarray(lr), size)).astype(np.float32)


def bicubic(lr: np.ndarray, size: int = 64) -> np.ndarray:
    """Cubic-spline interpolation of LR maps (…, m, m) at the model grid's sample positions (same grid as zero-fill)."""
    lr = np.asarray(lr, dtype=np.float64)
    m = lr.shape[-1]
    coords = hr_origin_index(m, size) + np.arange(size) * m / size  # LR index of each HR voxel centre
    ii, jj = np.meshgrid(coords, coords, indexing="ij")
    flat = lr.reshape(-1, m, m)
    out = np.stack([map_coordinates(img, [ii, jj], order=3, mode="nearest") for img in flat])
    return out.reshape(lr.shape[:-2] + (size, size)).astype(np.float32)
