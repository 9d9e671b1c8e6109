"""Device selection ("auto" = CUDA → Apple MPS → CPU) and optional bf16 autocast."""
from __future__ import annotations

import contextlib

import torch

from .options import DEVICES


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a user's choice; "auto" picks CUDA, then MPS, then CPU."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES} (or cuda:N)")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device auto or cpu")
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was requested but Apple MPS is not available; use --device auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the given device when asked (1.6–2.2× faster on AVX-512 CPUs), else a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded torch.Generator living on `device` (CUDA sampling draws on the GPU)."""
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")
    g.manual_seed(int(seed))
    return g
