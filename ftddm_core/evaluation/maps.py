"""The evaluated maps of a fold's test patients, per upscaling factor, in model space (ground truth, condition,
LR measurement); in-vivo-like grids as the training tiles around the mask centre, with their full slices."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import baselines, kspace, metrics
from ..data import SliceDataset, is_legacy_grid, list_patients, load_dataset, patient_folds
from .stats import MapId, gradient_ratio, high_frequency_ratio, kspace_consistency_error

#: The evaluation compares maps in model space (HR ⊙ M divided by the per-map intensity scale of its LR input).
MODEL_UNITS = "normalised units"
METRICS = ("nrmse", "psnr", "ssim", "nrmse_mask", "psnr_mask", "ssim_mask", "kspace_error", "gradient_ratio",
           "high_frequency_ratio")


def lr_size_for(scale: float, size: int = 64) -> int:
    """LR matrix m = size / s, which must be a whole number (s = 8, 4, 2, 6.4 … for a 64 grid)."""
    m = size / float(scale)
    if abs(m - round(m)) > 1e-6 or not 1 <= round(m) <= size:
        raise ValueError(f"upscaling factor {scale:g} gives an LR matrix of {m:.4g}; expected {size}/s to be a "
                         f"whole number between 1 and {size} (e.g. 8, 4, 2, 6.4)")
    return int(round(m))


@dataclass
class ScaleData:
    """The evaluated maps at one upscaling factor, in model space (ground truth, condition, LR measurement).

    Legacy 64×64 data: each map is a whole slice. Any other grid: each map is the T×T tile (data.tile_example
    without rng: around the mask centre) of a full n1×n2 slice whose LR map was derived on the whole slice;
    tile pixel (0, 0) is slice pixel ``tile_origins[i]`` (negative where the slice is smaller and zero-padded).
    """

    scale: float
    lr_size: int | None  # legacy: the LR matrix m (m×m → 64×64); tiles: None (see lr_shapes)
    ids: list[MapId]
    gt: np.ndarray  # (N, T, T) HR·M / norm
    mask: np.ndarray  # (N, T, T) bool
    lr: np.ndarray | list[np.ndarray]  # (N, m, m) or per map (m1, m2): measured LR maps of the slice, physical units
    norm: np.ndarray  # (N,)
    cond: torch.Tensor  # (N, 4, T, T)
    cond_scale: np.ndarray  # (N,) the factor the networks are conditioned on (tiles: the one actually applied)
    slice_shapes: list[tuple[int, int]]  # (n1, n2) of each map's full slice
    tile_origins: list[tuple[int, int]]  # slice pixel of tile pixel (0, 0)
    mask_in_tile: np.ndarray  # (N,) bool: the slice's whole mask lies inside the tile
    tiled: bool = False

    @property
    def lr_shapes(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in np.shape(x)) for x in self.lr]

    @property
    def lr_text(self) -> str:
        """'LR 16×16 → 64×64' (legacy) or the range of per-slice LR matrices and the tile size."""
        tile = self.gt.shape[-1]
        if not self.tiled:
            return f"LR {self.lr_size}×{self.lr_size} → {tile}×{tile}"
        shapes = sorted(self.lr_shapes, key=lambda m: m[0] * m[1])
        span = f"{shapes[0][0]}×{shapes[0][1]}" + (f" … {shapes[-1][0]}×{shapes[-1][1]}" if len(set(shapes)) > 1
                                                     else "")
        return f"LR {span} per slice, {tile}×{tile} tiles"

    def on_slice(self, i: int, image: np.ndarray) -> np.ndarray | None:
        """A map-i tile image placed on its full slice (zeros elsewhere); None when the slice's mask reaches
        outside the tile (the masked output is then unknown there)."""
        if not self.mask_in_tile[i]:
            return None
        return place_tile(np.asarray(image), self.tile_origins[i], self.slice_shapes[i])

    def kspace_error(self, i: int, image: np.ndarray) -> float:
        """kspace_consistency_error of a masked map-i output on its slice's grid (NaN: mask outside the tile)."""
        full = self.on_slice(i, image)
        return float("nan") if full is None else kspace_consistency_error(full, self.lr[i], self.norm[i])

    def high_frequency_ratio(self, i: int, image: np.ndarray) -> float:
        """high_frequency_ratio of a map-i output against its ground truth outside the measured block."""
        if not self.tiled:
            return high_frequency_ratio(self.gt[i], image, self.lr_size)
        out, gt = self.on_slice(i, image), self.on_slice(i, self.gt[i])
        return float("nan") if out is None else high_frequency_ratio(gt, out, self.lr_shapes[i])


def _overlap(origin: Sequence[int], tile: int, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slice-grid slices, tile-grid slices) where a tile×tile window at `origin` overlaps an n1×n2 slice."""
    on_slice, on_tile = [], []
    for o, n in zip(origin, shape):
        lo, hi = max(int(o), 0), min(int(o) + tile, int(n))
        on_slice.append(slice(lo, max(hi, lo)))
        on_tile.append(slice(lo - int(o), max(hi, lo) - int(o)))
    return tuple(on_slice), tuple(on_tile)


def cut_tile(image: np.ndarray, origin: Sequence[int], tile: int) -> np.ndarray:
    """The tile×tile window of a full-slice image (…, n1, n2) whose pixel (0, 0) is slice pixel `origin`."""
    image = np.asarray(image)
    on_slice, on_tile = _overlap(origin, tile, image.shape[-2:])
    out = np.zeros(image.shape[:-2] + (tile, tile), dtype=image.dtype)
    out[(..., *on_tile)] = image[(..., *on_slice)]
    return out


def place_tile(image: np.ndarray, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The inverse of cut_tile: a tile (…, T, T) on a zero n1×n2 slice grid."""
    image = np.asarray(image)
    on_slice, on_tile = _overlap(origin, image.shape[-1], shape)
    out = np.zeros(image.shape[:-2] + tuple(int(n) for n in shape), dtype=image.dtype)
    out[(..., *on_slice)] = image[(..., *on_tile)]
    return out


def select_subset(n: int, max_maps: int | None) -> np.ndarray:
    """Indices of at most max_maps maps spread evenly over n (all when None)."""
    if max_maps is None or max_maps >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, int(max_maps)).round().astype(int))


def test_split(data_dir: Path, fold: int, split_seed: int) -> tuple[list[str], list[str]]:
    """(all patients, test patients) of `fold` with the split training uses (data.training_sources)."""
    ids = list_patients(data_dir)
    if len(ids) < 3:
        raise ValueError(f"{data_dir}: {len(ids)} patient folder(s); expected at least 3 (train/validation/test)")
    _, _, test = patient_folds(ids, k=min(5, len(ids)), fold=fold, seed=split_seed)
    return ids, test


def load_test_maps(data_dir: Path, test_ids: Sequence[str], scales: Sequence[float], max_maps: int | None,
                   image_size: int = 64) -> dict[float, ScaleData]:
    """Per scale: the test maps (SliceDataset, no augmentation), GT ⊙ M and the LR measurement.

    Legacy data (every map image_size²) keeps the fixed LR size m = image_size / s per scale; any other grid
    gives the image_size² tiles around the mask centre of examples derived on the full slice with factor s.
    """
    patients = load_dataset(data_dir, test_ids)
    by_id = {p.patient_id: p for p in patients}
    ds = SliceDataset(patients, augment=False, image_size=image_size)
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: no slice of the test patients {list(test_ids)} has enough mask voxels; "
                         "expected maps with a quality/brain mask")
    pick = select_subset(len(ds), max_maps)
    legacy = is_legacy_grid(patients, image_size)
    if legacy:
        for s in scales:
            lr_size_for(s, image_size)
    load = _legacy_scale_data if legacy else _tiled_scale_data
    return {float(s): load(ds, pick, by_id, float(s), image_size) for s in scales}


def _legacy_scale_data(ds, pick, by_id, s: float, image_size: int) -> ScaleData:
    """The paper's 64×64 maps: whole slices, LR m×m with m = image_size / s."""
    m = lr_size_for(s, image_size)
    ds.set_lr_size(m)
    items = [ds[int(i)] for i in pick]
    hr = np.stack([by_id[it["patient"]].maps[it["metabolite"]][:, :, it["slice"]] for it in items])
    gt = np.stack([it["x0"][0].numpy() for it in items])
    mask = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
    norm = np.array([it["norm"] for it in items], dtype=np.float64)
    if not np.allclose(gt, hr * mask / norm[:, None, None], rtol=1e-4, atol=1e-5):
        raise AssertionError("dataset ground truth is not HR·M / norm; the evaluation's LR derivation is stale")
    n = len(items)
    return ScaleData(scale=s, lr_size=m, ids=[(it["patient"], it["slice"], it["metabolite"]) for it in items],
                     gt=gt, mask=mask, lr=np.abs(kspace.downsample(hr.astype(np.float64), m)), norm=norm,
                     cond=torch.stack([it["cond"] for it in items]), cond_scale=np.full(n, s),
                     slice_shapes=[hr.shape[-2:]] * n, tile_origins=[(0, 0)] * n, mask_in_tile=np.ones(n, bool))


def _tiled_scale_data(ds, pick, by_id, s: float, image_size: int) -> ScaleData:
    """Maps on any grid: LR of the full slice with factor s (m_a = round(n_a / s)), cut to the training tile."""
    items = [ds[(int(i), s)] for i in pick]
    gt, mask, lr, shapes, origins, inside = [], [], [], [], [], []
    for it in items:
        patient = by_id[it["patient"]]
        z, norm = it["slice"], float(it["norm"])
        hr = patient.maps[it["metabolite"]][:, :, z].astype(np.float64)
        full_mask = (patient.quality_mask & patient.brain_mask)[:, :, z]
        origin = tuple(int(v) for v in it["tile_origin"])
        measured = np.abs(kspace.downsample(hr, tuple(it["lr_shape"])))
        tile_mask = it["mask"][0].numpy() > 0.5
        tile_gt = it["x0"][0].numpy()
        # the dataset's tile must be the full slice's HR·M / norm and |zf(LR)| / norm cut at its origin
        if not (np.array_equal(tile_mask, cut_tile(full_mask, origin, image_size))
                and np.allclose(tile_gt, cut_tile(hr * full_mask / norm, origin, image_size), rtol=1e-4, atol=1e-5)):
            raise AssertionError("dataset ground truth is not HR·M / norm of the full slice cut at the tile origin; "
                                 "the evaluation's tiling is stale")
        lr_channel = cut_tile(baselines.zero_filled(measured, hr.shape) / norm, origin, image_size)
        signal = bool(it["cond"][0].any())  # a map without signal in M has no scale: its LR channel is left at 0
        if signal and not np.allclose(it["cond"][0].numpy(), lr_channel, rtol=1e-4, atol=1e-5):
            raise AssertionError("dataset LR channel is not |zero-fill(LR)| / norm of the full slice; the "
                                 "evaluation's LR derivation is stale")
        gt.append(tile_gt)
        mask.append(tile_mask)
        lr.append(measured)
        shapes.append(hr.shape)
        origins.append(origin)
        inside.append(int(tile_mask.sum()) == int(full_mask.sum()))
    return ScaleData(scale=s, lr_size=None, ids=[(it["patient"], it["slice"], it["metabolite"]) for it in items],
                     gt=np.stack(gt), mask=np.stack(mask), lr=lr,
                     norm=np.array([it["norm"] for it in items], dtype=np.float64),
                     cond=torch.stack([it["cond"] for it in items]),
                     cond_scale=np.array([it["scale"] for it in items], dtype=np.float64), slice_shapes=shapes,
                     tile_origins=origins, mask_in_tile=np.array(inside, dtype=bool), tiled=True)


def dataset_fingerprint(data_dir: Path, patient_ids: Sequence[str]) -> str:
    """SHA-256 over dataset.json and the (name, size, mtime) of every file of the given patients."""
    h = hashlib.sha256()
    meta = data_dir / "dataset.json"
    if meta.is_file():
        h.update(meta.read_bytes())
    for pid in patient_ids:
        for f in sorted((data_dir / pid).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(data_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def map_metrics(data: ScaleData, i: int, out: np.ndarray) -> dict[str, float]:
    """Published metrics on the whole map (tile), their in-mask variants, the k-space consistency error and the
    two sharpness ratios (1 = as sharp as the truth)."""
    row = {k: float("nan") for k in METRICS}
    row.update(metrics.all_metrics(data.gt[i], out, data.mask[i]))
    row["kspace_error"] = data.kspace_error(i, out)
    row["gradient_ratio"] = gradient_ratio(data.gt[i], out, data.mask[i])
    row["high_frequency_ratio"] = data.high_frequency_ratio(i, out)
    return row
