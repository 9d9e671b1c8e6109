"""Display choices shared by every view that compares maps: one window, one colour map, one interpolation.

Readers must compare methods, not display settings, so the zero-filled and super-resolved maps of a metabolite
get the same window/level (computed over both), the same colour table and the same interpolation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Preferred colour tables (Slicer node ids), first existing wins; the built-in tables always exist.
METABOLITE_COLORS = ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeIron")
UNCERTAINTY_COLORS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeRainbow")
GREY = "vtkMRMLColorTableNodeGrey"
OVERLAY_OPACITY = 0.6


def shared_window(arrays: Sequence[np.ndarray], upper_percentile: float = 99.5) -> tuple[float, float]:
    """(min, max) window common to all arrays: 0 (or the lowest value if negative) to a robust maximum.

    The maximum is a percentile of the finite nonzero voxels of all arrays pooled, so one hot voxel does not
    wash out the maps, and no array gets a window of its own.
    """
    if not arrays:
        raise ValueError("expected at least one array")
    if not 0 < upper_percentile <= 100:
        raise ValueError(f"upper_percentile must be in (0, 100], got {upper_percentile}")
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low = min(0.0, float(values.min()))
    nonzero = values[values != 0]
    high = float(np.percentile(nonzero, upper_percentile)) if nonzero.size else 0.0
    if high <= low:
        high = low + 1.0  # flat maps: any positive width keeps Slicer's window valid
    return low, high


def first_existing(ids: Sequence[str], exists) -> str:
    """The first colour node id for which exists(id) is true, else the last id (a built-in table)."""
    for node_id in ids:
        if exists(node_id):
            return node_id
    return ids[-1]
