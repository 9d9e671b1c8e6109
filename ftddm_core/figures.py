"""Figures of `ftddm evaluate` (matplotlib, Agg backend): quality vs NFE, studies (paper Figs. 5–7), panels.

Each function takes plain rows (dicts) as built by ftddm_core.evaluate and writes one PNG atomically.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _by_scale(rows: Sequence[dict], key: str = "scale") -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return dict(sorted(out.items(), reverse=True))


def quality_vs_nfe(method_rows: Sequence[dict], path: Path) -> Path:
    """SSIM (mean over maps) against NFE + 1 on a log axis, one panel per scale, one point per method."""
    plt = _pyplot()
    groups = _by_scale(method_rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (s, rows) in zip(axes[0], groups.items()):
        for r in rows:
            ax.scatter(r["nfe"] + 1, r["ssim_mean"], s=18)
            ax.annotate(r["method"], (r["nfe"] + 1, r["ssim_mean"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("NFE + 1 (UNet evaluations per sample)")
        ax.set_ylabel("SSIM")
        ax.set_title(f"s = {s:g}")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def tau_d_plot(rows: Sequence[dict], path: Path) -> Path:
    """Fig. 7-style: PSNR, SSIM and sharpness ratios against τ_d, one line per scale."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for s, rs in _by_scale(rows).items():
        rs = sorted(rs, key=lambda r: r["tau_d"])
        tau = [r["tau_d"] for r in rs]
        axes[0].plot(tau, [r["psnr"] for r in rs], "o-", label=f"s = {s:g}")
        axes[1].plot(tau, [r["ssim"] for r in rs], "o-", label=f"s = {s:g}")
        axes[2].plot(tau, [r["gradient_ratio"] for r in rs], "o-", label=f"|∇| ratio, s = {s:g}")
        axes[2].plot(tau, [r["high_frequency_ratio"] for r in rs], "s--", label=f"HF energy ratio, s = {s:g}")
    axes[2].axhline(1.0, color="k", lw=0.8, ls=":")
    for ax, name in zip(axes, ("PSNR (dB)", "SSIM", "sharpness (output / GT)")):
        ax.set_xlabel("τ_d")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def scale_mismatch_plot(rows: Sequence[dict], path: Path) -> Path:
    """Fig. 6-style heat maps of SSIM and PSNR: actual s (rows) × conditioned s' (columns)."""
    plt = _pyplot()
    actual = sorted({r["actual_scale"] for r in rows}, reverse=True)
    cond = sorted({r["conditioned_scale"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(cond) * 2, 0.9 * len(actual) + 2.2))
    for ax, name in zip(axes, ("ssim", "psnr")):
        grid = np.full((len(actual), len(cond)), np.nan)
        for r in rows:
            grid[actual.index(r["actual_scale"]), cond.index(r["conditioned_scale"])] = r[name]
        im = ax.imshow(grid, cmap="viridis")
        for i in range(len(actual)):
            for j in range(len(cond)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}" if name == "ssim" else f"{grid[i, j]:.1f}", ha="center",
                            va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(cond)), [f"{c:g}" for c in cond])
        ax.set_yticks(range(len(actual)), [f"{a:g}" for a in actual])
        ax.set_xlabel("conditioned s'")
        ax.set_ylabel("actual s")
        ax.set_title(name.upper())
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def t_trunc_plot(rows: Sequence[dict], ddpm_ssim: dict[float, float], path: Path) -> Path:
    """Fig. 5-style: SSIM and PSNR against Ttrunc, one line per scale; full-chain DDPM SSIM dashed if known."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for s, rs in _by_scale(rows).items():
        rs = sorted(rs, key=lambda r: r["t_trunc"])
        line = axes[0].plot([r["t_trunc"] for r in rs], [r["ssim"] for r in rs], "o-", label=f"FTDDM s = {s:g}")
        axes[1].plot([r["t_trunc"] for r in rs], [r["psnr"] for r in rs], "o-", label=f"s = {s:g}")
        if s in ddpm_ssim and np.isfinite(ddpm_ssim[s]):
            axes[0].axhline(ddpm_ssim[s], ls="--", color=line[0].get_color(), lw=1, label=f"DDPM full, s = {s:g}")
    for ax, name in zip(axes, ("SSIM", "PSNR (dB)")):
        ax.set_xlabel("Ttrunc (0 = flow only)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def calibration_plot(rows: Sequence[dict], path: Path) -> Path:
    """Reliability plot: RMSE of the voxels in each std bin against the bin's mean std (identity = calibrated)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    top = 0.0
    for r in sorted(rows, key=lambda r: -r["scale"]):
        x = [b["std_mean"] for b in r["bins"]]
        y = [b["rmse"] for b in r["bins"]]
        ax.plot(x, y, "o-", label=f"s = {r['scale']:g} (r = {r['pearson']:.2f})")
        top = max([top, *x, *y])
    top = top or 1.0
    ax.plot([0, top], [0, top], "k:", lw=1, label="calibrated")
    ax.set_xlabel("predicted std (bin mean)")
    ax.set_ylabel("RMSE of the bin's voxels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def panels(columns: Sequence[tuple[str, np.ndarray, str]], path: Path, title: str = "") -> Path:
    """One row of images: (title, image, role) with role 'map' (0 … GT max, jet) or 'error' (magma, half range)."""
    plt = _pyplot()
    vmax = float(np.max(columns[0][1])) or 1.0  # the first column is the ground truth
    fig, axes = plt.subplots(1, len(columns), figsize=(1.9 * len(columns), 2.4), squeeze=False)
    for ax, (name, img, role) in zip(axes[0], columns):
        if role == "map":
            ax.imshow(np.rot90(img), cmap="jet", vmin=0, vmax=vmax)
        else:
            ax.imshow(np.rot90(img), cmap="magma", vmin=0, vmax=0.5 * vmax)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
