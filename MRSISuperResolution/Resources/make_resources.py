"""Regenerate the module's binary resources: the synthetic sample patient, its thumbnail and the icons.

    python MRSISuperResolution/Resources/make_resources.py   (needs numpy and matplotlib)

Prints the SHA-256 of each sample file; paste them into MRSISuperResolutionLib/sampledata.py SAMPLE_FILES.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RESOURCES = Path(__file__).resolve().parent
MODULE = RESOURCES.parent
sys.path.insert(0, str(MODULE))

from MRSISuperResolutionLib import sampledata  # noqa: E402


def _figure(size_px: int = 128):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1), dpi=size_px)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    return fig, ax, plt


def draw_icon(path: Path, size_px: int = 128) -> None:
    """A brain-shaped metabolite map: blocky low resolution on the left, smooth super-resolution on the right."""
    n = 128
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    brain = (x / 0.78) ** 2 + (y / 0.92) ** 2 <= 1
    level = (np.exp(-((x - 0.3) ** 2 + (y + 0.25) ** 2) / 0.04) + np.exp(-((x + 0.35) ** 2 + (y - 0.3) ** 2) / 0.04)
             + 0.55 * brain)
    level = np.where(brain, level, np.nan)
    blocky = level.copy()
    b = 16
    for i in range(0, n, b):
        for j in range(0, n, b):
            block = level[i:i + b, j:j + b]
            blocky[i:i + b, j:j + b] = np.nanmean(block) if np.isfinite(block).any() else np.nan
    image = np.where(x < 0, blocky, level)
    fig, ax, plt = _figure(size_px)
    ax.imshow(image, cmap="viridis", origin="lower", interpolation="nearest", vmin=0.4, vmax=1.5)
    ax.plot([64, 64], [8, 120], color="white", linewidth=1.5)
    ax.set_xlim(0, n - 1)
    ax.set_ylim(0, n - 1)
    fig.savefig(path, transparent=True)
    plt.close(fig)


def draw_thumbnail(patient: dict, path: Path, size_px: int = 128) -> None:
    """FLAIR slice through the lesion beside the LR NAA map."""
    flair = patient["FLAIR"][0]
    naa = patient["NAA"][0]
    fig, ax, plt = _figure(size_px)
    ax.imshow(flair[::-1, :, 40].T, cmap="gray", origin="lower", extent=(0, 0.5, 0, 1), aspect="auto")
    ax.imshow(naa[:, :, 3].T, cmap="viridis", origin="lower", interpolation="nearest", extent=(0.5, 1, 0, 1),
              aspect="auto")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    folder = RESOURCES / "SampleData"
    paths = sampledata.write_sample_patient(folder)
    for key, path in paths.items():
        print(f"{path.name}  {sampledata.sha256(path)}  ({path.stat().st_size} bytes)")
    draw_thumbnail(sampledata.synthetic_patient(), RESOURCES / "Icons" / f"{sampledata.SAMPLE_NAME}.png")
    draw_icon(RESOURCES / "Icons" / "MRSISuperResolution.png")
    draw_icon(MODULE.parent / "Resources" / "Icons" / "MRSISuperResolution.png")


if __name__ == "__main__":
    main()
