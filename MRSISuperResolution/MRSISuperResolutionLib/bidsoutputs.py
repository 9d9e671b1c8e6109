"""A participant's `ftddm bids` outputs (docs/bids.md) and how they are shown together in Slicer.

Pure Python (no pybids, which Slicer does not bundle): the outputs are found by their BIDS names,
``sub-<s>[_ses-<t>]_…_met-<X>_desc-{ftddm,ftddmUncertainty,zerofilled}_mrsi.nii.gz`` under
``OUTPUT_DIR/sub-<s>[/ses-<t>]/mrs/``; the T1w/FLAIR to show them over come from the sidecar's ``Inputs``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

#: desc label of an output file → the module's output kind (mrml.OUTPUT_SUFFIX).
KIND_OF_DESC = {"ftddm": "sr", "ftddmUncertainty": "uncertainty", "zerofilled": "zerofilled"}
#: Matched display: these kinds share one window and colour table (readers compare methods, not settings);
#: the uncertainty gets its own.
SHARED_WINDOW = ("sr", "zerofilled")
OWN_WINDOW = ("uncertainty",)
_NAME = re.compile(r"^(?P<stem>sub-[a-zA-Z0-9]+(?:_[a-zA-Z]+-[a-zA-Z0-9+]+)*?)_desc-(?P<desc>[a-zA-Z0-9]+)"
                   r"_mrsi\.nii(?:\.gz)?$")


@dataclass(frozen=True)
class MapOutputs:
    """The three outputs of one metabolite map of one session, and the anatomy to show them over."""

    subject: str
    session: str | None
    metabolite: str
    files: dict  # kind → NIfTI path
    anatomy: dict = field(default_factory=dict)  # "T1w"/"FLAIR" → path, where the inputs can still be found
    name: str = ""  # base node name, e.g. sub-01_ses-V1_NAA


def _entity(stem: str, key: str) -> str | None:
    m = re.search(rf"(?:^|_){key}-([a-zA-Z0-9+]+)", stem)
    return m.group(1) if m else None


def _raw_root(output_dir: Path) -> Path | None:
    """BIDS_DIR as recorded in dataset_description.json's DatasetLinks (a file URI), if readable."""
    try:
        link = json.loads((output_dir / "dataset_description.json").read_text(encoding="utf-8"))["DatasetLinks"]["raw"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parsed = urlparse(link)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else None


def _anatomy(sidecar: Path, raw_root: Path | None) -> dict:
    try:
        inputs = json.loads(sidecar.read_text(encoding="utf-8")).get("Inputs", [])
    except (OSError, ValueError):
        return {}
    out = {}
    for item in inputs:
        if item.get("role") in ("T1w", "FLAIR") and raw_root is not None:
            path = raw_root / item["path"]
            if path.is_file():
                out[item["role"]] = path
    return out


def participant_outputs(output_dir, subject: str, session: str | None = None) -> list[MapOutputs]:
    """Every map of a participant (all sessions, or one), sorted by session and metabolite.

    A map missing one of its three outputs is an error naming it (an ftddm output folder has all or none).
    """
    output_dir = Path(output_dir)
    subject = subject[4:] if subject.startswith("sub-") else subject
    base = output_dir / f"sub-{subject}"
    if not base.is_dir():
        raise ValueError(f"{output_dir}: no outputs of sub-{subject} (expected a folder {base})")
    groups: dict[tuple, dict] = {}
    for path in sorted(base.glob("**/mrs/*_mrsi.nii*")):
        m = _NAME.match(path.name)
        if not m or m.group("desc") not in KIND_OF_DESC or _entity(m.group("stem"), "met") is None:
            continue
        ses = _entity(m.group("stem"), "ses")
        if session is not None and ses != (session[4:] if session.startswith("ses-") else session):
            continue
        groups.setdefault((ses or "", m.group("stem")), {})[KIND_OF_DESC[m.group("desc")]] = path
    raw = _raw_root(output_dir)
    out = []
    for (ses, stem), files in sorted(groups.items()):
        missing = [k for k in KIND_OF_DESC.values() if k not in files]
        if missing:
            raise ValueError(f"{stem}: outputs {missing} are missing in {files[next(iter(files))].parent}")
        sidecar = files["sr"].with_name(files["sr"].name.split(".nii")[0] + ".json")
        met = _entity(stem, "met")
        out.append(MapOutputs(subject, ses or None, met, dict(files), _anatomy(sidecar, raw),
                              f"sub-{subject}" + (f"_ses-{ses}" if ses else "") + f"_{met}"))
    if not out:
        raise ValueError(f"{base}: no ftddm outputs (*_met-*_desc-ftddm_mrsi.nii.gz)")
    return out
