"""Helpers on torch modules shared by the networks (unet, flow) and the tools that describe them."""
from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in all parameters of a module (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
