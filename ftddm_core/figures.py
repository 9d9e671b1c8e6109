"""Figures of `ftddm evaluate` (matplotlib, Agg backend): quality vs NFE, studies (paper Figs. 5–7), panels.

Each function takes plain rows (dicts) as built by ftddm_core.evaluation and writes one PNG atomically. Image
panels follow one convention (also used by the demo, the phantom and the BIDS report figures): metabolite maps
in a perceptually uniform colormap, anatomy in grey, signed errors in a diverging colormap on a symmetric window
±x centred on 0, uncertainty (std) in a sequential colormap from 0, every image read through a colour bar
whose label states the quantity, its units and the window.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_savefig

#: Metabolite maps: perceptually uniform (van der Walt & Smith, matplotlib 1.5 colormaps), never jet.
MAP_CMAP = "viridis"
#: MRI contrasts (T1, FLAIR) in grey.
ANATOMY_CMAP = "gray"
#: Signed error (method − truth): diverging, white at 0; used only on a symmetric window ±x.
ERROR_CMAP = "RdBu_r"
#: Uncertainty (per-voxel std ≥ 0): sequential, black at 0.
UNCERTAINTY_CMAP = "magma"
#: The unit label when the caller does not know the maps' units.
DEFAULT_UNITS = "input units"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> Path:
    """Write `fig` as PNG atomically and close it; tight layout unless it has a layout engine."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    return atomic_savefig(fig, path, dpi=dpi)


# ------------------------------------------------------------------------------- colour scales and bars
def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is ≥ x > 0: a window limit a reader can state and compare."""
    if not (np.isfinite(x) and x > 0):
        raise ValueError(f"nice_ceiling needs a finite positive number, got {x}")
    power = 10.0 ** np.floor(np.log10(x))
    return float(next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= x * (1 - 1e-12)))


def error_limit(images: Sequence[np.ndarray], mask: np.ndarray | None = None, fallback: float = 1.0) -> float:
    """x of the symmetric error window ±x (and of the std window 0 … x): the rounded-up 99.5th percentile of
    |value| over `images` inside `mask`, so that a few outlier voxels saturate instead of flattening the rest."""
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    magnitudes = [np.abs(np.asarray(img, dtype=np.float64)) for img in images]
    values = np.concatenate([np.zeros(0)] + [(m[keep] if keep is not None else m).ravel() for m in magnitudes])
    values = values[np.isfinite(values)]
    high = float(np.percentile(values, 99.5)) if values.size else 0.0
    return nice_ceiling(high) if high > 0 else float(fallback)


def map_label(metabolite: str, units: str, window: tuple[float, float]) -> str:
    """Colour-bar label of a metabolite map, e.g. "NAA (mM), 0 – 10.6"."""
    return f"{metabolite or 'map'} ({units}), {window[0]:.3g} – {window[1]:.3g}"


def error_label(units: str, limit: float, difference: str = "SR − truth") -> str:
    """Colour-bar label of a signed error map on ±limit, e.g. "error (SR − truth), ±0.5 mM"."""
    return f"error ({difference}), ±{limit:.3g} {units}"


def uncertainty_label(units: str, limit: float) -> str:
    """Colour-bar label of a std map on 0 … limit, e.g. "std (mM), 0 – 0.5"."""
    return f"uncertainty: std ({units}), 0 – {limit:.3g}"


def colour_bar(fig, image, ax, label: str, **kwargs):
    """A colour bar for `image` beside `ax` (an axis or a list sharing the window), labelled with `label`."""
    bar = fig.colorbar(image, ax=ax, **{"fraction": 0.046, "pad": 0.02, **kwargs})
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return bar


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
        colour_bar(fig, im, ax, "SSIM" if name == "ssim" else "PSNR (dB)")
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


def calibration_plot(rows: Sequence[dict], path: Path, units: str = DEFAULT_UNITS) -> Path:
    """Reliability plot: RMSE of the voxels in each std bin against the bin's mean std (identity = calibrated);
    both axes in the maps' `units`. Rows with a ``calibration_scale`` c ≠ 1 also show the bins at c × std
    (filled; the raw std hollow)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    top = 0.0
    for r in sorted(rows, key=lambda r: -r["scale"]):
        x = np.array([b["std_mean"] for b in r["bins"]])
        y = [b["rmse"] for b in r["bins"]]
        c = float(r.get("calibration_scale", 1.0))
        line, = ax.plot(x, y, "o-", label=f"s = {r['scale']:g} (r = {r['pearson']:.2f})",
                        mfc="none" if c != 1.0 else None)
        if c != 1.0:
            ax.plot(c * x, y, "o-", color=line.get_color(), label=f"s = {r['scale']:g}, {c:.3g} × std")
        top = max([top, *(c * x), *y])
    top = top or 1.0
    ax.plot([0, top], [0, top], "k:", lw=1, label="calibrated")
    ax.set_xlabel(f"bin mean of the std (hollow) or of c × std (filled)\n({units})")
    ax.set_ylabel(f"RMSE of the bin's voxels ({units})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def panels(columns: Sequence[tuple[str, np.ndarray, str]], path: Path, title: str = "",
           affine: np.ndarray | None = None, units: str = DEFAULT_UNITS, *, metabolite: str = "",
           slice_label: str = "", mask: np.ndarray | None = None) -> Path:
    """One row of images (title, image, role) of one metabolite map, each role read through its colour bar.

    Roles: 'map' (MAP_CMAP, 0 … max of the first column, the ground truth; one bar for all maps), 'error'
    (a signed difference, ERROR_CMAP on ±x centred on 0) and 'uncertainty' (a std, UNCERTAINTY_CMAP on 0 … x),
    x = error_limit of the error and uncertainty columns (one x, so that std and error compare directly).
    `metabolite` and `slice_label` (e.g. "sub-003 z 5") name the map in the figure title; `units` label the
    bars. Images are (i, j) slices of a grid with voxel → RAS `affine` (default: i → patient-right,
    j → anterior, as the phantom's map grid), shown in radiological convention with L/R markers; voxels
    outside `mask` (if given) are grey.
    """
    plt = _pyplot()
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    unknown = sorted({role for _, _, role in columns} - set(PANEL_ROLES))
    if unknown:
        raise ValueError(f"panels: unknown column role(s) {unknown}; expected one of {PANEL_ROLES}")
    vmax = float(np.max(columns[0][1])) or 1.0  # the first column is the ground truth
    x = error_limit([img for _, img, role in columns if role != "map"], mask, fallback=0.5 * vmax)
    windows = {"map": ((0.0, vmax), MAP_CMAP, map_label(metabolite, units, (0.0, vmax))),
               "error": ((-x, x), ERROR_CMAP, error_label(units, x)),
               "uncertainty": ((0.0, x), UNCERTAINTY_CMAP, uncertainty_label(units, x))}
    fig, axes = plt.subplots(1, len(columns), figsize=(2.0 * len(columns) + 1.2, 2.9), squeeze=False,
                             layout="constrained")
    shown: dict[str, tuple] = {}
    for ax, (name, img, role) in zip(axes[0], columns):
        window, cmap, _ = windows[role]
        im = map_panel(ax, img, affine, 2, window=window, cmap=cmap, title=name, mask=mask)
        shown.setdefault(role, (im, []))[1].append(ax)
    for role, (im, role_axes) in shown.items():  # a bar shared by n panels as wide as a single panel's
        colour_bar(fig, im, role_axes, windows[role][2], fraction=0.046 / len(role_axes),
                   shrink=1.0 if len(role_axes) == 1 else 0.8)
    heading = ", ".join(t for t in (metabolite, slice_label) if t)
    fig.suptitle(f"{heading}: {title}" if heading and title else heading or title, fontsize=9)
    return _save(fig, path)


#: Column roles of `panels`: metabolite map, signed error, uncertainty (std).
PANEL_ROLES = ("map", "error", "uncertainty")


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
    if markers:  # white with a black outline: readable on white (error 0), grey (no data) and black alike
        from matplotlib import patheffects

        style = dict(transform=ax.transAxes, color="w", fontsize=7, fontweight="bold", va="center",
                     path_effects=[patheffects.withStroke(linewidth=1.5, foreground="k")])
        ax.text(0.03, 0.5, letters["left"], ha="left", **style)
        ax.text(0.97, 0.5, letters["right"], ha="right", **style)
        ax.text(0.5, 0.96, letters["top"], ha="center", **{**style, "va": "top"})
    return im


#: Colour of voxels outside the quality mask: no data, which must not look like a concentration of 0.
OUTSIDE_MASK_GREY = "0.72"
