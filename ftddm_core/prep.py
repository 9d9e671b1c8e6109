"""Model-space preparation shared by training and inference: intensity scale, MRI scaling, condition y.

Nothing here may look at a ground truth: the scale of a map comes from its zero-filled LR input inside the
mask, exactly as at inference (a deployed tool has no HR map; see reference §7). Math only.
"""
from __future__ import annotations

import numpy as np
import torch

#: Percentile of |LR_zf| inside the mask used as a map's intensity scale (robust to Gibbs overshoot).
SCALE_PERCENTILE = 99.5
#: Fewer mask voxels than this in a map and the whole map is used for its scale.
MIN_MASK_VOXELS = 16


def normalisation_scale(lr_zf: np.ndarray, mask: np.ndarray, percentile: float = SCALE_PERCENTILE) -> np.ndarray:
    """Per-map intensity scale (…,) = robust maximum of |LR_zf| (…, H, W) inside mask; 0 for an empty map."""
    lr = np.abs(np.asarray(lr_zf, dtype=np.float64))
    m = np.broadcast_to(np.asarray(mask, dtype=bool), lr.shape)
    flat, mflat = lr.reshape(-1, *lr.shape[-2:]), m.reshape(-1, *lr.shape[-2:])
    out = np.empty(len(flat))
    for i, (img, msk) in enumerate(zip(flat, mflat)):
        vals = img[msk] if msk.sum() >= MIN_MASK_VOXELS else img.ravel()
        out[i] = np.percentile(vals, percentile) if vals.size else 0.0
    return out.reshape(lr.shape[:-2])


def unit_range(image: np.ndarray, mask: np.ndarray | None = None, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale an MRI volume to [0, 1] by its robust [low, high] percentiles (inside mask if given), clipped."""
    img = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError("MRI volume contains NaN or inf voxels")
    vals = img[np.asarray(mask, dtype=bool)] if mask is not None and np.any(mask) else img.ravel()
    lo, hi = np.percentile(vals, [low, high])
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def build_condition(lr_zf_norm, mask, t1, flair) -> torch.Tensor:
    """Stack y = [LR_zf, M, T1, FLAIR] (each (N, H, W), already in model space) into (N, 4, H, W) float32."""
    parts = [torch.as_tensor(np.asarray(p) if not isinstance(p, torch.Tensor) else p, dtype=torch.float32)
             for p in (lr_zf_norm, mask, t1, flair)]
    shape = parts[0].shape
    for name, p in zip(("LR", "mask", "T1", "FLAIR"), parts):
        if p.ndim != 3 or p.shape != shape:
            raise ValueError(f"{name} must have shape (N, H, W) = {tuple(shape)}, got {tuple(p.shape)}")
    return torch.stack(parts, dim=1)


def model_inputs(lr: np.ndarray, mask: np.ndarray, t1: np.ndarray, flair: np.ndarray, size=64):
    """LR maps on their own m1×m2 grid (N, m1, m2; physical units) → (cond (N, 4, H, W), intensity (N,), |LR_zf|).

    ``size`` is the target grid, an int (square) or (H, W). The one derivation shared by training and
    inference: centred zero-fill onto the target grid, magnitude, per-map intensity scale = robust max of
    |LR_zf| inside the mask, y = [|LR_zf|/intensity, M, T1, FLAIR]. Maps with an empty signal get intensity 0
    (their LR channel is left at 0). (Not the upscaling factor s, which the networks are conditioned on.)
    """
    from . import kspace

    lr = np.asarray(lr)
    if lr.ndim != 3:
        raise ValueError(f"LR maps must be (N, m1, m2), got shape {lr.shape}")
    lr_zf = np.abs(kspace.zero_fill(lr, size)).astype(np.float32)
    mask = np.asarray(mask, dtype=bool)
    intensity = normalisation_scale(lr_zf, mask)
    safe = np.where(intensity > 0, intensity, 1.0)[:, None, None]
    cond = build_condition((lr_zf / safe) * (intensity[:, None, None] > 0), mask, t1, flair)
    return cond, intensity, lr_zf
