"""Image-quality metrics as published (reference §6) plus in-mask variants. Math only.

Per 2D map on the whole image: NRMSE = ‖gt − out‖₂ / ‖gt‖₂; PSNR and SSIM with data_range = gt.max − gt.min;
SSIM with a 7×7 uniform window, K1 = 0.01, K2 = 0.03 and the sample covariance (scikit-image's defaults,
Wang et al. 2004). In-mask variants restrict the sums (and the SSIM map average) to the quality mask.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter


def _pair(gt, out):
    gt, out = np.asarray(gt, dtype=np.float64), np.asarray(out, dtype=np.float64)
    if gt.shape != out.shape or gt.ndim != 2:
        raise ValueError(f"expected two 2D maps of one shape, got {gt.shape} and {out.shape}")
    return gt, out


def _mask(mask, shape):
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask, dtype=bool)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} differs from the image shape {shape}")
    return m


def data_range(gt) -> float:
    gt = np.asarray(gt, dtype=np.float64)
    return float(gt.max() - gt.min())


def nrmse(gt, out, mask=None) -> float:
    """‖gt − out‖₂ / ‖gt‖₂ (inside mask if given)."""
    gt, out = _pair(gt, out)
    m = _mask(mask, gt.shape)
    denom = np.sqrt(np.sum(gt[m] ** 2))
    return float(np.sqrt(np.sum((gt[m] - out[m]) ** 2)) / denom) if denom > 0 else float("nan")


def psnr(gt, out, mask=None) -> float:
    """10·log10(range² / MSE), range = gt.max − gt.min of the whole map (inside-mask MSE if mask given)."""
    gt, out = _pair(gt, out)
    m = _mask(mask, gt.shape)
    mse = np.mean((gt[m] - out[m]) ** 2)
    rng = data_range(gt)
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(rng ** 2 / mse)) if rng > 0 else float("nan")


def ssim_map(gt, out, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004) with a uniform window and sample covariance, as scikit-image."""
    gt, out = _pair(gt, out)
    rng = data_range(gt)
    npix = win_size ** 2
    cov_norm = npix / (npix - 1)
    mu_x, mu_y = uniform_filter(gt, win_size), uniform_filter(out, win_size)
    vx = cov_norm * (uniform_filter(gt * gt, win_size) - mu_x * mu_x)
    vy = cov_norm * (uniform_filter(out * out, win_size) - mu_y * mu_y)
    vxy = cov_norm * (uniform_filter(gt * out, win_size) - mu_x * mu_y)
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * vxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (vx + vy + c2))


def ssim(gt, out, mask=None, win_size: int = 7) -> float:
    """Mean SSIM over the image without the (win_size−1)/2 border, as scikit-image; over the mask if given."""
    smap = ssim_map(gt, out, win_size)
    if mask is not None:
        return float(smap[_mask(mask, smap.shape)].mean())
    pad = (win_size - 1) // 2
    return float(smap[pad:-pad, pad:-pad].mean())


def all_metrics(gt, out, mask=None) -> dict[str, float]:
    """The published metrics on the whole map, plus in-mask NRMSE/PSNR/SSIM when a mask is given."""
    res = {"nrmse": nrmse(gt, out), "psnr": psnr(gt, out), "ssim": ssim(gt, out)}
    if mask is not None and np.any(mask):
        res.update(nrmse_mask=nrmse(gt, out, mask), psnr_mask=psnr(gt, out, mask), ssim_mask=ssim(gt, out, mask))
    return res
