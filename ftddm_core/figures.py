"""Figures of `ftddm evaluate` (matplotlib, Agg backend): quality vs NFE, studies (paper Figs. 5–7), panels.

Each function takes plain rows (dicts) as built by ftddm_core.evaluate and writes one PNG atomically.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


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


def panels(columns: Sequence[tuple[str, np.ndarray, str]], path: Path, title: str = "",
           affine: np.ndarray | None = None, units: str = "input units") -> Path:
    """One row of images: (title, image, role) with role 'map' (0 … GT max, jet) or 'error' (magma, half range).

    Images are (i, j) slices of a grid with voxel → RAS `affine` (default: i → patient-right, j → anterior, as
    the phantom's map grid), shown in radiological convention with L/R markers and one colour bar per window.
    """
    plt = _pyplot()
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    vmax = float(np.max(columns[0][1])) or 1.0  # the first column is the ground truth
    windows = {"map": (0.0, vmax, "jet"), "error": (0.0, 0.5 * vmax, "magma")}
    fig, axes = plt.subplots(1, len(columns), figsize=(1.9 * len(columns), 2.6), squeeze=False)
    for ax, (name, img, role) in zip(axes[0], columns):
        lo, hi, cmap = windows["map" if role == "map" else "error"]
        im = map_panel(ax, img, affine, 2, window=(lo, hi), cmap=cmap, title=name)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label(units, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------- radiological slice display
def _axis_letters(direction: np.ndarray) -> tuple[str, str]:
    """(letter at the low-index end, letter at the high-index end) of a RAS direction, e.g. ("R", "L")."""
    k = int(np.argmax(np.abs(direction)))  # RAS+: +x right, +y anterior, +z superior
    plus, minus = [("R", "L"), ("A", "P"), ("S", "I")][k]
    return (minus, plus) if direction[k] > 0 else (plus, minus)


def radiological_view(image: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, dict]:
    """An (a, b) slice of the in-plane axes of `axis` as imshow rows × columns in radiological convention.

    Columns run along the in-plane axis closest to left–right, ordered so that patient-left is on the viewer's
    right; rows run along the other axis with anterior (axial) or superior (coronal/sagittal) at the top.
    Returns the array and the letters at its edges {"left", "right", "top", "bottom"}.
    """
    from .volume import inplane_axes

    direction = np.asarray(affine, dtype=np.float64)[:3, :3]
    direction = direction / np.linalg.norm(direction, axis=0)
    a, b = inplane_axes(axis)
    img = np.asarray(image)
    dirs = [direction[:, a], direction[:, b]]
    col = 0 if abs(dirs[0][0]) >= abs(dirs[1][0]) else 1  # the axis closest to x (left–right)
    row = 1 - col
    img = img if col == 1 else img.T  # now rows = `row` axis, columns = `col` axis
    if dirs[col][0] > 0:  # index grows to patient-right: flip so patient-left is on the right
        img = img[:, ::-1]
    vertical = dirs[row].copy()
    vertical[0] = 0.0  # the row axis's up direction: anterior or superior, whichever it is closer to
    up = 1 + int(np.argmax(np.abs(vertical[1:])))
    if vertical[up] > 0:  # index grows anteriorly/superiorly: flip so that end is at the top
        img = img[::-1, :]
    col_dir = dirs[col] if dirs[col][0] <= 0 else -dirs[col]
    row_dir = -dirs[row] if vertical[up] > 0 else dirs[row]
    (left, right), (top, bottom) = _axis_letters(col_dir), _axis_letters(row_dir)
    return np.ascontiguousarray(img), {"left": left, "right": right, "top": top, "bottom": bottom}


def slice_position_mm(affine: np.ndarray, shape, axis: int, index: int) -> str:
    """Where a slice lies, e.g. "S 12.3 mm": the RAS coordinate of its centre along its normal's main axis."""
    centre = (np.asarray(shape[:3], dtype=np.float64) - 1) / 2
    centre[axis] = index
    xyz = np.asarray(affine, dtype=np.float64)[:3, :3] @ centre + np.asarray(affine, dtype=np.float64)[:3, 3]
    normal = np.asarray(affine, dtype=np.float64)[:3, axis]
    k = int(np.argmax(np.abs(normal)))
    return f"{'RAS'[k]} {xyz[k]:+.1f} mm"


def map_panel(ax, image: np.ndarray, affine: np.ndarray, axis: int, *, window: tuple[float, float], cmap: str,
              title: str = "", mask: np.ndarray | None = None, markers: bool = True):
    """Draw one slice radiologically in a fixed window; voxels outside `mask` in grey (not as 0). Returns the
    AxesImage (for a colour bar)."""
    plt = _pyplot()
    view, letters = radiological_view(image, affine, axis)
    if mask is not None:
        keep, _ = radiological_view(np.asarray(mask, dtype=bool), affine, axis)
        view = np.ma.masked_array(view, mask=~keep)
    colours = plt.get_cmap(cmap).with_extremes(bad=OUTSIDE_MASK_GREY)
    im = ax.imshow(view, cmap=colours, vmin=window[0], vmax=window[1], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    if markers:
        style = dict(transform=ax.transAxes, color="w", fontsize=7, fontweight="bold", va="center")
        ax.text(0.03, 0.5, letters["left"], ha="left", **style)
        ax.text(0.97, 0.5, letters["right"], ha="right", **style)
        ax.text(0.5, 0.96, letters["top"], ha="center", **{**style, "va": "top"})
    return im


#: Colour of voxels outside the quality mask: no data, which must not look like a concentration of 0.
OUTSIDE_MASK_GREY = "0.72"
