"""Valid-region masks for zero-padded images: what keeps the fully convolutional networks exact under padding.

An image padded at the bottom/right to the networks' multiple carries a ``valid`` mask (B, 1, H, W); the
networks re-zero everything outside it before every 3×3 convolution, which is exactly what the convolution's
own zero padding sees on the unpadded image. Math only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x with everything outside the valid image region set to 0 (no-op without a mask)."""
    return x if valid is None else x * valid.to(x.dtype)


def valid_pyramid(valid: torch.Tensor | None, levels: int) -> list[torch.Tensor | None]:
    """The valid mask at resolutions 1, ½, …, 1/2**(levels−1); a cell is valid if any of its pixels is."""
    if valid is None:
        return [None] * levels
    out = [valid]
    for _ in range(levels - 1):
        out.append(F.max_pool2d(out[-1], 2, ceil_mode=True))
    return out


def valid_size(valid: torch.Tensor) -> tuple[int, int]:
    """(H, W) of the unpadded image inside a bottom/right-padded canvas (FTDDM.pad pads only there)."""
    return int(valid[0, 0, :, 0].sum()), int(valid[0, 0, 0, :].sum())
