"""Guess which loaded volumes are the MRSI map, the T1 and the FLAIR from their names (GUI convenience only)."""
from __future__ import annotations

import re
from typing import Sequence

_PATTERNS = {
    "flair": re.compile(r"flair|t2[-_ ]?f(?![a-z])", re.I),
    "t1": re.compile(r"(?<![a-z0-9])t1(?![0-9])|mprage|spgr", re.I),
    "mrsi": re.compile(r"(?<![a-z])(naa|t?cho|t?cr|m?ins|glx|glu|gln|lac|gsh|2hg|mrsi|csi|metab)", re.I),
}


def guess_input_roles(names: Sequence[str]) -> dict[str, int | None]:
    """{"mrsi", "t1", "flair"} → index of the first name that looks like it (each name used once), else None."""
    taken: set[int] = set()
    out: dict[str, int | None] = {}
    for role in ("flair", "t1", "mrsi"):  # FLAIR first: "T1-FLAIR"-like names are FLAIR, not T1
        out[role] = next((i for i, n in enumerate(names) if i not in taken and _PATTERNS[role].search(n)), None)
        if out[role] is not None:
            taken.add(out[role])
    return out


_METABOLITE_KINDS = {  # spelling in a node name → the name shown to a reader (most specific first)
    "2hg": "2HG", "tnaa": "tNAA", "naa": "NAA", "tcho": "tCho", "cho": "Cho", "tcr": "tCr", "cr": "Cr",
    "mins": "mIns", "ins": "Ins", "glx": "Glx", "glu": "Glu", "gln": "Gln", "gly": "Gly", "lac": "Lac",
    "gsh": "GSH",
}
_KIND_PATTERN = re.compile(r"(?<![a-z0-9])(%s)(?![a-z])" % "|".join(sorted(_METABOLITE_KINDS, key=len, reverse=True)),
                           re.I)


def metabolite_kind(name: str) -> str:
    """The metabolite a map's node name refers to ("Patient7_tCho_LR" → "tCho"), "" when none is recognisable.

    The reader study shows this instead of the node name, which may identify the patient or the method.
    """
    match = _KIND_PATTERN.search(str(name).replace("_", " "))
    return _METABOLITE_KINDS[match.group(1).lower()] if match else ""
