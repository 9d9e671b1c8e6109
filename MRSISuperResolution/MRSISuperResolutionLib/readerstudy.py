"""Blinded reader study of low-resolution / super-resolved pairs (the FTDDM paper's protocol).

Each trial shows one pair — the same slice of one metabolite map, low resolution and super-resolved — as
images "A" and "B" in random order; the reader scores both images (10 poor, 30 bad, 50 fair, 70 good,
90 excellent, NA) for the metabolite's conspicuity, overall sharpness, grey matter, white matter, ventricles
and lesion. Files per reader in the study folder:

* ``scores_<reader>.csv`` — reader, case id, image (A/B), one column per item, time. De-identified: case ids
  are random labels, nothing names the patient, the metabolite or the method.
* ``key_<reader>.csv`` — the unblinding key: presentation order, case id, which side holds the SR image,
  patient, metabolite, slice and the (hidden) references of both images. Kept apart from the scores.

A reading resumes where it stopped: the key fixes order and sides, the scores file says what is done.
"""
from __future__ import annotations

import csv
import io
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

SCORE_CHOICES = ("10", "30", "50", "70", "90", "NA")
SCORE_LABELS = {"10": "poor", "30": "bad", "50": "fair", "70": "good", "90": "excellent", "NA": "not assessable"}
ITEMS = ("conspicuity", "sharpness", "grey_matter", "white_matter", "ventricles", "lesion")
ITEM_LABELS = {"conspicuity": "{metabolite} conspicuity", "sharpness": "Overall sharpness",
               "grey_matter": "Grey matter", "white_matter": "White matter", "ventricles": "Ventricles",
               "lesion": "Lesion"}
SIDES = ("A", "B")
SCORE_COLUMNS = ("reader", "case_id", "image", *ITEMS, "time")
KEY_COLUMNS = ("order", "case_id", "sr_side", "patient", "metabolite", "slice", "low_ref", "sr_ref")


@dataclass(frozen=True)
class PairSource:
    """One LR/SR pair to read; the refs (node ids, names or paths) are only used to display the images."""

    patient: str
    metabolite: str
    slice_index: int
    low_ref: str
    sr_ref: str


@dataclass(frozen=True)
class Trial:
    """A pair as presented: de-identified case id and which side (A/B) holds the super-resolved image."""

    case_id: str
    source: PairSource
    sr_side: str

    def ref(self, side: str) -> str:
        """The reference of the image shown as `side`."""
        return self.source.sr_ref if self.method(side) == "SR" else self.source.low_ref

    def method(self, side: str) -> str:
        """"SR" or "LR" for the image shown as `side` (unblinding)."""
        return "SR" if _check_side(side) == self.sr_side else "LR"

    def item_labels(self) -> list[str]:
        """Labels of the scored items, the metabolite named in the conspicuity item."""
        return [ITEM_LABELS[i].format(metabolite=self.source.metabolite) for i in ITEMS]


def _check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"image side must be one of {SIDES}, got {side!r}")
    return side


def reader_slug(reader: str) -> str:
    """A reader name usable in file names (letters, digits, '-', '_')."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", str(reader).strip()).strip("_")
    if not slug:
        raise ValueError(f"reader name must contain letters or digits, got {reader!r}")
    return slug


def case_ids(sources: Sequence[PairSource], study_seed: int) -> dict[PairSource, str]:
    """De-identified case ids: a study-seeded random permutation of the sorted pairs (same for every reader)."""
    ordered = sorted(set(sources), key=lambda s: (s.patient, s.metabolite, s.slice_index, s.low_ref, s.sr_ref))
    numbers = list(range(1, len(ordered) + 1))
    random.Random(f"case-ids:{study_seed}").shuffle(numbers)
    width = max(4, len(str(len(ordered))))
    return {src: f"C{n:0{width}d}" for src, n in zip(ordered, numbers)}


def plan_trials(sources: Sequence[PairSource], *, study_seed: int, reader_seed: int) -> list[Trial]:
    """Trials in a reader-seeded random order, each with a random side for the SR image."""
    if not sources:
        raise ValueError("a reader study needs at least one LR/SR pair")
    if len(set(sources)) != len(sources):
        raise ValueError("the same LR/SR pair is listed twice")
    ids = case_ids(sources, study_seed)
    rng = random.Random(f"reader:{reader_seed}")
    order = sorted(sources, key=lambda s: ids[s])  # start from a canonical order, then shuffle
    rng.shuffle(order)
    return [Trial(ids[s], s, rng.choice(SIDES)) for s in order]


def slices_with_signal(data_ijk, axis: int, min_fraction: float = 0.1, level: float = 0.05) -> list[int]:
    """Slices (along `axis`) where at least min_fraction of voxels exceed `level` × the map's maximum."""
    import numpy as np

    data = np.nan_to_num(np.asarray(data_ijk, dtype=np.float64))
    if data.ndim != 3 or axis not in (0, 1, 2):
        raise ValueError(f"expected a 3D map and a slice axis 0, 1 or 2, got shape {data.shape}, axis {axis!r}")
    peak = float(data.max())
    if peak <= 0:
        return []
    inside = np.moveaxis(data > level * peak, axis, 0).reshape(data.shape[axis], -1).mean(axis=1)
    return [int(k) for k in np.flatnonzero(inside >= min_fraction)]


def choose_slices(indices: Sequence[int], count: int, seed) -> list[int]:
    """All indices (count ≤ 0) or a seeded random subset of `count` of them, in increasing order."""
    indices = list(indices)
    if count <= 0 or count >= len(indices):
        return indices
    return sorted(random.Random(f"slices:{seed}").sample(indices, count))


def validate_scores(scores: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """{"A": {item: score}, "B": {...}} with every item scored by one of SCORE_CHOICES; ValueError otherwise."""
    clean = {}
    for side in SIDES:
        given = scores.get(side)
        if not isinstance(given, Mapping):
            raise ValueError(f"expected scores for image {side}, got none")
        unknown = sorted(set(given) - set(ITEMS))
        if unknown:
            raise ValueError(f"image {side}: unknown item(s) {unknown}; expected {list(ITEMS)}")
        row = {}
        for item in ITEMS:
            value = str(given.get(item, "")).strip().upper()
            if value not in SCORE_CHOICES:
                raise ValueError(f"image {side}, {item}: score must be one of {SCORE_CHOICES}, "
                                 f"got {given.get(item)!r}")
            row[item] = value
        clean[side] = row
    return clean


def _append_atomic(path: Path, text: str) -> None:
    """Append text in one write and fsync, so an interrupted reading loses at most the trial being saved."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":  # a row cut short earlier: start on a fresh line so it stays alone
                text = "\n" + text
    with open(path, "a", newline="", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


class ReaderSession:
    """One reader's blinded reading of a study: order, sides, scores on disk, resumable."""

    def __init__(self, folder, reader: str, trials: Sequence[Trial]):
        self.folder = Path(folder)
        self.reader = reader_slug(reader)
        self.trials = list(trials)
        self._by_id = {t.case_id: t for t in self.trials}

    @property
    def key_path(self) -> Path:
        return self.folder / f"key_{self.reader}.csv"

    @property
    def scores_path(self) -> Path:
        return self.folder / f"scores_{self.reader}.csv"

    # --- creation / resumption --------------------------------------------------------------------------
    @classmethod
    def start(cls, folder, reader: str, sources: Sequence[PairSource], *, study_seed: int,
              reader_seed: int | None = None) -> "ReaderSession":
        """Resume this reader's session if its key exists in folder, else plan a new one and write the key."""
        folder = Path(folder)
        if (folder / f"key_{reader_slug(reader)}.csv").exists():
            return cls.resume(folder, reader)
        seed = reader_seed if reader_seed is not None else random.SystemRandom().randrange(2**31)
        session = cls(folder, reader, plan_trials(sources, study_seed=study_seed, reader_seed=seed))
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(KEY_COLUMNS)
        for n, t in enumerate(session.trials, 1):
            s = t.source
            writer.writerow([n, t.case_id, t.sr_side, s.patient, s.metabolite, s.slice_index, s.low_ref, s.sr_ref])
        from ftddm_core.atomic import atomic_write_text  # here: the engine joins sys.path after the Lib loads

        atomic_write_text(session.key_path, buf.getvalue())
        return session

    @classmethod
    def resume(cls, folder, reader: str) -> "ReaderSession":
        """Load a session from its key file (FileNotFoundError if this reader has none)."""
        path = Path(folder) / f"key_{reader_slug(reader)}.csv"
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or set(KEY_COLUMNS) - set(rows[0]):
            raise ValueError(f"{path}: not a reader-study key (expected columns {list(KEY_COLUMNS)})")
        rows.sort(key=lambda r: int(r["order"]))
        trials = [Trial(r["case_id"], PairSource(r["patient"], r["metabolite"], int(r["slice"]), r["low_ref"],
                                                 r["sr_ref"]), _check_side(r["sr_side"])) for r in rows]
        return cls(folder, reader, trials)

    # --- progress ---------------------------------------------------------------------------------------
    def scored_rows(self) -> list[dict]:
        """Complete score rows on disk (a row cut short by an interruption is ignored)."""
        if not self.scores_path.exists():
            return []
        with open(self.scores_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return [r for r in rows if r.get("case_id") in self._by_id and r.get("image") in SIDES
                and all(r.get(i) in SCORE_CHOICES for i in ITEMS)]

    def completed_ids(self) -> set[str]:
        """Case ids whose A and B images are both scored."""
        sides: dict[str, set] = {}
        for r in self.scored_rows():
            sides.setdefault(r["case_id"], set()).add(r["image"])
        return {cid for cid, s in sides.items() if s == set(SIDES)}

    def next_trial(self) -> Trial | None:
        """The first trial in presentation order not yet scored, None when the reading is complete."""
        done = self.completed_ids()
        return next((t for t in self.trials if t.case_id not in done), None)

    def progress(self) -> tuple[int, int]:
        """(trials scored, trials in total)."""
        return len(self.completed_ids()), len(self.trials)

    # --- scoring ----------------------------------------------------------------------------------------
    def record(self, case_id: str, scores: Mapping[str, Mapping[str, str]]) -> None:
        """Save both images' scores of one trial (ValueError for an unknown or already scored case)."""
        if case_id not in self._by_id:
            raise ValueError(f"unknown case id {case_id!r} in this reading")
        if case_id in self.completed_ids():
            raise ValueError(f"case {case_id} is already scored")
        clean = validate_scores(scores)
        buf = io.StringIO()
        writer = csv.writer(buf)
        if not self.scores_path.exists() or self.scores_path.stat().st_size == 0:
            writer.writerow(SCORE_COLUMNS)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        for side in SIDES:
            writer.writerow([self.reader, case_id, side, *(clean[side][i] for i in ITEMS), stamp])
        self.folder.mkdir(parents=True, exist_ok=True)
        _append_atomic(self.scores_path, buf.getvalue())

    def unblinded(self) -> list[dict]:
        """Score rows joined with the key: adds patient, metabolite, slice and method (SR/LR) of each image."""
        out = []
        for r in self.scored_rows():
            t = self._by_id[r["case_id"]]
            out.append({**r, "patient": t.source.patient, "metabolite": t.source.metabolite,
                        "slice": t.source.slice_index, "method": t.method(r["image"])})
        return out
