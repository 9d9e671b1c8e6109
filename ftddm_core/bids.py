"""`ftddm bids`: FTDDM as a BIDS App (Gorgolewski et al., PLoS Comput Biol 2017;13:e1005209).

`ftddm bids BIDS_DIR OUTPUT_DIR participant --participant-label 01` super-resolves every session of the
participant: the metabolite maps of an MRSI derivatives dataset (found by their `met-` entity and `mrsi` suffix,
e.g. ``sub-01_ses-V1_space-orig_met-NAA_desc-signal_mrsi.nii.gz``) with the session's T1w and FLAIR from
``anat/``. Outputs form a BIDS derivatives dataset (``…_met-NAA_desc-ftddm_mrsi.nii.gz``, ``desc-ftddmUncertainty``,
``desc-zerofilled``, each with a JSON sidecar of provenance). A session's outputs appear all together or not at
all; a finished session is skipped unless overwrite. The dataset is queried with pybids (an optional extra,
``pip install ftddm_core[bids]``), imported only here. The group level lives in :mod:`ftddm_core.bids_report`.
"""
from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .atomic import atomic_write_text

#: pybids knows no `met` entity (BIDS 1.11 has none; the MRS derivatives convention adds it): declared here.
MET_ENTITY_CONFIG = {"name": "ftddm-mrsi",
                     "entities": [{"name": "met", "pattern": r"[_/\\]+met-([a-zA-Z0-9]+)"}]}
NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
#: output kind → the `desc` label of its file (the issue's naming).
OUTPUT_DESC = {"sr": "ftddm", "uncertainty": "ftddmUncertainty", "zerofilled": "zerofilled"}
OUTPUT_DESCRIPTION = {
    "sr": "FTDDM super-resolved metabolite map: mean of the samples, in the input's units",
    "uncertainty": "per-voxel standard deviation of the FTDDM samples × the model's calibration factor (see "
                   "UncertaintyCalibration), in the input's units",
    "zerofilled": "zero-filled (k-space sinc) interpolation of the input map onto the super-resolved grid",
}
CODE_URL = "https://github.com/MRSISuperResolution/SlicerMRSISuperResolution"
BIDS_VERSION = "1.10.0"
PIPELINE_NAME = "ftddm"
#: files of the group level, listed in .bidsignore (they are reports, not BIDS data).
GROUP_PREFIX = "group_ftddm"


def require_pybids():
    """The pybids module, or one clear error saying how to install it."""
    try:
        import bids  # noqa: F401
    except ImportError as err:
        raise ValueError("`ftddm bids` needs pybids: pip install 'ftddm_core[bids]' (or pip install pybids)") \
            from err
    return bids


# ------------------------------------------------------------------------------------------ names
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9+]+)$")


def split_bids_name(name: str) -> tuple[list[tuple[str, str]], str, str]:
    """(entities in file order, suffix, extension) of a BIDS file name, e.g. ([("sub", "01"), …], "mrsi", ".nii.gz")."""
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    pairs = [_ENTITY.match(p) for p in parts[:-1]]
    if not dot or len(parts) < 2 or not all(pairs):
        raise ValueError(f"{name}: not a BIDS file name (key-value_…_suffix.extension)")
    return [(m.group(1), m.group(2)) for m in pairs], parts[-1], "." + ext


def output_name(input_name: str, desc: str, extension: str = ".nii.gz") -> str:
    """The input map's name with `desc` replaced (or added last, where BIDS puts it): the other entities keep
    their order, so sub/ses/space/met of the output are the input's."""
    pairs, suffix, _ = split_bids_name(input_name)
    pairs = [(k, v) for k, v in pairs if k != "desc"] + [("desc", desc)]
    return "_".join(f"{k}-{v}" for k, v in pairs) + f"_{suffix}{extension}"


def strip_label(label: str, prefix: str) -> str:
    """'sub-01' or '01' → '01' (BIDS Apps accept both)."""
    return label[len(prefix):] if label.startswith(prefix) else label


# ------------------------------------------------------------------------------------------ discovery
@dataclass
class Session:
    """What one subject/session has: maps by metabolite, T1w, FLAIR, mask, and what is missing or ambiguous."""

    subject: str
    session: str | None
    maps: dict = field(default_factory=dict)  # metabolite → BIDSFile path
    t1w: Path | None = None
    flair: Path | None = None
    mask: Path | None = None
    problems: list = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # path → BIDS URI ("bids:raw:sub-01/…")
    units: dict = field(default_factory=dict)  # metabolite → "Units" of the input sidecar, if any

    @property
    def label(self) -> str:
        return f"sub-{self.subject}" + (f" ses-{self.session}" if self.session else "")

    def folder(self, output_dir: Path) -> Path:
        out = Path(output_dir) / f"sub-{self.subject}"
        return (out / f"ses-{self.session}" if self.session else out) / "mrs"

    def output_files(self) -> list[str]:
        """Every file a finished session has (NIfTI + sidecar per metabolite and kind)."""
        return [output_name(Path(p).name, desc, ext) for p in self.maps.values() for desc in OUTPUT_DESC.values()
                for ext in (".nii.gz", ".json")]


@dataclass
class Dataset:
    """The pybids layouts of the raw dataset and of the MRSI derivatives dataset(s)."""

    root: Path
    raw: object
    mrsi: list  # [(name, BIDSLayout)]


def mrsi_derivative_folders(bids_dir: Path, name: str | None, output_dir: Path) -> list[Path]:
    """`--mrsi-derivatives NAME` (a folder in BIDS_DIR/derivatives, or a path), else every derivatives dataset
    in BIDS_DIR/derivatives except the output folder itself."""
    if name:
        folder = Path(name) if Path(name).is_absolute() or Path(name).exists() else bids_dir / "derivatives" / name
        if not (folder / "dataset_description.json").is_file():
            raise FileNotFoundError(f"--mrsi-derivatives {name}: no BIDS derivatives dataset at {folder} "
                                    "(expected a folder with a dataset_description.json)")
        return [folder]
    base = bids_dir / "derivatives"
    found = [p for p in sorted(base.iterdir()) if (p / "dataset_description.json").is_file()] if base.is_dir() else []
    found = [p for p in found if p.resolve() != Path(output_dir).resolve()]
    if not found:
        raise FileNotFoundError(f"{bids_dir}: no MRSI derivatives dataset under {base} (a folder with a "
                                "dataset_description.json holding the met-*_mrsi maps); name one with "
                                "--mrsi-derivatives")
    return found


def open_dataset(bids_dir, output_dir, mrsi_derivatives: str | None = None) -> Dataset:
    """Index the raw dataset (anat) and the MRSI derivatives with pybids (files are not validated on indexing,
    as BIDS Apps do, so that a dataset with an extra file still runs)."""
    require_pybids()
    from bids import BIDSLayout

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise FileNotFoundError(f"BIDS_DIR {bids_dir}: not a BIDS dataset (no dataset_description.json)")
    raw = BIDSLayout(bids_dir, validate=False)
    mrsi = [(p.name, BIDSLayout(p, validate=False, is_derivative=True,
                                config=["bids", "derivatives", MET_ENTITY_CONFIG]))
            for p in mrsi_derivative_folders(bids_dir, mrsi_derivatives, output_dir)]
    return Dataset(bids_dir, raw, mrsi)


def all_subjects(ds: Dataset) -> list[str]:
    return sorted(set(ds.raw.get_subjects()).union(*[set(d.get_subjects()) for _, d in ds.mrsi]))


def _sessions_of(ds: Dataset, subject: str) -> list[str | None]:
    found = set(ds.raw.get_sessions(subject=subject)).union(*[set(d.get_sessions(subject=subject))
                                                             for _, d in ds.mrsi])
    return sorted(found) or [None]


def _query(layout, subject, session, **filters) -> list:
    """Images of a subject/session; a session-less query (or a fallback to the subject level) when session is
    None, so that anat acquired once per subject serves each session."""
    from bids.layout import Query

    return layout.get(subject=subject, session=session if session else Query.NONE, extension=NIFTI_EXTENSIONS,
                      **filters)


def _one(kind: str, files: list, label: str, problems: list, required: bool):
    if not files:
        if required:
            problems.append(f"no {kind} image")
        return None
    if len(files) > 1:
        names = ", ".join(f.filename for f in files)
        problems.append(f"{len(files)} {kind} images ({names}); choose one with --bids-filter-file")
        return None
    return files[0]


def find_session(ds: Dataset, subject: str, session: str | None, *, mets: Sequence[str] = (),
                 mrsi_desc: str | None = "signal", filters: dict | None = None) -> Session:
    """Everything one session needs, found by entities: maps by `met-` (+ `desc`, default signal), T1w and FLAIR
    in the raw dataset (the session's, else the subject's), an optional quality mask (suffix mask) beside the maps."""
    from bids.layout import Query

    filters = filters or {}
    found = Session(subject, session)
    desc = {"desc": mrsi_desc} if mrsi_desc else {"desc": Query.NONE}
    maps: dict[str, list] = {}
    masks = []
    for name, layout in ds.mrsi:
        for f in _query(layout, subject, session, suffix="mrsi", met=Query.ANY,
                        **{**desc, **filters.get("mrsi", {})}):
            maps.setdefault(f.get_entities()["met"], []).append((name, f))
        masks += [(name, f) for f in _query(layout, subject, session, suffix="mask", **filters.get("mask", {}))]
    wanted = list(mets) or sorted(maps)
    if not maps:
        what = f"desc-{mrsi_desc}" if mrsi_desc else "no desc"
        found.problems.append(f"no MRSI metabolite maps (met-*_{what}_mrsi) in "
                              f"{', '.join(n for n, _ in ds.mrsi)}")
    for met in wanted:
        pick = _one(f"met-{met} map", [f for _, f in maps.get(met, [])], found.label, found.problems, True)
        if pick is not None:
            name = next(n for n, f in maps[met] if f is pick)
            found.maps[met] = Path(pick.path)
            found.sources[pick.path] = f"bids:{name}:{pick.relpath}"
            units = pick.get_metadata().get("Units")
            if units:
                found.units[met] = units
    for kind, attr in (("T1w", "t1w"), ("FLAIR", "flair")):
        key = kind.lower()
        files = _query(ds.raw, subject, session, suffix=kind, **filters.get(key, {}))
        if not files and session:
            files = _query(ds.raw, subject, None, suffix=kind, **filters.get(key, {}))
        pick = _one(kind, files, found.label, found.problems, True)
        if pick is not None:
            setattr(found, attr, Path(pick.path))
            found.sources[pick.path] = f"bids:raw:{pick.relpath}"
    pick = _one("mask", [f for _, f in masks], found.label, found.problems, False)
    if pick is not None:
        found.mask = Path(pick.path)
        found.sources[pick.path] = f"bids:{next(n for n, f in masks if f is pick)}:{pick.relpath}"
    return found


def find_sessions(ds: Dataset, participants: Sequence[str] = (), sessions: Sequence[str] = (), **kw) -> list[Session]:
    """The sessions to process: of the given participants (all when empty), restricted to `sessions` if given."""
    known = all_subjects(ds)
    subjects = [strip_label(p, "sub-") for p in participants] or known
    unknown = [s for s in subjects if s not in known]
    if unknown:
        raise ValueError(f"--participant-label {' '.join(unknown)}: not in {ds.root} (participants: "
                         f"{' '.join(known) or 'none'})")
    wanted = {strip_label(s, "ses-") for s in sessions}
    out = []
    for subject in subjects:
        for ses in _sessions_of(ds, subject):
            if not wanted or ses in wanted:
                out.append(find_session(ds, subject, ses, **kw))
    if not out:
        raise ValueError(f"--session-label {' '.join(sorted(wanted))}: no such session for "
                         f"{' '.join('sub-' + s for s in subjects)}")
    return out


def load_filter_file(path) -> dict:
    """--bids-filter-file: {"t1w"|"flair"|"mrsi"|"mask": {entity: value}} (fMRIPrep's convention)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--bids-filter-file {path}: cannot read it as JSON ({err})") from err
    allowed = {"t1w", "flair", "mrsi", "mask"}
    if not isinstance(data, dict) or not set(data) <= allowed or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--bids-filter-file {path}: expected {{query: {{entity: value}}}} with queries among "
                         f"{sorted(allowed)}")
    return data


# ------------------------------------------------------------------------------------------ dataset description
def dataset_description(model_sha256: str, model_name: str, links: dict) -> dict:
    from . import __version__

    return {"Name": "FTDDM super-resolved MRSI metabolite maps", "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL,
                             "Description": f"FTDDM (Dong et al., Med Image Anal 2024) with model {model_name} "
                                            f"(sha256 {model_sha256})",
                             "ModelSHA256": model_sha256}],
            "DatasetLinks": links}


def ensure_dataset_description(output_dir: Path, description: dict, overwrite: bool) -> None:
    """Write dataset_description.json and .bidsignore; an existing description from another ftddm version or
    model is refused (one derivatives dataset, one model) unless overwrite."""
    path = output_dir / "dataset_description.json"
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            by = old["GeneratedBy"][0]
            same = (by.get("Name"), by.get("Version"), by.get("ModelSHA256")) == tuple(
                description["GeneratedBy"][0][k] for k in ("Name", "Version", "ModelSHA256"))
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            same = False
        if not same:
            raise FileExistsError(f"{path}: OUTPUT_DIR holds results of another ftddm version or model (or not "
                                  "ftddm's); use another OUTPUT_DIR, or pass --overwrite to replace it")
        return
    atomic_write_text(path, json.dumps(description, indent=2) + "\n")
    atomic_write_text(output_dir / ".bidsignore", f"{GROUP_PREFIX}*\n")


# ------------------------------------------------------------------------------------------ one session
def session_state(found: Session, output_dir: Path) -> str:
    """'finished' (every output there), 'partial' (some), or 'todo'."""
    folder = found.folder(output_dir)
    there = [(folder / n).exists() for n in found.output_files()]
    return "finished" if there and all(there) else "partial" if any(there) else "todo"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def super_resolve_session(found: Session, output_dir: Path, model, model_info: dict, options, *, bids_root: Path,
                          overwrite: bool = False, nan_policy: str = "raise",
                          progress: Callable | None = None) -> dict:
    """All the session's metabolites as ONE super_resolve batch, then every NIfTI and sidecar staged and moved
    in together (pipeline._write_outputs): an interruption leaves all of them or none."""
    from . import volume as vol
    from .model import file_sha256
    from .pipeline import _write_outputs, check_mask_coverage, check_output_folder, super_resolve, uncertainty_note

    folder = found.folder(output_dir)
    check_output_folder(folder, found.output_files(), overwrite)
    mets = list(found.maps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = [vol.load_volume(found.maps[m], nan_policy=nan_policy) for m in mets]
        t1 = vol.load_volume(found.t1w, nan_policy=nan_policy)
        flair = vol.load_volume(found.flair, nan_policy=nan_policy)
        mask = None
        if found.mask is not None:
            mask = vol.load_volume(found.mask, nan_policy=nan_policy, allow_all_zero=True)
            check_mask_coverage(mask, inputs[0])
        result = super_resolve(inputs if len(inputs) > 1 else inputs[0], t1, flair, mask, model=model,
                               options=options, progress=progress)
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    if options.samples < 2:
        messages.append(uncertainty_note(options.samples))
    root = bids_root
    roles = [*(("mrsi", found.maps[m]) for m in mets), ("T1w", found.t1w), ("FLAIR", found.flair),
             *([("mask", found.mask)] if found.mask else [])]
    inputs_info = [{"role": role, "path": _relative(p, root), "sha256": file_sha256(p)} for role, p in roles]
    in_mask = result.mask.data > 0
    common = {
        "Sources": [found.sources.get(str(p), _relative(p, root)) for _, p in roles],
        "SoftwareVersion": model_info["ftddm_version"],
        "Inputs": inputs_info, "Model": {k: model_info[k] for k in ("sha256", "config", "file")},
        "Options": result.options, "NFEPerSample": result.nfe, "NetworkCalls": result.network_calls,
        "Timings": result.timings,
        "Grid": {"shape": list(result.grid.shape), "factor": result.grid.factor,
                 "inplane": list(result.grid.inplane), "lr_inplane": list(result.grid.lr_inplane)},
        "Mask": {"source": result.options["mask"], "coverage": float(in_mask.mean())},
        "Warnings": messages,
    }
    volumes, texts = {}, {}
    for c, met in enumerate(mets):
        name = found.maps[met].name
        for kind, volume in (("sr", result.sr), ("uncertainty", result.uncertainty),
                             ("zerofilled", result.zero_filled)):
            out = output_name(name, OUTPUT_DESC[kind])
            volumes[out] = vol.Volume(volume.data[..., c], volume.affine.copy())
            sidecar = {"Description": OUTPUT_DESCRIPTION[kind], **({"Units": found.units[met]} if met in
                                                                  found.units else {}),
                       "Metabolite": met, "Kind": kind, **common}
            if kind == "uncertainty":
                sidecar["Uncertainty"] = uncertainty_note(options.samples, result.uncertainty_calibration)
                sidecar["UncertaintyCalibration"] = result.uncertainty_calibration
            texts[output_name(name, OUTPUT_DESC[kind], ".json")] = json.dumps(sidecar, indent=2) + "\n"
    _write_outputs(folder, volumes, texts, overwrite)
    return {"maps": mets, "timings": result.timings, "warnings": messages,
            "outputs": [str(folder / n) for n in [*volumes, *texts]]}


# ------------------------------------------------------------------------------------------ participant level
Report = Callable[[str], None]


def describe(found: Session) -> str:
    """One line of what a session has: maps, T1w, FLAIR, mask."""
    maps = ", ".join(found.maps) or "none"
    have = lambda p: "yes" if p else "no"  # noqa: E731
    return (f"{found.label}: maps {maps}; T1w {have(found.t1w)}; FLAIR {have(found.flair)}; "
            f"mask {'yes' if found.mask else 'automatic'}")


def run_participants(bids_dir, output_dir, *, participants: Sequence[str] = (), sessions: Sequence[str] = (),
                     mets: Sequence[str] = (), mrsi_derivatives: str | None = None, mrsi_desc: str | None = "signal",
                     filters: dict | None = None, model_path=None, options=None, overwrite: bool = False,
                     nan_policy: str = "raise", report: Report = print, progress_factory=None) -> dict:
    """The participant level: find, report, skip finished sessions, super-resolve the others one by one.

    Returns {"done": [...], "skipped": [...], "failed": {label: reason}}; a session with missing inputs fails
    with its reason while the others go on.
    """
    from .model import DEFAULT_MODEL, file_sha256, load_model
    from .options import SuperResolveOptions

    opts = options or SuperResolveOptions()
    output_dir = Path(output_dir)
    ds = open_dataset(bids_dir, output_dir, mrsi_derivatives)
    found_all = find_sessions(ds, participants, sessions, mets=mets, mrsi_desc=mrsi_desc, filters=filters)
    model_file = Path(model_path) if model_path else DEFAULT_MODEL
    if not model_file.is_file():
        raise FileNotFoundError(f"--model {model_file}: no such file")
    sha = file_sha256(model_file)
    output_dir.mkdir(parents=True, exist_ok=True)
    links = {"raw": Path(bids_dir).resolve().as_uri(), **{n: Path(d.root).resolve().as_uri() for n, d in ds.mrsi}}
    ensure_dataset_description(output_dir, dataset_description(sha, model_file.name, links), overwrite)
    outcome = {"done": [], "skipped": [], "failed": {}}
    model, model_info = None, None
    for found in found_all:
        report(describe(found))
        if found.problems:
            outcome["failed"][found.label] = "; ".join(found.problems)
            report(f"{found.label}: skipped — {'; '.join(found.problems)}")
            continue
        state = session_state(found, output_dir)
        if state == "finished" and not overwrite:
            outcome["skipped"].append(found.label)
            report(f"{found.label}: finished earlier, skipped (--overwrite to redo)")
            continue
        if state == "partial" and not overwrite:
            outcome["failed"][found.label] = "some outputs exist but not all (other --met?); --overwrite redoes it"
            report(f"{found.label}: failed — {outcome['failed'][found.label]}")
            continue
        if model is None:  # once per process, only when there is work
            model = load_model(model_file, device=opts.device)
            model_info = {"sha256": sha, "config": model.config.name, "file": model_file.name,
                          "ftddm_version": __import__("ftddm_core").__version__}
        t0 = time.perf_counter()
        try:
            result = super_resolve_session(found, output_dir, model, model_info, opts, overwrite=overwrite,
                                           nan_policy=nan_policy, bids_root=ds.root,
                                           progress=progress_factory(found.label) if progress_factory else None)
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            outcome["failed"][found.label] = str(err)
            report(f"{found.label}: failed — {err}")
            continue
        for message in result["warnings"]:
            report(f"{found.label}: warning: {message}")
        outcome["done"].append(found.label)
        report(f"{found.label}: done, {len(result['maps'])} maps in {time.perf_counter() - t0:.1f} s → "
               f"{found.folder(output_dir)}")
    return outcome
