"""Centred orthonormal k-space operations on the last two axes, for torch tensors and numpy arrays.

Convention (paper §1): k = fftshift(fft2(ifftshift(x), norm="ortho")), DC at index N//2; truncation keeps
the centred block [N//2 − m//2, N//2 − m//2 + m). Images on an m-point grid are scaled by √(N/m) per axis
when moved onto an N-point grid so that intensities keep their physical units. Math only.
"""
from __future__ import annotations

import numpy as np
import torch

Array = "np.ndarray | torch.Tensor"


def _lib(x):
    return torch if isinstance(x, torch.Tensor) else np


def fft2c(x):
    """Centred orthonormal 2D FFT over the last two axes."""
    if isinstance(x, torch.Tensor):
        x = x if x.is_complex() or x.dtype.is_floating_point else x.double()
        return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def ifft2c(k):
    """Centred orthonormal inverse 2D FFT over the last two axes."""
    if isinstance(k, torch.Tensor):
        return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def central_slices(full: tuple[int, int], block: tuple[int, int]) -> tuple[slice, slice]:
    """Slices selecting the centred `block` of a `full` k-space grid (both DCs at index n//2)."""
    out = []
    for n, m in zip(full, block):
        if not 1 <= m <= n:
            raise ValueError(f"k-space block size {m} must be between 1 and the grid size {n}")
        start = n // 2 - m // 2
        out.append(slice(start, start + m))
    return tuple(out)


def truncate_kspace(k, size):
    """Centred `size` (int or (h, w)) block of k-space k (…, H, W)."""
    sl = central_slices(tuple(k.shape[-2:]), _pair(size))
    return k[(..., *sl)]


def zero_pad_kspace(block, shape):
    """Embed a centred k-space block into zeros of `shape` (int or (H, W)) — inverse of truncate_kspace."""
    shape = _pair(shape)
    lib = _lib(block)
    if lib is torch:
        out = torch.zeros(block.shape[:-2] + shape, dtype=block.dtype, device=block.device)
    else:
        out = np.zeros(block.shape[:-2] + shape, dtype=block.dtype)
    out[(..., *central_slices(shape, tuple(block.shape[-2:])))] = block
    return out


def _unit_gain(small: tuple[int, int], large: tuple[int, int]) -> float:
    """Factor that keeps image intensity when an orthonormal spectrum moves from `small` to `large` grid."""
    return float(np.sqrt((large[0] * large[1]) / (small[0] * small[1])))


def downsample(x, size):
    """Low-resolution image on a `size` grid from k-space truncation of x (…, H, W); complex, same units."""
    size = _pair(size)
    full = tuple(x.shape[-2:])
    return ifft2c(truncate_kspace(fft2c(x), size)) / _unit_gain(size, full)


def zero_fill(lr, shape):
    """Zero-filled interpolation of lr (…, h, w) onto a `shape` grid; complex, same units."""
    shape = _pair(shape)
    small = tuple(lr.shape[-2:])
    return ifft2c(zero_pad_kspace(fft2c(lr), shape)) * _unit_gain(small, shape)


def low_pass(x, size):
    """Paper §1 degradation on the same grid: keep the centred `size` k-space block of x, zero the rest."""
    return zero_fill(downsample(x, size), tuple(x.shape[-2:]))


def data_consistency(x, measured_block, weight: float = 1.0):
    """Blend the measured centred k-space block into x's spectrum: K_c ← (1−λ)·K_c + λ·measured; λ=1 replaces.

    measured_block is in x's k-space units (e.g. ``truncate_kspace(fft2c(zero_filled_lr), m)``). Returns complex.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"data-consistency weight must be in [0, 1], got {weight}")
    k = fft2c(x)
    if _lib(k) is torch:
        k = k.clone()
        measured_block = torch.as_tensor(measured_block, dtype=k.dtype, device=k.device)
    else:
        k = k.copy()
    sl = (..., *central_slices(tuple(k.shape[-2:]), tuple(measured_block.shape[-2:])))
    k[sl] = (1.0 - weight) * k[sl] + weight * measured_block
    return ifft2c(k)
