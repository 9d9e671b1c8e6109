"""Shared fixtures: a tiny synthetic dataset and a tiny random-weights model (kept small: 2-core CI)."""
import pytest
import torch

from ftddm_core.config import preset
from ftddm_core.data import write_phantom_dataset
from ftddm_core.model import FTDDM


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Three synthetic patients with two slices each, in the on-disk dataset format."""
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "phantom", patients=3, seed=11, slices=2)


@pytest.fixture(scope="session")
def invivo_dataset(tmp_path_factory):
    """Three in-vivo-like patients (`ftddm phantom --realism invivo`): map grids 39×45, 73×70 and 47×52."""
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "invivo", patients=3, seed=11, realism="invivo",
                                 kind="mixed")


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """A tiny FTDDM with small random (non-identity) weights saved as safetensors."""
    torch.manual_seed(0)
    model = FTDDM(preset("tiny"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model.save(tmp_path_factory.mktemp("model") / "tiny.safetensors")
