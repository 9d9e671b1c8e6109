"""FTDDM bundle: safetensors save/load round trip, refusal of pickles and corrupt or mismatched files."""
import json

import pytest
import torch

from ftddm_core.config import preset
from ftddm_core.model import FTDDM, load_model


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return randomise(FTDDM(preset("tiny"))).eval()


def tiny_condition(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(batch, 4, 64, 64, generator=g)
    cond[:, 1] = (cond[:, 1] > 0.2).float()
    return cond, torch.full((batch,), 4.0)


def test_save_load_gives_identical_samples(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.safetensors")
    loaded = FTDDM.load(path)
    assert loaded.config == tiny_model.config
    cond, scale = tiny_condition()
    kw = dict(sampler="dpmpp", steps=3, n_samples=2, generator=None)
    a = tiny_model.sample(cond, scale, **{**kw, "generator": torch.Generator().manual_seed(5)})
    b = loaded.sample(cond, scale, **{**kw, "generator": torch.Generator().manual_seed(5)})
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    # the config travels inside the file as JSON
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert json.loads(fh.metadata()["config"])["name"] == "tiny"


def test_refuses_overwrite(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError, match="overwrite"):
        tiny_model.save(path)
    tiny_model.save(path, overwrite=True)


def test_pickle_is_refused_without_unpickling(tiny_model, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model.pt", "model.safetensors"):
        path = tmp_path / name
        torch.save({"state": Evil()}, path)
        with pytest.raises(ValueError, match="pickle"):
            FTDDM.load(path)
    assert not marker.exists()


def test_truncated_and_foreign_files(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        FTDDM.load(tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_text("hello world")
    with pytest.raises(ValueError, match="not a safetensors"):
        FTDDM.load(tmp_path / "text.safetensors")
    with pytest.raises(FileNotFoundError):
        FTDDM.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an FTDDM model"):
        FTDDM.load(tmp_path / "other.safetensors")


def test_mismatched_weights_are_explained(tiny_model, tmp_path):
    from ftddm_core.checkpoint import json_metadata, write_safetensors
    from ftddm_core.model import FORMAT

    state = dict(tiny_model.state_dict())
    state.pop(next(iter(state)))
    meta = json_metadata(config=preset("compact").to_dict())  # wrong config for these tensors
    meta["format"] = FORMAT
    write_safetensors(tmp_path / "bad.safetensors", state, meta)
    with pytest.raises(ValueError, match="does not match its config"):
        FTDDM.load(tmp_path / "bad.safetensors")


def test_scale_outside_trained_range(tiny_model):
    cond, _ = tiny_condition(1)
    with pytest.raises(ValueError, match="trained range"):
        tiny_model.sample(cond, torch.tensor([9.0]))
    tiny_model.sample(cond, torch.tensor([9.0]), force_scale=True, steps=2)


def test_load_model_default_missing_is_explained(monkeypatch, tmp_path):
    import ftddm_core.model as m

    monkeypatch.setattr(m, "DEFAULT_MODEL", tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="default model"):
        load_model(None, device="cpu")


def test_device_selection():
    from ftddm_core.device import resolve_device

    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bf16_autocast_sampling_is_close_to_fp32(tiny_model):
    from ftddm_core.device import autocast

    cond, scale = tiny_condition(2)
    kw = dict(sampler="dpmpp", steps=3, tau_f=0.0)
    ref = tiny_model.sample(cond, scale, **kw).mean
    with autocast(torch.device("cpu"), True):
        fast = tiny_model.sample(cond, scale, **kw).mean
    assert fast.dtype == torch.float32
    assert float((fast - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-3
