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
