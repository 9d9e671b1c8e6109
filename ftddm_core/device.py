"""Device selection ("auto" = CUDA → Apple MPS → CPU), the precision decision (bf16 only where it is native) and
the images per network call ("auto" = cache-sized on a CPU, memory-sized on a GPU)."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .options import DEVICES, PRECISIONS


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
    """bf16 autocast on the given device when asked, else a no-op; whether to ask is choose_precision's call."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded torch.Generator living on `device` (CUDA sampling draws on the GPU)."""
    g = torch.Generator(device=device if device.type == "cuda" else "cpu")
    g.manual_seed(int(seed))
    return g


# --- precision: bf16 only where the hardware computes it natively -------------------------------------------
@dataclass(frozen=True)
class Precision:
    """The precision decision of a run, as recorded in run.json: what was asked, what is used, and why."""

    asked: str  # "auto" | "fp32" | "bf16"
    used: str  # "fp32" | "bf16"
    why: str

    @property
    def bf16(self) -> bool:
        return self.used == "bf16"

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_features() -> dict:
    """What the CPU offers for bf16: torch's kernel capability and the AMX / AVX512-BF16 instruction sets."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux; elsewhere only torch's own probes answer
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    probe = getattr(torch, "cpu", None)
    amx = "amx_bf16" in flags or bool(getattr(probe, "_is_amx_tile_supported", lambda: False)())
    avx512_bf16 = "avx512_bf16" in flags or bool(getattr(probe, "_is_avx512_bf16_supported", lambda: False)())
    return {"capability": torch.backends.cpu.get_cpu_capability(), "amx_bf16": amx, "avx512_bf16": avx512_bf16}


def choose_precision(device: torch.device, asked: str = "auto") -> Precision:
    """fp32 or bf16 for inference on `device`: bf16 only where it is native and pays.

    "auto" picks bf16 on a CUDA GPU that supports it and on a CPU with AMX (tile matrix units). An AVX512-BF16
    CPU without AMX stays fp32 under "auto" but runs bf16 when asked: on this project's AMD EPYC (Zen 5) bf16
    inference measured ~1.3× faster, training slower, and it moves SR maps by up to ~1 % of their maximum
    (bench/profile_v2.txt), so the default keeps fp32's numerics there. Asked for bf16 where it is not native
    (an AVX2 CPU, where bf16 was measured more than 5× slower, or MPS), it warns and runs fp32.
    """
    if asked not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {asked!r}")
    if asked == "fp32":
        return Precision(asked, "fp32", "fp32 asked")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(asked, "bf16", f"{'auto: ' if asked == 'auto' else ''}CUDA GPU with bf16")
        return _no_native(asked, "this CUDA GPU has no bf16")
    if device.type != "cpu":
        return _no_native(asked, f"bf16 autocast is not used on {device.type}")
    cpu = cpu_features()
    if cpu["amx_bf16"]:
        return Precision(asked, "bf16", f"{'auto: ' if asked == 'auto' else ''}CPU with AMX-BF16")
    if cpu["avx512_bf16"]:
        if asked == "bf16":
            return Precision(asked, "bf16", "bf16 asked; CPU with AVX512-BF16 (no AMX)")
        return Precision(asked, "fp32", "auto: AVX512-BF16 without AMX keeps fp32 (bf16 is opt-in here: "
                                        "--precision bf16)")
    return _no_native(asked, f"this CPU has no native bf16 (capability {cpu['capability']}, no AMX/AVX512-BF16)")


def _no_native(asked: str, reason: str) -> Precision:
    if asked == "bf16":
        warnings.warn(f"bf16 was asked but {reason}: running fp32 (bf16 would be emulated, and slower)",
                      stacklevel=3)
        return Precision(asked, "fp32", f"bf16 asked, but {reason}: fp32")
    return Precision(asked, "fp32", f"auto: {reason}; fp32")


# --- images per network call ----------------------------------------------------------------------------------
#: max_batch = 0 ("auto") on a CPU: measured on 2 AVX-512 cores (bench/profile_v2.txt), 16 images of 64×64 per
#: call run 20–45 % faster per image than 64 (the activations stay in the caches); few enough for any laptop.
CPU_AUTO_BATCH = 16
#: On a GPU, "auto" fills half the free memory at this many bytes per image pixel (the compact encoder's live
#: activations with skips, ~1.2 kB per 64×64 pixel in fp32, times a safety factor of ~3), within these bounds.
GPU_BYTES_PER_PIXEL = 4096
GPU_AUTO_BATCH_RANGE = (64, 4096)


def auto_batch(device: torch.device, requested: int, image_pixels: int = 64 * 64) -> int:
    """Images per network call: `requested` if > 0, else (0 = auto) CPU_AUTO_BATCH on a CPU and, on a GPU, as
    many as half its free memory holds. Chunking never changes a chain (each owns its noise): only speed."""
    if requested > 0:
        return int(requested)
    if requested < 0:
        raise ValueError(f"max_batch must be ≥ 1, or 0 for auto, got {requested}")
    if device.type != "cuda":
        return CPU_AUTO_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(0.5 * free // (GPU_BYTES_PER_PIXEL * max(int(image_pixels), 1)))
    low, high = GPU_AUTO_BATCH_RANGE
    return max(low, min(high, fit))
