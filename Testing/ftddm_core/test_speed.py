"""Issue 13's fast paths: the precision decision, the images per network call, and that the fast paths (cache-sized
and GPU-sized batches, bf16 where native) give the plain path's samples for a fixed seed."""
import warnings

import numpy as np
import pytest
import torch

from ftddm_core import device as D
from ftddm_core import volume as V
from ftddm_core.demo import simulate_lr
from ftddm_core.model import DEFAULT_MODEL, load_model
from ftddm_core.phantom import make_patient
from ftddm_core.pipeline import SuperResolveOptions, super_resolve
from ftddm_core.sampling import sample_ftddm

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, amx=False, avx512_bf16=False, capability="AVX2"):
    monkeypatch.setattr(D, "cpu_features",
                        lambda: {"capability": capability, "amx_bf16": amx, "avx512_bf16": avx512_bf16})


# --- the precision decision ----------------------------------------------------------------------------
def test_auto_picks_bf16_only_with_amx_on_a_cpu(monkeypatch):
    fake_cpu(monkeypatch, amx=True, avx512_bf16=True, capability="AVX512")
    assert D.choose_precision(CPU, "auto").used == "bf16"
    fake_cpu(monkeypatch, avx512_bf16=True, capability="AVX512")
    auto = D.choose_precision(CPU, "auto")
    assert auto.used == "fp32" and "AVX512-BF16" in auto.why
    assert D.choose_precision(CPU, "bf16").used == "bf16"  # native instructions: what the user asked
    fake_cpu(monkeypatch)
    assert D.choose_precision(CPU, "auto").used == "fp32"
    assert D.choose_precision(CPU, "fp32").as_dict() == {"asked": "fp32", "used": "fp32", "why": "fp32 asked"}


def test_bf16_asked_without_native_bf16_warns_and_runs_fp32(monkeypatch):
    fake_cpu(monkeypatch, capability="AVX2")
    with pytest.warns(UserWarning, match="no native bf16.*running fp32"):
        decision = D.choose_precision(CPU, "bf16")
    assert decision.as_dict()["asked"] == "bf16" and decision.used == "fp32" and "AVX2" in decision.why
    with pytest.warns(UserWarning, match="mps"):
        assert D.choose_precision(torch.device("mps"), "bf16").used == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        D.choose_precision(CPU, "fp16")


def test_cpu_features_agree_with_proc_cpuinfo():
    features = D.cpu_features()
    assert features["capability"] == torch.backends.cpu.get_cpu_capability()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    assert features["avx512_bf16"] >= ("avx512_bf16" in flags) and features["amx_bf16"] >= ("amx_bf16" in flags)


def test_options_validate_precision_and_max_batch():
    assert SuperResolveOptions().precision == "auto" and SuperResolveOptions().max_batch == 0
    with pytest.raises(ValueError, match="precision"):
        SuperResolveOptions(precision="half")
    with pytest.raises(ValueError, match="max_batch"):
        SuperResolveOptions(max_batch=-1)


# --- images per network call ---------------------------------------------------------------------------
def test_auto_batch_is_cache_sized_on_cpu_and_memory_sized_on_cuda(monkeypatch):
    assert D.auto_batch(CPU, 0) == D.CPU_AUTO_BATCH and D.auto_batch(CPU, 7) == 7
    with pytest.raises(ValueError, match="max_batch"):
        D.auto_batch(CPU, -2)
    cuda = torch.device("cuda")
    sizes = []
    for free_gib in (0.25, 8, 40, 140):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free_gib: (int(f * 2**30), int(f * 2**30)))
        sizes.append(D.auto_batch(cuda, 0, 64 * 64))
        # half the free memory holds the batch at the stated bytes per pixel, or the bounds apply
        low, high = D.GPU_AUTO_BATCH_RANGE
        assert low <= sizes[-1] <= high
        assert sizes[-1] == low or sizes[-1] * 64 * 64 * D.GPU_BYTES_PER_PIXEL <= 0.5 * free_gib * 2**30
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] and D.auto_batch(cuda, 0, 128 * 128) < sizes[-1]


def tiny_cond(batch=17, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.2).float()
    lr, t1, flair = (torch.rand(batch, 1, size, size, generator=g) for _ in range(3))
    return torch.cat([lr * mask, mask, t1, flair], dim=1)


@pytest.mark.parametrize("sampler", ["dpmpp", "dpmpp-3m"])
def test_cache_sized_and_gpu_sized_batches_give_the_plain_samples(tiny_model_file, sampler):
    """The CPU auto batch (16: three calls for 17 maps × 2 samples) and one GPU-sized call (all 34 chains) give the
    samples of one chain per call, to float rounding (1e-5; oneDNN may block a batch differently), same dtype."""
    model = load_model(tiny_model_file, device="cpu")
    cond = tiny_cond()
    runs = {m: sample_ftddm(model, cond, 4.0, sampler=sampler, steps=3, n_samples=2, max_batch=m, keep_samples=True,
                            generator=torch.Generator().manual_seed(5))
            for m in (1, D.CPU_AUTO_BATCH, D.GPU_AUTO_BATCH_RANGE[0])}
    plain = runs[1]
    for m, run in runs.items():
        assert run.samples.shape == (17, 2, 1, 16, 16) and run.samples.dtype == torch.float32
        assert run.network_calls == -(-17 // m) + 4 * -(-34 // m)  # encoder calls + chain calls × NFE 4
        torch.testing.assert_close(run.samples, plain.samples, rtol=0, atol=1e-5)
        torch.testing.assert_close(run.std, plain.std, rtol=0, atol=1e-5)


# --- the shipped model, end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_exam():
    if not DEFAULT_MODEL.exists():
        pytest.skip("the shipped model is not installed")
    patient = make_patient(2024, slices=3)
    lr = [simulate_lr(V.Volume(m, patient.affine, n), 16) for n, m in list(patient.maps.items())[:2]]
    return (lr, V.Volume(patient.t1, patient.mri_affine), V.Volume(patient.flair, patient.mri_affine),
            load_model(None, device="cpu"))


def test_auto_batch_exam_equals_one_map_per_call_and_records_the_decisions(small_exam):
    """The default (max_batch auto, precision auto) on the shipped model equals one map per network call for a
    fixed seed to 1e-5 of the map's maximum, and run options record what was used and why."""
    lr, t1, flair, model = small_exam
    auto = super_resolve(lr, t1, flair, model=model, samples=2, steps=3, precision="fp32")
    plain = super_resolve(lr, t1, flair, model=model, samples=2, steps=3, precision="fp32", max_batch=1)
    peak = float(np.abs(plain.sr.data).max())
    assert peak > 0
    np.testing.assert_allclose(auto.sr.data, plain.sr.data, rtol=0, atol=1e-5 * peak)
    np.testing.assert_allclose(auto.uncertainty.data, plain.uncertainty.data, rtol=0, atol=1e-5 * peak)
    assert auto.options["max_batch_used"] == D.CPU_AUTO_BATCH and plain.options["max_batch_used"] == 1
    assert auto.options["precision_used"] == {"asked": "fp32", "used": "fp32", "why": "fp32 asked"}


def test_bf16_where_native_stays_within_two_percent_of_fp32(small_exam, monkeypatch):
    """bf16 autocast (forced native here) changes the SR maps by bf16 rounding only: < 2 % of the map's maximum
    (measured 0.85 % on the 273-map exam); where it is not native it is not used and the result is fp32's."""
    lr, t1, flair, model = small_exam
    fp32 = super_resolve(lr, t1, flair, model=model, samples=1, steps=3, precision="fp32")
    fake_cpu(monkeypatch, avx512_bf16=True, capability="AVX512")
    bf16 = super_resolve(lr, t1, flair, model=model, samples=1, steps=3, precision="bf16")
    peak = float(np.abs(fp32.sr.data).max())
    deviation = float(np.abs(bf16.sr.data - fp32.sr.data).max()) / peak
    assert bf16.options["precision_used"]["used"] == "bf16" and 0 < deviation < 0.02, deviation
    fake_cpu(monkeypatch, capability="AVX2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emulated = super_resolve(lr, t1, flair, model=model, samples=1, steps=3, bf16=True)
    assert emulated.options["precision_used"]["used"] == "fp32"
    np.testing.assert_array_equal(emulated.sr.data, fp32.sr.data)
