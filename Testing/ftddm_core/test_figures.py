"""Figures explain themselves: checked through matplotlib's object model (colour bars, norms, titles), not pixels.

Every image is read through a colour bar with the same colormap and window whose label names the unit; maps
are perceptually uniform or grey (never jet); signed errors use a diverging colormap on a symmetric window
whose limit the label states; std maps start at 0; the metabolite is named in a title.
"""
from __future__ import annotations

import re

import matplotlib.colors as mcolors
import numpy as np
import pytest

from ftddm_core import figures
from ftddm_core import volume as V

#: Perceptually uniform sequential colormaps of matplotlib, and grey.
SEQUENTIAL_OK = {"viridis", "magma", "cividis", "inferno", "plasma", "gray", "grey", "Greys", "Greys_r"}


@pytest.fixture
def drawn(monkeypatch):
    """The figures the code under test closes (kept open here, closed at teardown)."""
    plt = figures._pyplot()
    real_close = plt.close
    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        real_close(fig)


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def _bars(fig):
    """(colormap name, (vmin, vmax), label) of every colour bar of the figure."""
    return [(im.colorbar.mappable.get_cmap().name, tuple(im.colorbar.mappable.get_clim()),
             im.colorbar.ax.get_ylabel() or im.colorbar.ax.get_xlabel()) for im in _images(fig) if im.colorbar]


def _bar_of(fig, im) -> str:
    """The label of the colour bar that reads `im` (same colormap and window), or fail."""
    key = (im.get_cmap().name, tuple(im.get_clim()))
    labels = [label for name, clim, label in _bars(fig) if (name, clim) == key]
    assert labels, f"image with {key} has no colour bar"
    return labels[0]


def _luminance(rgba) -> float:
    r, g, b = np.asarray(rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b  # Rec. 709 relative luminance


def _is_diverging(cmap) -> bool:
    """Light in the middle, darker at both ends: the property that makes 0 the neutral colour."""
    mid, lo, hi = (_luminance(cmap(v)) for v in (0.5, 0.0, 1.0))
    return mid > lo + 0.3 and mid > hi + 0.3


def _titles(fig) -> str:
    return " ".join([ax.get_title() for ax in fig.axes] + [fig.get_suptitle()])


def check_explains_itself(fig, units: str, metabolite: str | None = None,
                          unitless: tuple[str, ...] = ("a.u.",)) -> dict[str, list]:
    """The checks every figure with images passes; returns the images by kind (map/error/uncertainty).

    Each bar's label names `units`, or one of `unitless` (MRI contrasts are in arbitrary units)."""
    kinds: dict[str, list] = {"map": [], "error": [], "uncertainty": []}
    assert _images(fig), "no image drawn"
    for im in _images(fig):
        cmap, (lo, hi) = im.get_cmap(), im.get_clim()
        assert cmap.name != "jet"
        label = _bar_of(fig, im)
        assert label.strip()
        if _is_diverging(cmap):
            assert lo == -hi and hi > 0, "an error map's window must be symmetric about 0"
            stated = re.search(r"±\s*([0-9.]+(?:e[-+]?\d+)?)", label)
            assert stated and float(stated.group(1)) == pytest.approx(hi, rel=1e-2), label
            kinds["error"].append(im)
        else:
            assert cmap.name.removesuffix("_r") in SEQUENTIAL_OK, cmap.name
            kinds["uncertainty" if "std" in label else "map"].append(im)
        assert units in label or any(u in label for u in unitless), label
    for im in kinds["uncertainty"]:
        assert im.get_clim()[0] == 0.0, "an uncertainty map's window starts at 0"
    if metabolite is not None:
        assert metabolite in _titles(fig)
    return kinds


# ------------------------------------------------------------------------------------------ scale helpers
@pytest.mark.parametrize("x, expected", [(0.031, 0.05), (2.5, 2.5), (2.51, 5.0), (7.0, 10.0), (1.0, 1.0),
                                         (130.0, 200.0), (0.0012, 0.002)])
def test_nice_ceiling_is_the_next_1_2_2p5_5_step(x, expected):
    assert figures.nice_ceiling(x) == pytest.approx(expected)


def test_nice_ceiling_bounds_and_refusal():
    for x in np.random.default_rng(0).lognormal(0, 3, 200):
        y = figures.nice_ceiling(float(x))
        assert x <= y * (1 + 1e-9) and y < 2.5 * x  # never below, at most 2.5× above (2 → 5 is the widest)
    with pytest.raises(ValueError, match="positive"):
        figures.nice_ceiling(0.0)


def test_error_limit_ignores_voxels_outside_the_mask():
    err = np.zeros((10, 10))
    err[:, :5] = np.linspace(-0.3, 0.3, 50).reshape(10, 5)
    err[:, 5:] = 100.0  # outside the mask
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    expected = figures.nice_ceiling(float(np.percentile(np.abs(err[mask]), 99.5)))
    assert figures.error_limit([err], mask) == expected == 0.5
    assert figures.error_limit([np.zeros((4, 4))], fallback=3.0) == 3.0


# ------------------------------------------------------------------------------------------ the figures
def _map_columns(rng):
    gt = np.zeros((16, 16))
    gt[3:13, 3:13] = 8.0 + rng.normal(0, 0.5, (10, 10))
    sr = gt + rng.normal(0, 0.3, gt.shape)
    return [("ground truth", gt, "map"), ("FTDDM", sr, "map"), ("FTDDM − GT", sr - gt, "error"),
            ("FTDDM std", np.abs(rng.normal(0, 0.2, gt.shape)), "uncertainty")]


@pytest.mark.parametrize("units", ["mM", "a.u."])
def test_evaluation_panels_explain_themselves(tmp_path, drawn, units):
    cols = _map_columns(np.random.default_rng(1))
    path = figures.panels(cols, tmp_path / "p.png", title="s = 4", units=units, metabolite="tCho",
                          slice_label="sub-001 z 3")
    assert path.stat().st_size > 0
    (fig,) = drawn
    kinds = check_explains_itself(fig, units, metabolite="tCho")
    assert [len(kinds[k]) for k in ("map", "error", "uncertainty")] == [2, 1, 1]
    assert "sub-001 z 3" in _titles(fig)
    # error and std share one x: the std is read on the same magnitude as the error
    assert kinds["error"][0].get_clim()[1] == kinds["uncertainty"][0].get_clim()[1]
    assert kinds["map"][0].get_clim() == (0.0, float(cols[0][1].max()))


def test_panels_old_call_still_works_and_labels_input_units(tmp_path, drawn):
    """The call evaluate makes today (no units, |error| as 'error'): still drawn, bars in "input units"."""
    cols = _map_columns(np.random.default_rng(2))
    cols[2] = ("|FTDDM − GT|", np.abs(cols[2][1]), "error")
    figures.panels(cols, tmp_path / "p.png", title="s = 8 (LR 8² → 64²)")
    check_explains_itself(drawn[0], figures.DEFAULT_UNITS)
    with pytest.raises(ValueError, match="role"):
        figures.panels([("gt", cols[0][1], "map"), ("x", cols[0][1], "jet")], tmp_path / "q.png")


def test_scale_mismatch_and_calibration_plots_name_their_quantities(tmp_path, drawn):
    rows = [{"actual_scale": a, "conditioned_scale": c, "ssim": 0.8, "psnr": 30.0} for a in (4, 8) for c in (4, 8)]
    figures.scale_mismatch_plot(rows, tmp_path / "m.png")
    assert sorted(label for *_, label in _bars(drawn[0])) == ["PSNR (dB)", "SSIM"]
    assert all(im.get_cmap().name != "jet" for im in _images(drawn[0]))
    figures.calibration_plot([{"scale": 4.0, "pearson": 0.3, "bins": [{"std_mean": 1, "rmse": 1}]}],
                             tmp_path / "c.png", units="mM")
    ax = drawn[1].axes[0]
    assert "(mM)" in ax.get_xlabel() and "(mM)" in ax.get_ylabel()


def test_demo_figure_explains_itself(tmp_path, drawn):
    from ftddm_core import demo
    from ftddm_core.phantom import make_patient

    p = make_patient(3, slices=2)
    rng = np.random.default_rng(0)
    for name in demo.FIGURE_METABOLITES:
        noisy = (p.maps[name] + rng.normal(0, 0.2, p.maps[name].shape)).astype(np.float32)
        for kind, data in (("sr", noisy), ("zerofilled", p.maps[name]), ("uncertainty", np.zeros_like(noisy))):
            V.save_volume(V.Volume(data, p.affine), tmp_path / f"{name}_{kind}.nii.gz")
    demo.plot_demo(p, tmp_path, tmp_path / "fig.png", 16, samples=1)
    (fig,) = drawn
    kinds = check_explains_itself(fig, demo.UNITS)
    n = len(demo.FIGURE_METABOLITES)
    assert [len(kinds[k]) for k in ("map", "error", "uncertainty")] == [4 * n, n, n]  # FLAIR counts as a map
    for name in demo.FIGURE_METABOLITES:
        assert any(name in ax.get_title() for ax in fig.axes)
    title = fig.get_suptitle()
    assert "radiological" in title and " mm" in title
    assert any(t.get_text() == "undefined\n(1 sample)" for ax in fig.axes for t in ax.texts)
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_phantom_figure_explains_itself(tmp_path, drawn):
    from ftddm_core.phantom import make_patient, plot_patients

    plot_patients([make_patient(5, slices=2)], tmp_path / "f.png")
    fig = drawn[0]
    kinds = check_explains_itself(fig, "mM", metabolite="tCho", unitless=("a.u.", "voxel class"))
    labels = [label for *_, label in _bars(fig)]
    assert "NAA (mM)" in labels and "FLAIR (a.u.)" in labels and len(kinds["map"]) == 5


@pytest.mark.parametrize("units, expected", [("mmol/kg", "mmol/kg"), (None, figures.DEFAULT_UNITS)])
def test_bids_overview_figure_explains_itself(tmp_path, drawn, units, expected):
    from ftddm_core import bids_report

    rng = np.random.default_rng(3)
    files = {}
    for kind, scale in (("zerofilled", 5.0), ("sr", 5.0), ("uncertainty", 0.4)):
        data = np.abs(rng.normal(scale, 1.0, (12, 12, 4))).astype(np.float32)
        files[kind] = V.save_volume(V.Volume(data, np.eye(4)), tmp_path / f"{kind}.nii.gz")
    bids_report.overview_figure([("sub-01", {"files": files, "axis": 2, "met": "Cr", "units": units})],
                                tmp_path / "o.png")
    fig = drawn[0]
    kinds = check_explains_itself(fig, expected, metabolite="Cr")
    assert len(kinds["uncertainty"]) == 1 and "slice 2" in _titles(fig)
