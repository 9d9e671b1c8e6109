"""FTDDM v2 bundle: safetensors save/load round trip, refusal of pickles, corrupt, mismatched and v1 files, the
regression model and sampler, any image size and exact invariance of FTDDM.sample to zero padding."""
import dataclasses
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


def tiny_condition(batch=2, seed=0, height=64, width=None):
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(batch, 4, height, width or height, generator=g)
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


# --- FTDDM v2: the v1 format, the regression model and sampler, any size, padding -------------------------
def test_v1_model_file_is_refused_with_a_clear_error(tiny_model, tmp_path):
    from safetensors.torch import save_file

    from ftddm_core.checkpoint import json_metadata

    meta = json_metadata(config=preset("tiny").to_dict())
    meta["format"] = "ftddm-model/1"
    save_file({"unet.input_conv.weight": torch.zeros(8, 5, 3, 3)}, str(tmp_path / "v1.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"v1\.safetensors is an FTDDM v1 model.*retrain"):
        FTDDM.load(tmp_path / "v1.safetensors")


def test_regression_model_is_the_encoder_alone(tmp_path):
    model = FTDDM(preset("regression"))
    assert model.config.kind == "regression" and model.unet is None and model.flow is None
    assert {name.split(".")[0] for name in model.state_dict()} == {"encoder"}
    assert model.encoder.config == preset("compact").encoder
    tiny = FTDDM(dataclasses.replace(preset("tiny"), kind="regression", name="tiny-regression"))
    randomise(tiny)
    loaded = FTDDM.load(tiny.save(tmp_path / "r.safetensors"))
    cond, scale = tiny_condition(2, height=24, width=40)
    a, b = tiny.eval().sample(cond, scale), loaded.sample(cond, scale)
    assert a.nfe == 1 and torch.equal(a.std, torch.zeros_like(a.std)) and torch.equal(a.mean, b.mean)


def test_regression_sampler_returns_the_encoder_output_with_one_evaluation(tiny_model):
    cond, scale = tiny_condition(2, height=20, width=28)
    result = tiny_model.sample(cond, scale, sampler="regression")
    # by hand: pad to the multiple, run the encoder once, clamp to the data range, mask, crop
    padded = torch.nn.functional.pad(cond, (0, 4, 0, 4))
    valid = torch.nn.functional.pad(torch.ones(2, 1, 20, 28), (0, 4, 0, 4))
    with torch.no_grad():
        out = tiny_model.encoder(None, torch.zeros(2, dtype=torch.long), padded, scale, valid)
    lo, hi = tiny_model.config.x0_clip
    expected = (out.clamp(lo, hi) * padded[:, 1:2])[..., :20, :28]
    assert result.nfe == 1 and result.mean.shape == (2, 1, 20, 28)
    torch.testing.assert_close(result.mean, expected)
    assert torch.equal(result.std, torch.zeros_like(result.std)) and float(result.mean.abs().max()) > 0


SAMPLE = dict(sampler="dpmpp", steps=3, n_samples=3, tau_f=0.9)


def _sample(model, cond, scale, **kw):
    from ftddm_core.sampling import sample_ftddm

    return sample_ftddm(model, cond, scale, generator=torch.Generator().manual_seed(7), **SAMPLE, **kw)


def test_sample_of_a_non_multiple_size_equals_the_image_in_a_larger_padded_canvas(tiny_model):
    """20×28 through FTDDM.sample (padded to 24×32 and cropped) vs the same image at the top-left of a 40×48
    zero canvas with its valid mask: the same mean and std (dpmpp, three samples, τ_f = 0.9)."""
    cond, scale = tiny_condition(2, height=20, width=28)
    ref = tiny_model.sample(cond, scale, generator=torch.Generator().manual_seed(7), **SAMPLE)
    assert ref.mean.shape == ref.std.shape == (2, 1, 20, 28)
    canvas = torch.nn.functional.pad(cond, (0, 20, 0, 20))
    valid = torch.nn.functional.pad(torch.ones(2, 1, 20, 28), (0, 20, 0, 20))
    out = _sample(tiny_model, canvas, scale, valid=valid)
    torch.testing.assert_close(out.mean[..., :20, :28], ref.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std[..., :20, :28], ref.std, rtol=0, atol=1e-5)
    assert float(ref.std.max()) > 1e-4  # the samples really differ: the comparison covers the noise draws


def test_sample_of_a_multiple_size_equals_the_image_padded_by_hand(tiny_model):
    cond, scale = tiny_condition(2, height=40, width=56)
    ref = tiny_model.sample(cond, scale, generator=torch.Generator().manual_seed(7), **SAMPLE)
    canvas = torch.nn.functional.pad(cond, (0, 8, 0, 16))
    valid = torch.nn.functional.pad(torch.ones(2, 1, 40, 56), (0, 8, 0, 16))
    out = _sample(tiny_model, canvas, scale, valid=valid)
    torch.testing.assert_close(out.mean[..., :40, :56], ref.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std[..., :40, :56], ref.std, rtol=0, atol=1e-5)


def test_rectangular_odd_size_runs_and_keeps_its_size(tiny_model):
    cond, scale = tiny_condition(1, height=21, width=35)
    result = tiny_model.sample(cond, scale, steps=2, n_samples=2, keep_samples=True)
    assert result.mean.shape == result.std.shape == (1, 1, 21, 35)
    assert result.samples.shape == (1, 2, 1, 21, 35)
    assert torch.isfinite(result.mean).all() and torch.count_nonzero(result.mean * (1 - cond[:, 1:2])) == 0


def test_parameters_do_not_depend_on_the_input_size_and_one_model_runs_on_any_size(tiny_model):
    """No position-tied parameters: the same tensors whatever the tile size; one model runs on 16×16, 64×64
    and 128×168 (the large one as one image of a real 128×168 output grid)."""
    shapes = {k: v.shape for k, v in FTDDM(preset("tiny")).state_dict().items()}
    for size in (16, 128):  # the UNets' image_size picks their attention levels; the flow's changes nothing
        cfg = preset("tiny")
        cfg.flow.image_size = size
        assert {k: v.shape for k, v in FTDDM(cfg).state_dict().items()} == shapes
    for height, width in ((16, 16), (64, 64), (128, 168)):
        cond, scale = tiny_condition(1, height=height, width=width)
        result = tiny_model.sample(cond, scale, steps=1, generator=torch.Generator().manual_seed(0))
        assert result.mean.shape == (1, 1, height, width) and torch.isfinite(result.mean).all()


def test_a_safetensors_header_length_that_starts_like_a_pickle_is_not_refused(tmp_path):
    """The 8-byte header length 640 is b"\\x80\\x02…", the opening of a protocol-2 pickle."""
    from safetensors.torch import save_file

    from ftddm_core.checkpoint import read_safetensors

    path = tmp_path / "w.safetensors"
    for pad in range(0, 800, 8):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no metadata length gave a 640-byte header")
    tensors, meta = read_safetensors(path)
    assert torch.equal(tensors["w"], torch.zeros(2)) and len(meta["pad"]) == pad


def test_a_plain_ddpm_from_noise_never_runs_the_encoder():
    """The ddpm comparison preset's ε-UNet sees y alone: a noise chain needs no encoder pass (work not done twice)."""
    model = FTDDM(preset("ddpm")).eval()
    calls, encode = [], model.encode
    model.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    cond = torch.rand(2, 4, 16, 16)
    cond[:, 1] = 1.0
    res = model.sample(cond, torch.full((2,), 4.0), sampler="dpmpp", start="noise", steps=2,
                       generator=torch.Generator().manual_seed(0))
    assert calls == [] and res.nfe == 3 and res.network_calls == 3
    model.sample(cond, torch.full((2,), 4.0), sampler="dpmpp", steps=2)  # a flow start does use the encoder
    assert calls == [1]
