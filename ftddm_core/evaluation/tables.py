"""Writing rows: CSV files, Markdown tables and the number formats of the report."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .stats import finite_stats

DIGITS = {"nrmse": 4, "psnr": 2, "ssim": 4, "nrmse_mask": 4, "psnr_mask": 2, "ssim_mask": 4, "kspace_error": 4,
          "gradient_ratio": 3, "high_frequency_ratio": 3, "lpips": 4}



def display_path(path) -> str:
    """A path as reports record it: relative to the working directory when inside it (a committed report then
    holds no machine-specific path), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)

def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """CSV with the union of the rows' keys as columns (first-seen order), written atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt_csv(r.get(k, "")) for k in cols})

    return atomic_write(path, write)


def _fmt_csv(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def json_default(o):
    """numpy scalars as Python numbers; anything else JSON cannot write (paths, devices) as its text."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pm(mean: float, std: float, digits: int) -> str:
    """'mean ± std' with `digits` decimals ('–' when not finite)."""
    return "–" if not np.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def num(v: float, digits: int = 4) -> str:
    """A number with `digits` significant digits ('–' when missing or not finite)."""
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


def mean_metric(rows: list[dict], name: str) -> float:
    """Mean of one metric over the finite values of per-map rows."""
    return finite_stats([r[name] for r in rows])[0]
