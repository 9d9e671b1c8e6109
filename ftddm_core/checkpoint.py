"""Safetensors files with a JSON header: the only weight format ftddm reads (never pickles)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .atomic import atomic_write

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_safetensors_file(path: str | Path) -> Path:
    """Refuse missing files and pickles before safetensors parses anything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # a safetensors header length can itself start with a pickle opcode (e.g. 640 = b"\x80\x02…"): the JSON
    # brace at byte 8 tells them apart
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    pickle_magic = any(head.startswith(m) for m in _PICKLE_MAGIC) and not looks_safetensors
    if pickle_magic or path.suffix in (".pt", ".pth", ".ckpt", ".pkl"):
        raise ValueError(
            f"{path} looks like a PyTorch pickle checkpoint; ftddm only loads .safetensors files because "
            "unpickling a file can run arbitrary code. Convert it where you trust it (ftddm.model.save)."
        )
    if len(head) < 9 or head[8:9] != b"{":
        raise ValueError(f"{path} is not a safetensors file (expected an 8-byte header length then JSON)")
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a clear error for corrupt or truncated files."""
    path = check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} is corrupt or truncated and cannot be read as safetensors: {exc}") from exc
    return tensors, metadata


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      *, overwrite: bool = False) -> Path:
    """Write atomically with the umask's file mode (atomic.atomic_write); refuse to replace unless overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:  # before moving the tensors: refusing should cost nothing
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite/--force) to replace it")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    text_meta = {k: str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=text_meta))


def json_metadata(**items) -> dict[str, str]:
    """Metadata values as JSON strings (safetensors headers hold only str → str)."""
    return {k: json.dumps(v) for k, v in items.items()}
