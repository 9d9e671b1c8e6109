"""bench/invivo_kinds.py on a tiny model and one held-out patient per kind: per-kind reports, metrics that agree
with scikit-image on an independently derived zero-filled map, paired statistics from scipy, held-out seeds."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ftddm_core import invivo
from ftddm_core.phantom import patient_seed

BENCH = Path(__file__).resolve().parents[2] / "bench" / "invivo_kinds.py"
KINDS = ("rectangular", "noisy", "5mm", "mixed")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("invivo_kinds", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def run(bench, tiny_model_file, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("kinds") / "kinds"
    result = bench.main(["--model", str(tiny_model_file), "--kinds", ",".join(KINDS), "--factors", "2",
                         "--patients", "1", "--samples", "2", "--max-maps-per-kind", "3", "--out-prefix", str(prefix)])
    return bench, prefix, result


def centred_fft(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x)))


def centred_ifft(k):
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k)))


def zero_filled_by_hand(hr: np.ndarray, factor: float) -> np.ndarray:
    """|zero-fill(|k-space truncation of hr|)| up to a constant: centred block m_a = round(n_a/F) (half up)."""
    n = hr.shape
    m = [max(int(np.floor(a / factor + 0.5)), 4) for a in n]
    k = centred_fft(hr)
    lo = [a // 2 - b // 2 for a, b in zip(n, m)]
    block = k[lo[0]:lo[0] + m[0], lo[1]:lo[1] + m[1]]
    lr = np.abs(centred_ifft(block))
    small = centred_fft(lr)
    big = np.zeros(n, dtype=complex)
    big[lo[0]:lo[0] + m[0], lo[1]:lo[1] + m[1]] = small
    return np.abs(centred_ifft(big))


def test_writes_one_report_per_kind_never_averaged(run):
    bench, prefix, result = run
    on_disk = json.loads(prefix.with_suffix(".json").read_text())
    assert list(on_disk["kinds"]) == list(KINDS)
    md = prefix.with_suffix(".md").read_text()
    for kind in KINDS:
        assert f"## {kind}" in md
        cell = on_disk["kinds"][kind]["factors"]["2"]
        assert cell["maps"] == len(cell["per_map"]) == 3
        assert set(cell["methods"]) == {"zero-filled", "regression", "FTDDM"}
        assert {r["patient"] for r in cell["per_map"]} == {f"{kind}-001"}
    assert md.count("## ") == len(KINDS)  # no pooled section
    verdict_rows = [line for line in md.splitlines() if line.startswith("| 2 | ✓") or line.startswith("| 2 | ✗")]
    assert len(verdict_rows) == len(KINDS)
    assert on_disk["cpu"] and on_disk["seconds"] > 0


def test_zero_filled_metrics_match_scikit_image_on_an_independent_derivation(run):
    _, _, result = run
    for kind in ("rectangular",):  # an odd, non-square matrix
        row = result["kinds"][kind]["factors"]["2"]["per_map"][0]
        p = invivo.make_invivo_patient(patient_seed(10_000 + invivo.KINDS.index(kind), 0), kind=kind)
        mask = (p.quality_mask & p.brain_mask)[:, :, row["slice"]]
        hr = p.maps[row["metabolite"]][:, :, row["slice"]].astype(np.float64)
        gt, zf = hr * mask, zero_filled_by_hand(hr, 2.0) * mask  # PSNR/SSIM/NRMSE ignore a common scale
        rng = gt.max() - gt.min()
        got = row["zero-filled"]
        assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, zf, data_range=rng), abs=2e-3)
        assert got["ssim"] == pytest.approx(structural_similarity(gt, zf, data_range=rng, win_size=7), abs=2e-4)
        assert got["nrmse_mask"] == pytest.approx(np.linalg.norm((gt - zf)[mask]) / np.linalg.norm(gt[mask]),
                                                  rel=1e-4)


def test_summaries_and_wilcoxon_follow_the_per_map_values(run):
    bench, _, result = run
    for kind in KINDS:
        cell = result["kinds"][kind]["factors"]["2"]
        rows = cell["per_map"]
        ftddm = [r["FTDDM"]["ssim"] for r in rows]
        zf = [r["zero-filled"]["ssim"] for r in rows]
        assert cell["methods"]["FTDDM"]["ssim"]["mean"] == pytest.approx(np.mean(ftddm))
        assert cell["methods"]["zero-filled"]["ssim"]["std"] == pytest.approx(np.std(zf))
        assert cell["ftddm_vs"]["zero-filled"]["ssim"]["wilcoxon_p"] == pytest.approx(stats.wilcoxon(ftddm, zf).pvalue)
        d = cell["ftddm_vs"]["zero-filled"]["ssim"]["mean_difference"]
        assert d == pytest.approx(np.mean(ftddm) - np.mean(zf))


def test_verdict_needs_a_better_mean_and_significance(bench):
    assert bench.beats({"mean_difference": 0.5, "wilcoxon_p": 0.01}, "psnr")
    assert not bench.beats({"mean_difference": 0.5, "wilcoxon_p": 0.2}, "psnr")
    assert not bench.beats({"mean_difference": -0.5, "wilcoxon_p": 0.01}, "ssim")
    assert bench.beats({"mean_difference": -0.5, "wilcoxon_p": 0.01}, "rmse_mask")  # lower RMSE is better
    assert not bench.beats({"mean_difference": 0.5, "wilcoxon_p": float("nan")}, "psnr")


def test_heldout_seeds_are_outside_every_phantom_cohort(bench):
    training = {tuple(patient_seed(s, i).generate_state(4)) for s in range(50) for i in range(200)}
    held = {tuple(bench.heldout_seed(k, i).generate_state(4)) for k in invivo.KINDS for i in range(50)}
    assert len(held) == len(invivo.KINDS) * 50
    assert not training & held


def test_evenly_spread_subset(bench):
    assert bench.spread_subset(10, None) == list(range(10))
    assert bench.spread_subset(10, 3) == [0, 4, 9] or bench.spread_subset(10, 3) == [0, 5, 9]
    assert bench.spread_subset(5, 9) == list(range(5))


@pytest.mark.parametrize("flags, message", [
    (["--kinds", "rectangular,square"], "--kinds"),
    (["--factors", "2,12"], "--factors"),
    (["--patients", "0"], "--patients"),
])
def test_bad_flags_are_named(bench, tiny_model_file, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--model", str(tiny_model_file), "--out-prefix", str(tmp_path / "x"), *flags])


def test_existing_results_are_not_overwritten(bench, tiny_model_file, tmp_path):
    (tmp_path / "x.md").write_text("mine")
    with pytest.raises(SystemExit, match="--overwrite"):
        bench.main(["--model", str(tiny_model_file), "--out-prefix", str(tmp_path / "x")])
    assert (tmp_path / "x.md").read_text() == "mine"
