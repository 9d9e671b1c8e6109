"""The group level of `ftddm bids`: one table over participants (TSV + its JSON data dictionary), a PNG of one
slice per participant, and an HTML page with both.

It reads what the participant level left: every session found in BIDS_DIR is a row, with its maps, timings,
mask coverage and warnings from the output sidecars, or why it has no outputs (missing inputs, not run yet).
"""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from . import bids
from .atomic import atomic_write_text

COLUMNS = {
    "participant_id": "BIDS participant (sub-<label>)",
    "session_id": "BIDS session (ses-<label>), n/a without sessions",
    "status": "done | missing_inputs | not_run (no outputs yet, or the run failed)",
    "maps": "metabolites super-resolved (comma-separated met- labels)",
    "mask": "quality mask: user (a *_mask file beside the maps) or automatic (T1 brain and MRSI support)",
    "mask_coverage": "share of the super-resolved grid's voxels inside the mask",
    "prepare_s": "seconds to resample T1/FLAIR/mask and build the model inputs",
    "sample_s": "seconds of FTDDM sampling (all maps of the session as one batch)",
    "total_s": "seconds of the whole super-resolution",
    "nfe_per_sample": "network evaluations per sample chain",
    "samples": "samples per map (mean = SR, standard deviation = uncertainty)",
    "output_shape": "shape of the super-resolved grid (i×j×k)",
    "warnings": "warnings of the run, or why the session has no outputs ('; '-separated)",
}
TABLE, DICTIONARY, FIGURE, PAGE = (f"{bids.GROUP_PREFIX}{ext}" for ext in (".tsv", ".json", ".png", ".html"))


def session_row(found: bids.Session, output_dir: Path) -> tuple[dict, dict | None]:
    """The table row of one session, and the sidecar paths of its first map's outputs (None without outputs)."""
    row = {k: "n/a" for k in COLUMNS}
    row.update(participant_id=f"sub-{found.subject}", session_id=f"ses-{found.session}" if found.session else "n/a")
    if found.problems:
        row.update(status="missing_inputs", warnings="; ".join(found.problems))
        return row, None
    folder = found.folder(output_dir)
    if bids.session_state(found, output_dir) != "finished":
        row.update(status="not_run", maps=",".join(found.maps))
        return row, None
    first = next(iter(found.maps.values())).name
    sidecar = json.loads((folder / bids.output_name(first, bids.OUTPUT_DESC["sr"], ".json")).read_text("utf-8"))
    timings = sidecar["Timings"]
    row.update(status="done", maps=",".join(found.maps), mask=sidecar["Mask"]["source"],
               mask_coverage=f"{sidecar['Mask']['coverage']:.4f}", nfe_per_sample=sidecar["NFEPerSample"],
               samples=sidecar["Options"]["samples"], output_shape="×".join(map(str, sidecar["Grid"]["shape"])),
               warnings="; ".join(sidecar["Warnings"]) or "n/a",
               **{k: f"{timings[k]:.3f}" for k in ("prepare_s", "sample_s", "total_s")})
    files = {kind: folder / bids.output_name(first, desc) for kind, desc in bids.OUTPUT_DESC.items()}
    return row, {"files": files, "axis": int(sidecar["Options"]["slice_axis"]), "met": sidecar["Metabolite"],
                 "units": sidecar.get("Units")}


def write_table(rows: Sequence[dict], path: Path) -> Path:
    """BIDS tabular file: tab-separated, header row, n/a for missing values."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def middle_slice(data: np.ndarray, axis: int) -> np.ndarray:
    """The middle slice across `axis`, rotated so that the second array axis runs up the page."""
    return np.rot90(np.take(data, data.shape[axis] // 2, axis=axis))


def overview_figure(panels: Sequence[tuple[str, dict]], path: Path) -> Path | None:
    """One row per session: zero-filled | FTDDM | uncertainty of its first map, middle slice; zero-filled and
    FTDDM share one window (readers compare methods, not display settings), the std has its own from 0; every
    panel has a colour bar in the map's units (the input sidecar's "Units", else "input units")."""
    if not panels:
        return None
    from . import figures as F
    from .volume import load_volume

    plt = F._pyplot()
    fig, axes = plt.subplots(len(panels), 3, figsize=(8.4, 2.7 * len(panels)), squeeze=False, layout="constrained")
    for ax_row, (label, info) in zip(axes, panels):
        data = {k: load_volume(p, allow_all_zero=True).data for k, p in info["files"].items()}
        images = {k: middle_slice(d, info["axis"]) for k, d in data.items()}
        units, met = info.get("units") or F.DEFAULT_UNITS, info["met"]
        where = f"slice {data['sr'].shape[info['axis']] // 2} (middle) across voxel axis {info['axis']}"
        pooled = np.concatenate([images["sr"].ravel(), images["zerofilled"].ravel()])
        high = float(np.percentile(pooled[pooled > 0], 99.5)) if (pooled > 0).any() else 1.0
        spread = F.error_limit([images["uncertainty"]])
        windows = {"zerofilled": ((0.0, high), F.MAP_CMAP, F.map_label(met, units, (0.0, high))),
                   "sr": ((0.0, high), F.MAP_CMAP, F.map_label(met, units, (0.0, high))),
                   "uncertainty": ((0.0, spread), F.UNCERTAINTY_CMAP, F.uncertainty_label(units, spread))}
        for ax, kind in zip(ax_row, ("zerofilled", "sr", "uncertainty")):
            (lo, hi), cmap, bar = windows[kind]
            im = ax.imshow(images[kind], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{label} {met}: {kind}\n{where}", fontsize=7)
            ax.axis("off")
            F.colour_bar(fig, im, ax, bar)
    return F._save(fig, path)


def write_page(rows: Sequence[dict], figure: Path | None, path: Path) -> Path:
    """A self-explanatory HTML page: the table and the overview image (linked, beside it)."""
    head = "".join(f"<th title='{html.escape(COLUMNS[k])}'>{html.escape(k)}</th>" for k in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in COLUMNS) + "</tr>" for r in rows)
    image = f"<img src='{figure.name}' alt='one slice per participant'>" if figure else "<p>No outputs yet.</p>"
    text = ("<!doctype html><html><head><meta charset='utf-8'><title>FTDDM group report</title>"
            "<style>td,th{border:1px solid #ccc;padding:2px 6px;font:12px sans-serif}</style></head><body>"
            f"<h1>FTDDM super-resolution: {len(rows)} sessions</h1><table><tr>{head}</tr>{body}</table>"
            f"<h2>Middle slice of each session's first map</h2>{image}</body></html>\n")
    return atomic_write_text(path, text)


def run_group(bids_dir, output_dir, *, participants: Sequence[str] = (), sessions: Sequence[str] = (),
              mets: Sequence[str] = (), mrsi_derivatives: str | None = None, mrsi_desc: str | None = "signal",
              filters: dict | None = None, report=print) -> dict:
    """The group level over every session found in BIDS_DIR (or the given participants/sessions)."""
    output_dir = Path(output_dir)
    if not (output_dir / "dataset_description.json").is_file():
        raise FileNotFoundError(f"OUTPUT_DIR {output_dir}: no ftddm outputs (run the participant level first)")
    ds = bids.open_dataset(bids_dir, output_dir, mrsi_derivatives)
    found_all = bids.find_sessions(ds, participants, sessions, mets=mets, mrsi_desc=mrsi_desc, filters=filters)
    rows, panels = [], []
    for found in found_all:
        row, panel = session_row(found, output_dir)
        rows.append(row)
        if panel:
            panels.append((found.label, panel))
    table = write_table(rows, output_dir / TABLE)
    atomic_write_text(output_dir / DICTIONARY, json.dumps({k: {"Description": v} for k, v in COLUMNS.items()},
                                                          indent=2) + "\n")
    figure = overview_figure(panels, output_dir / FIGURE)
    page = write_page(rows, figure, output_dir / PAGE)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "missing_inputs", "not_run")}
    report(f"group: {len(rows)} sessions ({counts['done']} done, {counts['missing_inputs']} missing inputs, "
           f"{counts['not_run']} not run) → {table}, {page}")
    return {"rows": rows, "table": table, "figure": figure, "page": page, "counts": counts}

