"""`ftddm evaluate`: k-space consistency, sharpness, aggregation, Wilcoxon pairing, calibration, the re-noised
start (oracle network), and the whole command end to end on a tiny phantom with tiny models (cache reuse,
skipped methods, clear errors). The metric functions themselves are checked against scikit-image in test_metrics.
"""
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, wilcoxon

from ftddm_core.evaluation import maps
from ftddm_core.evaluation.markdown import gap_diagnosis, training_line
from ftddm_core.evaluation.methods import METHOD_NAMES, REFERENCE, method_specs, resolve_spec
from ftddm_core.evaluation.options import STUDIES, EvaluateOptions, parse_names, parse_scales
from ftddm_core.evaluation.runs import execute, training_metadata
from ftddm_core.evaluation.stats import (CALIBRATION_BINS, aggregate, calibration, finite_stats, gradient_ratio,
                                         high_frequency_ratio, kspace_consistency_error, paired_wilcoxon,
                                         wilcoxon_table)
from ftddm_core.evaluation.studies import TAU_D_VALUES
from ftddm_core import kspace
from ftddm_core.cli import main
from ftddm_core.config import preset
from ftddm_core.flow import ConditionalFlow
from ftddm_core.model import FTDDM
from ftddm_core.chains import CountingDenoiser, randn_like, sample_chain
from ftddm_core.sampling import ftddm_x0_hook, sample_ftddm
from ftddm_core.schedule import DiffusionSchedule
from ftddm_core.unet import UNet


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI machine has 2 shared cores: keep this file's torch work on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- k-space consistency and sharpness ------------------------------------------------------------------
def lr_of(hr, m):
    return np.abs(kspace.downsample(hr, m))


@pytest.mark.parametrize("m,shape", [(8, (64, 64)), (9, (64, 64)), (16, (64, 64)), ((9, 14), (45, 70))])
def test_kspace_error_equals_the_image_domain_error_by_parseval(m, shape):
    rng = np.random.default_rng(np.sum(m))
    hr, out = rng.random(shape), rng.random(shape)
    lr, norm = lr_of(hr, m), 1.7
    # orthonormal FFT: the central block of K(out) equals √(n1·n2/(m1·m2))·K(downsample(out, m)), so the
    # k-space norm ratio is the image-domain ratio on the m1×m2 grid (in-vivo-like slices are not square)
    expected = np.linalg.norm(kspace.downsample(out, m) - lr / norm) / np.linalg.norm(lr / norm)
    assert kspace_consistency_error(out, lr, norm) == pytest.approx(expected, rel=1e-10)


def test_kspace_error_zero_for_the_measurement_one_for_nothing_and_blind_to_high_frequencies():
    rng = np.random.default_rng(0)
    m, norm = 15, 2.0  # odd m: the zero-filled real LR map is real (Hermitian block)
    lr = lr_of(rng.random((64, 64)), m)
    consistent = kspace.zero_fill(lr, 64).real / norm
    assert kspace_consistency_error(consistent, lr, norm) < 1e-12
    assert kspace_consistency_error(np.zeros((64, 64)), lr, norm) == pytest.approx(1.0)
    stripes = np.cos(2 * np.pi * 20 * np.arange(64) / 64)[None, :] * np.ones((64, 1))  # k = ±20 ∉ centre 15
    assert kspace_consistency_error(consistent + stripes, lr, norm) < 1e-12
    low = np.cos(2 * np.pi * 3 * np.arange(64) / 64)[None, :] * np.ones((64, 1))  # k = ±3 inside the block
    assert kspace_consistency_error(consistent + low, lr, norm) > 0.1
    with pytest.raises(ValueError, match="no larger than it"):
        kspace_consistency_error(consistent[:, :10], lr, norm)


def test_sharpness_measures():
    rng = np.random.default_rng(1)
    gt = rng.random((64, 64))
    mask = np.zeros((64, 64), bool)
    mask[8:56, 8:56] = True
    assert gradient_ratio(gt, 2 * gt, mask) == pytest.approx(2.0)
    assert high_frequency_ratio(gt, gt, 16) == pytest.approx(1.0)
    # a low-pass image has no energy outside the kept block
    assert high_frequency_ratio(gt, kspace.low_pass(gt, 15).real, 15) < 1e-20
    assert gradient_ratio(gt, kspace.low_pass(gt, 15).real, mask) < 0.8


# --- aggregation, Wilcoxon pairing, calibration -------------------------------------------------------
def test_aggregate_is_mean_and_std_of_finite_values_per_group():
    rows = [{"method": "a", "x": 1.0}, {"method": "a", "x": 3.0}, {"method": "a", "x": float("nan")},
            {"method": "b", "x": 2.0}, {"method": "b", "x": float("inf")}, {"method": "b", "x": 6.0}]
    agg = {r["method"]: r for r in aggregate(rows, ["method"], ["x"])}
    assert agg["a"]["n"] == 3 and agg["a"]["x_mean"] == 2.0 and agg["a"]["x_std"] == pytest.approx(np.std([1, 3]))
    assert agg["b"]["x_mean"] == 4.0 and agg["b"]["x_std"] == pytest.approx(2.0)
    assert finite_stats([float("nan")]) [2] == 0


def per_map_rows(method, values, order):
    return [{"method": method, "scale": 4.0, "patient": f"p{i % 3}", "slice": i // 3, "metabolite": "NAA",
             "ssim": values[i], "psnr": 10 * values[i], "nrmse": 1 - values[i], "gradient_ratio": values[i] / 2}
            for i in order]


def test_wilcoxon_pairs_maps_by_identity_not_by_position():
    rng = np.random.default_rng(3)
    ref = rng.random(12)
    other = ref - np.linspace(-0.02, 0.1, 12)  # mostly worse, increasingly so
    rows = per_map_rows(REFERENCE, ref, range(12)) + per_map_rows("x", other, rng.permutation(12))
    table = {t["metric"]: t for t in wilcoxon_table(rows)}
    assert set(table) == {"ssim", "psnr", "nrmse", "gradient_ratio"}
    expected = wilcoxon(ref, other)
    assert table["ssim"]["n"] == 12
    assert table["ssim"]["p_value"] == pytest.approx(expected.pvalue)
    assert table["ssim"]["statistic"] == pytest.approx(expected.statistic)
    assert table["ssim"]["median_difference"] == pytest.approx(np.median(ref - other))
    shuffled = np.array([r["ssim"] for r in rows[12:]])
    assert wilcoxon(ref, shuffled).pvalue != pytest.approx(expected.pvalue)  # positional pairing would differ


def test_wilcoxon_edge_cases():
    same = paired_wilcoxon({("a", 0, "m"): 1.0, ("b", 0, "m"): 2.0}, {("a", 0, "m"): 1.0, ("b", 0, "m"): 2.0})
    assert same["p_value"] == 1.0 and same["n"] == 2
    partial = paired_wilcoxon({("a", 0, "m"): 1.0, ("b", 0, "m"): np.inf}, {("a", 0, "m"): 0.5})
    assert partial["n"] == 1
    assert paired_wilcoxon({}, {})["n"] == 0


def test_calibration_of_a_calibrated_std():
    rng = np.random.default_rng(4)
    std = rng.uniform(0.1, 1.0, 40_000)
    err = np.abs(rng.normal(0.0, std))  # |N(0, σ)|: RMSE in a bin = its σ
    cal = calibration(err, std)
    assert cal["pearson"] == pytest.approx(pearsonr(std, err)[0])
    assert cal["pearson"] > 0.3 and len(cal["bins"]) == CALIBRATION_BINS
    assert sum(b["count"] for b in cal["bins"]) == std.size
    for b in cal["bins"]:
        assert b["rmse"] == pytest.approx(b["std_mean"], rel=0.06)
    flat = calibration(err, np.zeros_like(err))
    assert np.isnan(flat["pearson"]) and len(flat["bins"]) == 1


def test_parsing_and_scale_checks():
    assert parse_scales("8,4,2") == (8.0, 4.0, 2.0)
    assert maps.lr_size_for(6.4) == 10
    with pytest.raises(ValueError, match="whole number"):
        maps.lr_size_for(3)
    with pytest.raises(ValueError, match="positive numbers"):
        parse_scales("8,-4")
    assert parse_names("none", STUDIES, "studies") == ()
    assert parse_names("all", STUDIES, "studies") == STUDIES
    with pytest.raises(ValueError, match="unknown method"):
        parse_names("ddpm_full,magic", METHOD_NAMES, "method(s)")


# --- the re-noised flow start with an oracle network --------------------------------------------------
def oracle_bundle(target, t_trunc=100):
    """A v2 model whose flow mode is √ᾱ_Ttrunc·target and whose ε-UNet predicts the exact ε for that target.

    Its SR encoder returns a deliberately poor x̂0_enc = target / 2, so a start taken from the encoder instead of
    the flow, or an ε-UNet not given x̂0_enc, fails these tests.
    """
    schedule = DiffusionSchedule.cosine(1000)
    config = preset("tiny")
    config.diffusion.t_trunc = t_trunc
    a = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)
    shift = float(a[t_trunc].sqrt())

    def encode(cond, scale, valid=None):
        return 0.5 * target[: len(cond)], []

    def flow_sample(cond, x0_enc, features, tau, generator=None, valid=None):
        return shift * target[: len(cond)]

    def denoiser(cond, x0_enc, scale, valid=None):
        torch.testing.assert_close(x0_enc, 0.5 * target[: len(cond)])

        def eps(x, t):
            ab = a[t].reshape(-1, 1, 1, 1)
            return (x - ab.sqrt() * target[: len(x)]) / (1 - ab).sqrt()

        return eps

    return SimpleNamespace(encode=encode, flow_sample=flow_sample, denoiser=denoiser, flow_shift_factor=shift,
                           schedule=schedule, config=config, unet_sees_estimate=True)


def oracle_inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(batch, 4, size, size, generator=g)
    cond[:, 1] = (cond[:, 1] > 0.3).float()
    target = torch.rand(batch, 1, size, size, generator=g) * 1.5 * cond[:, 1:2]
    return cond, target


@pytest.mark.parametrize("sampler,steps,nfe", [("ancestral", 1, 51), ("dpmpp", 10, 11)])
def test_renoised_start_with_an_oracle_returns_the_target(sampler, steps, nfe):
    cond, target = oracle_inputs()
    model = oracle_bundle(target)
    res = sample_ftddm(model, cond, 4.0, start="renoised", t_trunc=50, sampler=sampler, steps=steps, n_samples=2,
                       generator=torch.Generator().manual_seed(1))
    assert res.nfe == nfe
    torch.testing.assert_close(res.mean, target, atol=1e-4, rtol=1e-4)
    assert float(res.std.max()) < 1e-4


def test_renoised_start_is_the_forward_process_from_the_flow_estimate():
    cond, target = oracle_inputs(batch=1, size=64, seed=2)
    model = oracle_bundle(target)
    seen = []  # the chain's inputs x_t, the first is its start
    network = model.denoiser

    def recording(*args, **kwargs):
        eps = network(*args, **kwargs)
        return lambda x, t: (seen.append(x.clone()), eps(x, t))[1]

    model.denoiser = recording
    sample_ftddm(model, cond, 4.0, start="renoised", t_trunc=50, sampler="dpmpp", steps=5,
                 generator=torch.Generator().manual_seed(3))
    ab = float(model.schedule.alphas_cumprod[50])
    x0_flow = target  # flow mode / √ᾱ_100 = target (already in the clip range and masked)
    eps = (seen[0] - ab ** 0.5 * x0_flow) / (1 - ab) ** 0.5
    inside = cond[:, 1:2] > 0
    assert float(eps[~inside].abs().max()) == 0.0  # ε ⊙ M
    assert abs(float(eps[inside].mean())) < 0.06 and abs(float(eps[inside].std()) - 1) < 0.06
    with pytest.raises(ValueError, match="re-noised start"):
        sample_ftddm(model, cond, 4.0, start="renoised", t_trunc=150)


@pytest.mark.parametrize("sampler,steps,max_batch", [("ancestral", 1, 1), ("dpmpp", 4, 3)])
def test_renoised_start_is_the_reverse_chain_from_the_forward_noised_flow_mode(sampler, steps, max_batch):
    """The one sampler loop with start="renoised" equals, chain by chain, q_sample(x̂0_flow, t', ε⊙M) followed by
    the reverse chain, with ε and the chain's noise from the chain's own seed (a tiny model, not an oracle)."""
    model = micro_model(t_trunc=20).eval()
    g = torch.Generator().manual_seed(4)
    cond = torch.rand(3, 4, 16, 16, generator=g)
    cond[:, 1] = (cond[:, 1] > 0.3).float()
    scale = torch.full((3,), 4.0)
    res = sample_ftddm(model, cond, scale, start="renoised", t_trunc=7, sampler=sampler, steps=steps, tau_d=0.9,
                       generator=torch.Generator().manual_seed(5), max_batch=max_batch)
    seeds = torch.randint(0, 2**62, (1, 3), generator=torch.Generator().manual_seed(5))
    clip = model.config.x0_clip
    for b in range(3):
        c, m, s = cond[b:b + 1], cond[b:b + 1, 1:2], scale[b:b + 1]
        x0_enc, features = model.encode(c, s)
        x0_flow = (model.flow_sample(c, x0_enc, features, 0.0) / model.flow_shift_factor).clamp(*clip) * m
        chain = [torch.Generator().manual_seed(int(seeds[0, b]))]
        x = model.schedule.q_sample(x0_flow, torch.tensor([7]), randn_like(m, chain) * m)
        denoiser = CountingDenoiser(model.denoiser(c, x0_enc, s), model.schedule, mask=m,
                                    x0_hook=ftddm_x0_hook(clip, m))
        x0 = sample_chain(denoiser, x, model.schedule, sampler=sampler, t_start=7, steps=steps, tau_d=0.9, mask=m,
                          generator=chain).clamp(*clip) * m
        torch.testing.assert_close(res.mean[b:b + 1], x0, atol=1e-6, rtol=1e-5)


# --- the command end to end ----------------------------------------------------------------------------
def micro_model(kind="ftddm", num_timesteps=1000, t_trunc=20, seed=0):
    """FTDDM(preset('tiny')) made smaller and faster for CI: 4 channels, no attention; small random weights."""
    config = preset("tiny")
    config.kind = kind
    config.unet.channels, config.unet.attention_resolutions, config.unet.norm_groups = (4, 4, 4, 4), (), 4
    config.diffusion.num_timesteps, config.diffusion.t_trunc = num_timesteps, t_trunc
    torch.manual_seed(seed)
    model = FTDDM(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return {"main": micro_model().save(root / "ftddm.safetensors"),
            # full-chain model: small T keeps the 'DDPM full chain' cheap in CI
            "ddpm": micro_model(num_timesteps=101, t_trunc=100, seed=5).save(root / "ddpm.safetensors"),
            "regression": micro_model(kind="regression", seed=7).save(root / "regression.safetensors")}


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class CallCounter:
    """Counts UNet and flow network calls (wrapping, not replacing, the real forward passes)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for cls, name in ((UNet, "forward"), (ConditionalFlow, "inverse")):
            original = getattr(cls, name)

            def wrapped(module, *args, _original=original, **kwargs):
                self.calls += 1
                return _original(module, *args, **kwargs)

            monkeypatch.setattr(cls, name, wrapped)


def test_evaluate_end_to_end_and_cache_reuse(tiny_dataset, models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    base = ["evaluate", "--data", str(tiny_dataset), "--model", str(models["main"]), "--out", str(out),
            "--max-slices", "2", "--samples", "2", "--device", "cpu"]
    argv = base + ["--ddpm-model", str(models["ddpm"]), "--regression-model", str(models["regression"]),
                   "--scales", "8,4", "--progress-lines"]
    counter = CallCounter(monkeypatch)
    assert main(argv) == 0
    first_calls = counter.calls
    assert first_calls > 0
    err = capsys.readouterr().err
    assert "PROGRESS" in err and "metrics and report" in err

    report = (out / "report.md").read_text()
    for section in ("## Data and models", "## Headline: fast FTDDM vs full-chain DDPM", "## Methods",
                    "## Wilcoxon signed-rank tests", "### τ_d sweep", "### Conditioned vs actual upscaling factor",
                    "### Truncation index", "### Uncertainty calibration", "## Qualitative panels",
                    "## Notes: what is approximate"):
        assert section in report, section
    assert "**Answer: no.**" in report or "**Answer: yes.**" in report
    assert "re-noised flow start" in report and "LPIPS skipped" in report
    assert "tiles around the mask centre" not in report  # legacy 64×64 maps are whole slices
    assert "`ftddm_anc_100`: starts at index 100, above the flow's index Ttrunc = 20" in report

    methods = read_csv(out / "methods.csv")
    names = {r["method"] for r in methods}
    # the 101-step DDPM model's DPM-Solver++ noise chains start at its λ ≥ −5.1 clip, index 99: K = 100 won't fit
    assert "`dpmpp_noise_100`: 100 solver steps do not fit a chain starting at index 99" in report
    assert names == set(METHOD_NAMES) - {"ftddm_anc_100", "ftddm_anc_50", "ftddm_dpmpp_50", "dpmpp_noise_100",
                                         "dpmpp_sde_noise_100"}
    assert len(methods) == 2 * len(names)
    by = {(r["method"], float(r["scale"])): r for r in methods}
    assert by[(REFERENCE, 8.0)]["nfe"] == "11" and by[("ddpm_full", 8.0)]["nfe"] == "101"
    assert by[("flow_only", 4.0)]["nfe"] == "0" and by[("flow_only", 4.0)]["flow_passes"] == "1"
    assert by[("regression", 4.0)]["nfe"] == "1" and by[("zero_filled", 4.0)]["parameters"] == "0"
    per_map = read_csv(out / "per_map.csv")
    assert len(per_map) == 2 * len(methods)
    # the zero-filled row is recomputable from the data alone: check one map against scikit-image's SSIM
    from skimage.metrics import structural_similarity

    data = maps.load_test_maps(tiny_dataset, maps.test_split(tiny_dataset, 0, 0)[1], (4.0,), 2)[4.0]
    zf = np.abs(kspace.zero_fill(data.lr[0], 64)) / data.norm[0] * data.mask[0]
    row = next(r for r in per_map if r["method"] == "zero_filled" and float(r["scale"]) == 4.0)
    assert float(row["ssim"]) == pytest.approx(structural_similarity(data.gt[0], zf, data_range=float(
        data.gt[0].max() - data.gt[0].min())), rel=1e-4)
    assert {r["method"] for r in read_csv(out / "wilcoxon.csv")} == names - {REFERENCE}
    tau = read_csv(out / "study_tau_d.csv")
    assert sorted({float(r["tau_d"]) for r in tau}) == list(TAU_D_VALUES)
    assert len(read_csv(out / "study_scale_mismatch.csv")) == 4
    assert {r["t_trunc"] for r in read_csv(out / "study_t_trunc.csv")} == {"0", "10", "20"}
    assert read_csv(out / "study_calibration_bins.csv")
    for png in ("quality_vs_nfe", "tau_d", "scale_mismatch", "t_trunc", "calibration", "panels_s8", "panels_s4"):
        assert (out / "figures" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    summary = json.loads((out / "summary.json").read_text())
    assert summary["jobs_from_cache"] == 0 and summary["headline"]["answer"] in ("yes", "no")

    # a second run loads every output from the cache: no network call at all, identical metrics
    n_cache = len(list((out / "cache").glob("*.npz")))
    counter.calls = 0
    assert main(argv) == 0
    assert counter.calls == 0
    summary2 = json.loads((out / "summary.json").read_text())
    assert summary2["jobs_from_cache"] == summary2["jobs"] == summary["jobs"] == n_cache
    assert summary2["compute_seconds"] == summary["compute_seconds"] > 0  # the original runs' time is kept
    assert read_csv(out / "per_map.csv") == per_map
    # … while anything that changes the outputs (here the seed) is recomputed
    assert main(base + ["--scales", "4", "--methods", "ftddm_dpmpp_10", "--studies", "none", "--seed", "1"]) == 0
    assert counter.calls > 0


def test_truncated_model_is_never_run_from_noise(tiny_dataset, models, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["evaluate", "--data", str(tiny_dataset), "--model", str(models["main"]), "--out", str(out),
               "--ddpm-model", str(models["main"]), "--scales", "4", "--max-slices", "1", "--samples", "1",
               "--methods", "zero_filled,regression,ddpm_full,ftddm_dpmpp_10", "--studies", "calibration",
               "--device", "cpu"])
    assert rc == 0
    assert "not evaluated" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "UNet was trained on t ∈ [0, 20] only" in report
    # FTDDM v2: without --regression-model the one-pass regression is the FTDDM model's own SR encoder
    assert "no --regression-model given" not in report
    assert "--regression-model not given: the one-pass regression is the FTDDM model's SR encoder" in report
    assert "**Not answered**" in report
    assert "needs --samples ≥ 2" in report
    methods = {r["method"]: r for r in read_csv(out / "methods.csv")}
    assert set(methods) == {"zero_filled", "regression", "ftddm_dpmpp_10"}
    encoder = FTDDM.load(models["main"]).encoder
    assert int(methods["regression"]["parameters"]) == sum(p.numel() for p in encoder.parameters())
    assert methods["regression"]["nfe"] == "1"


# --- in-vivo-like data: any n1×n2 grid, evaluated on the training tiles ------------------------------------
def test_invivo_maps_are_the_training_tiles_and_baselines_come_from_the_full_slice(invivo_dataset):
    from ftddm_core.data import load_patient

    ids = ["sub-001", "sub-002", "sub-003"]
    d = maps.load_test_maps(invivo_dataset, ids, (4.0,), 9)[4.0]
    assert d.tiled and d.gt.shape[1:] == d.mask.shape[1:] == d.cond.shape[2:] == (64, 64)
    patients = {pid: load_patient(invivo_dataset / pid) for pid in {i[0] for i in d.ids}}
    seen = set()
    for i, (pid, z, met) in enumerate(d.ids):
        p = patients[pid]
        n, mask = p.shape[:2], (p.quality_mask & p.brain_mask)[:, :, z]
        hr = p.maps[met][:, :, z].astype(np.float64)
        m = tuple(max(int(np.floor(v / 4 + 0.5)), 4) for v in n)  # m_a = round(n_a / s), half up
        assert d.slice_shapes[i] == n and d.lr_shapes[i] == m
        np.testing.assert_allclose(d.lr[i], np.abs(kspace.downsample(hr, m)))
        # the tile is centred on the mask's bounding box (an axis shorter than 64 is centred whole, zero-padded)
        rows, cols = np.nonzero(mask)
        for axis, (lo, hi) in enumerate(((rows.min(), rows.max()), (cols.min(), cols.max()))):
            o = d.tile_origins[i][axis]
            if n[axis] <= 64:
                assert o == -((64 - n[axis]) // 2)
                seen.add("padded")
            else:
                assert o == min(max((lo + hi + 1) // 2 - 32, 0), n[axis] - 64)
                seen.add("cropped")
        o1, o2 = d.tile_origins[i]  # the slice pixels the tile covers, by explicit index arithmetic
        uu, vv = np.meshgrid(np.arange(64) + o1, np.arange(64) + o2, indexing="ij")
        window = (uu >= 0) & (uu < n[0]) & (vv >= 0) & (vv < n[1])
        gt_tile, mask_tile = np.zeros((64, 64)), np.zeros((64, 64), bool)
        gt_tile[window] = (hr * mask / d.norm[i])[uu[window], vv[window]]
        mask_tile[window] = mask[uu[window], vv[window]]
        np.testing.assert_allclose(d.gt[i], gt_tile, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(d.mask[i], mask_tile)
        assert d.mask_in_tile[i] == (mask_tile.sum() == mask.sum())
        if d.mask_in_tile[i]:  # the ground truth's k-space error is the full slice's
            assert d.kspace_error(i, d.gt[i]) == pytest.approx(
                kspace_consistency_error(hr * mask / d.norm[i], d.lr[i], d.norm[i]), rel=1e-5)
    assert seen == {"padded", "cropped"}
    assert d.cond_scale == pytest.approx([np.sqrt(np.prod(n) / np.prod(m))
                                          for n, m in zip(d.slice_shapes, d.lr_shapes)])
    # zero-filling from the full slice's LR, cut at the tile: exactly the model's LR channel inside M
    opts = EvaluateOptions(scales=(4.0,), methods=("zero_filled",), studies=())
    zf = execute(method_specs()["zero_filled"], d, {}, opts, torch.device("cpu"))["mean"]
    np.testing.assert_allclose(zf, d.cond[:, 0].numpy() * d.mask, rtol=1e-5, atol=1e-6)
    bic = execute(method_specs()["bicubic"], d, {}, opts, torch.device("cpu"))["mean"]
    assert np.all(bic[~d.mask] == 0) and np.corrcoef(bic[d.mask], zf[d.mask])[0, 1] > 0.8


def test_bicubic_on_a_rectangular_grid_reproduces_a_linear_ramp():
    """A cubic spline reproduces linear functions: a ramp sampled on the LR grid comes back on the HR grid."""
    from ftddm_core import baselines
    from ftddm_core.volume import hr_origin_index

    (m1, m2), (n1, n2) = (24, 31), (96, 117)
    ramp = lambda i, j: 0.3 * i - 0.2 * j  # noqa: E731
    lr = ramp(*np.meshgrid(np.arange(m1), np.arange(m2), indexing="ij"))
    # HR voxel centres in LR index units (sample-aligned grid), away from the borders, whose clamping
    # ("nearest") reaches a few samples into the spline
    c1, c2 = (hr_origin_index(m, n) + np.arange(n) * m / n for m, n in ((m1, n1), (m2, n2)))
    out = baselines.bicubic(lr, (n1, n2))
    inner = np.ix_((c1 >= 8) & (c1 <= m1 - 9), (c2 >= 8) & (c2 <= m2 - 9))
    np.testing.assert_allclose(out[inner], ramp(*np.meshgrid(c1, c2, indexing="ij"))[inner], atol=1e-4)
    np.testing.assert_array_equal(baselines.bicubic(lr[:9, :9], 27), baselines.bicubic(lr[:9, :9], (27, 27)))


def test_evaluate_runs_on_an_invivo_like_dataset(invivo_dataset, models, tmp_path):
    from skimage.metrics import structural_similarity

    out = tmp_path / "report"
    assert main(["evaluate", "--data", str(invivo_dataset), "--model", str(models["main"]), "--out", str(out),
                 "--scales", "4", "--max-slices", "2", "--samples", "1", "--studies", "none", "--device", "cpu",
                 "--methods", "zero_filled,bicubic,regression,flow_only,ftddm_dpmpp_10"]) == 0
    report = (out / "report.md").read_text()
    assert "maps are 64×64 tiles around the mask centre" in report and "64×64 tiles, 2 maps)" in report
    per_map = read_csv(out / "per_map.csv")
    assert {r["method"] for r in per_map} == {"zero_filled", "bicubic", "regression", "flow_only", "ftddm_dpmpp_10"}
    assert all(np.isfinite(float(r["ssim"])) for r in per_map)
    ids = maps.test_split(invivo_dataset, 0, 0)[1]
    d = maps.load_test_maps(invivo_dataset, ids, (4.0,), 2)[4.0]
    zf = d.cond[:, 0].numpy() * d.mask  # the model's own LR channel: the zero-filled baseline sees these pixels
    for i, row in enumerate(r for r in per_map if r["method"] == "zero_filled"):
        assert (row["patient"], int(row["slice"]), row["metabolite"]) == d.ids[i]
        rng = float(d.gt[i].max() - d.gt[i].min())
        assert float(row["ssim"]) == pytest.approx(structural_similarity(d.gt[i], zf[i], data_range=rng), rel=1e-4)


def test_gap_diagnosis_subtracts_the_probe_methods_only_at_failing_scales():
    ssim = {(REFERENCE, 8.0): 0.90, ("ftddm_anc_20", 8.0): 0.91, ("ftddm_anc_100", 8.0): 0.93,
            ("flow_only", 8.0): 0.80, ("zero_filled", 8.0): 0.75}
    ctx = SimpleNamespace(methods=[REFERENCE, "ftddm_anc_20", "ftddm_anc_100", "flow_only", "zero_filled"],
                          job_of={k: k for k in ssim}, metric_rows=lambda name, s: [{"ssim": ssim[(name, s)]}])
    headline = {"per_scale": [{"scale": 8.0, "ssim_difference": -0.05, "within_margin": False},
                              {"scale": 4.0, "ssim_difference": 0.0, "within_margin": True}]}
    table = gap_diagnosis(ctx, headline)[-1]
    assert table.splitlines()[-1] == "| 8 | -0.0500 | +0.0100 | +0.0300 | +0.0500 |"
    assert gap_diagnosis(ctx, {"per_scale": headline["per_scale"][1:]}) == []


def test_training_record_is_read_from_a_training_run_and_from_a_packaged_model_card(tmp_path):
    """The report's 'same training' check needs the split and iterations of both kinds of model file."""
    data = {"dataset": "runs/phantom25", "fold": 0, "split_seed": 0}
    run_file = micro_model().save(tmp_path / "run.safetensors", extra={"training": {"step": 6000, "data": data}})
    card = {"name": "x", "training": {"iterations": 6000, "data": data}}
    packaged = micro_model().save(tmp_path / "packaged.safetensors", extra={"model_card": card})
    bare = micro_model().save(tmp_path / "bare.safetensors")
    lines = [training_line(SimpleNamespace(training=training_metadata(p)))
             for p in (run_file, packaged, bare)]
    assert lines[0] == lines[1] == "trained on phantom25, fold 0, split seed 0, 6000 iterations"
    assert lines[2] == "no training data recorded in the file"


@pytest.mark.parametrize("change,message", [
    ({"--data": "missing"}, "not a folder"),
    ({"--model": "missing.safetensors"}, "model file not found"),
    ({"--model": "REGRESSION"}, "expected kind 'ftddm'"),
    ({"--scales": "3"}, "whole number"),
    ({"--methods": "ddpm_full,magic"}, "unknown method"),
])
def test_clear_errors(tiny_dataset, models, tmp_path, capsys, change, message):
    args = {"--data": str(tiny_dataset), "--model": str(models["main"]), "--out": str(tmp_path / "r"),
            "--scales": "4", "--methods": "zero_filled", "--studies": "none", "--device": "cpu"}
    for k, v in change.items():
        args[k] = str(models["regression"]) if v == "REGRESSION" else (
            str(tmp_path / v) if k in ("--data", "--model") else v)
    assert main(["evaluate", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftddm evaluate: error:") and message in err
