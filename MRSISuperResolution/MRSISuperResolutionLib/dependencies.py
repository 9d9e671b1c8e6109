"""Which Python packages the ftddm engine needs inside Slicer, and which of them are missing.

torch is not in requirements.txt on purpose: it must come from the PyTorch extension (PyTorchUtils), which
picks the CUDA build matching the driver; a pip install of torch would pull the wrong one.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable

# distribution name → import name, where they differ
IMPORT_NAMES = {"scikit-image": "skimage", "pytorch-msssim": "pytorch_msssim", "simpleitk": "SimpleITK"}
TORCH_REQUIREMENT = ">=2.1"


def parse_requirements(text: str) -> list[tuple[str, str, str]]:
    """(distribution, import name, full requirement line) per non-comment line of a requirements file."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if not match:
            raise ValueError(f"cannot read requirement {raw!r}; expected 'name>=version'")
        dist = match.group(1)
        out.append((dist, IMPORT_NAMES.get(dist.lower(), dist.replace("-", "_")), line))
    return out


def load_requirements(path) -> list[tuple[str, str, str]]:
    return parse_requirements(Path(path).read_text(encoding="utf-8"))


def missing_requirements(requirements, find_spec: Callable = importlib.util.find_spec) -> list[str]:
    """Requirement lines whose package cannot be imported (find_spec never imports the package itself)."""
    missing = []
    for _dist, module, line in requirements:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(line)
    return missing


def installed_version(distribution: str) -> str | None:
    """Version of an installed distribution from its metadata (nothing is imported), None if not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_satisfies(version: str, specifier: str) -> bool:
    """True if version (e.g. "2.4.1+cu121") meets specifier (e.g. ">=2.1"); local build tags are ignored.

    packaging is in Slicer's bundle; an unreadable version counts as not satisfying (reinstall is offered).
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(specifier)
    except InvalidVersion:
        return False
