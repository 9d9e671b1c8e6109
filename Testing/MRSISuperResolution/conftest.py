"""Shared fixtures of the MRSISuperResolution tests: the module folder on sys.path, a tiny model, a patient."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MRSISuperResolution"


def shared_folder() -> Path | None:
    """The project's `shared/` folder beside the repository (or beside the folder of a git worktree), or None."""
    for candidate in (REPO.parent / "shared", REPO.parent.parent / "shared"):
        if (candidate / "reference").is_dir():
            return candidate
    return None


if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weights FTDDM with the 'tiny' preset, saved like a real model file."""
    from ftddm_core.config import preset
    from ftddm_core.model import FTDDM

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    FTDDM(preset("tiny")).save(path)
    return path


@pytest.fixture(scope="session")
def sample_patient():
    """The module's synthetic sample patient: {"NAA", "tCho", "T1", "FLAIR"} → (array (i, j, k), affine)."""
    from MRSISuperResolutionLib import sampledata

    return sampledata.synthetic_patient()
