"""Non-learned baselines on the sample-aligned model grid: zero-filling and bicubic interpolation."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

from . import kspace
from .volume import hr_origin_index


def zero_filled(lr: np.ndarray, size: int | tuple[int, int] = 64) -> np.ndarray:
    """|centred k-space zero-fill| of LR maps (…, m1, m2) onto size×size or size = (n1, n2) (the paper's
    'zero-filling')."""
    return np.abs(kspace.zero_fill(np.asarray(lr), size)).astype(np.float32)


def bicubic(lr: np.ndarray, size: int | tuple[int, int] = 64) -> np.ndarray:
    """Cubic-spline interpolation of LR maps (…, m1, m2) at the sample positions of the size×size or (n1, n2)
    model grid (the same grid as zero-fill)."""
    lr = np.asarray(lr, dtype=np.float64)
    m1, m2 = lr.shape[-2:]
    n1, n2 = (size, size) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
    # LR index of each HR voxel centre, per axis
    rows, cols = (hr_origin_index(m, n) + np.arange(n) * m / n for m, n in ((m1, n1), (m2, n2)))
    ii, jj = np.meshgrid(rows, cols, indexing="ij")
    flat = lr.reshape(-1, m1, m2)
    out = np.stack([map_coordinates(img, [ii, jj], order=3, mode="nearest") for img in flat])
    return out.reshape(lr.shape[:-2] + (n1, n2)).astype(np.float32)
