"""σ-scaling of the uncertainty map: the fitted factor, its storage in the model file, its use in the pipeline."""
import json

import numpy as np
import pytest

from ftddm_core.checkpoint import read_safetensors, write_safetensors
from ftddm_core.model import FTDDM
from ftddm_core.pipeline import super_resolve
from ftddm_core.uncertainty import UncertaintyCalibration, c4, describe, fit_std_scale

from test_pipeline import IdentityModel, oblique_case

CAL = UncertaintyCalibration(scale=2.5, sampler="dpmpp", steps=10, tau_f=0.7, tau_d=0.9, samples=8,
                             fitted_on="test maps of nobody", per_factor={"4": 2.5})


def test_fit_recovers_the_factor_of_a_too_narrow_gaussian_spread():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 2.0, 200_000)
    errors = rng.normal(0.0, sigma)
    # with the true σ the mean |σ| is E[σ] while RMSE = √E[σ²]: c = √E[σ²] / E[σ] for the right spread …
    right = np.sqrt(np.mean(sigma ** 2)) / np.mean(sigma)
    assert fit_std_scale(errors, sigma) == pytest.approx(right, rel=0.01)
    # … and a spread 3× too narrow needs 3× that factor
    assert fit_std_scale(errors, sigma / 3) == pytest.approx(3 * right, rel=0.01)


def test_fit_refuses_no_spread_and_mismatched_inputs():
    with pytest.raises(ValueError, match="no spread"):
        fit_std_scale(np.ones(5), np.zeros(5))
    with pytest.raises(ValueError, match="equally many"):
        fit_std_scale(np.ones(5), np.ones(4))


def test_calibration_rejects_a_non_positive_scale():
    with pytest.raises(ValueError, match="> 0"):
        UncertaintyCalibration(**{**CAL.__dict__, "scale": 0.0})


def test_matches_only_the_fitted_sampler_settings():
    assert CAL.matches(sampler="dpmpp", steps=10, tau_f=0.7, tau_d=0.3)  # τ_d does not enter the ODE solver
    assert not CAL.matches(sampler="dpmpp", steps=5, tau_f=0.7, tau_d=0.9)
    assert not CAL.matches(sampler="dpmpp", steps=10, tau_f=1.0, tau_d=0.9)
    assert "approximation" in describe(CAL, sampler="ancestral", steps=10, tau_f=0.7, tau_d=0.9)["note"]
    assert describe(None, sampler="dpmpp", steps=10, tau_f=0.7, tau_d=0.9)["scale"] == 1.0


def test_a_renoised_fit_matches_its_start_index_and_ignores_the_flow_temperature():
    renoised = UncertaintyCalibration(**{**CAL.__dict__, "sampler": "ancestral", "start": "renoised", "t_trunc": 10})
    settings = dict(sampler="ancestral", steps=3, tau_f=1.5, tau_d=0.9, start="renoised", t_trunc=10)
    assert renoised.matches(**settings)  # steps: ancestral visits every index; τ_f: the chain starts at the mode
    assert not renoised.matches(**{**settings, "t_trunc": 20})
    assert not renoised.matches(**{**settings, "tau_d": 0.5})  # the ancestral chain injects τ_d-scaled noise
    assert not renoised.matches(**{**settings, "start": "flow"})
    assert not CAL.matches(sampler="dpmpp", steps=10, tau_f=0.7, tau_d=0.9, start="renoised", t_trunc=10)
    note = describe(renoised, **{**settings, "t_trunc": 20})["note"]
    assert "re-noised start at t = 10" in note and "approximation" in note
    # a calibration stored before the start was recorded is one of the flow start
    stored = {k: v for k, v in CAL.__dict__.items() if k not in ("start", "t_trunc")}
    assert UncertaintyCalibration.from_metadata({"uncertainty_calibration": json.dumps(stored)}, "m").start == "flow"


def test_calibration_round_trips_through_the_model_file_and_bad_metadata_is_named(tmp_path):
    model = FTDDM("tiny")
    assert model.uncertainty_calibration is None
    model.uncertainty_calibration = CAL
    path = model.save(tmp_path / "m.safetensors")
    assert FTDDM.load(path).uncertainty_calibration == CAL
    tensors, meta = read_safetensors(path)
    meta["uncertainty_calibration"] = json.dumps({"scale": -1})
    write_safetensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="bad.safetensors.*uncertainty_calibration"):
        FTDDM.load(tmp_path / "bad.safetensors")


def test_pipeline_scales_the_uncertainty_map_and_nothing_else():
    lr, t1, flair = oblique_case()
    plain_model, calibrated_model = IdentityModel(), IdentityModel()
    calibrated_model.uncertainty_calibration = CAL
    plain = super_resolve(lr, t1, flair, model=plain_model, samples=8)  # as many samples as CAL's fit
    scaled = super_resolve(lr, t1, flair, model=calibrated_model, samples=8)
    np.testing.assert_array_equal(plain.sr.data, scaled.sr.data)
    assert np.abs(plain.uncertainty.data).max() > 0
    np.testing.assert_allclose(scaled.uncertainty.data, 2.5 * plain.uncertainty.data, rtol=1e-6)
    assert scaled.uncertainty_calibration["scale"] == 2.5 and not plain.uncertainty_calibration["calibrated"]
    fewer = super_resolve(lr, t1, flair, model=calibrated_model, samples=2)
    assert fewer.uncertainty_calibration["scale"] == pytest.approx(2.5 * c4(8) / c4(2))


def test_the_factor_is_interpolated_in_log_s_between_the_per_factor_fits():
    cal = UncertaintyCalibration(**{**CAL.__dict__, "per_factor": {"8": 4.0, "2": 2.0}})
    assert cal.scale_for(2.0) == pytest.approx(2.0) and cal.scale_for(8.0) == pytest.approx(4.0)
    assert cal.scale_for(4.0) == pytest.approx(3.0)  # log 4 is halfway between log 2 and log 8
    assert cal.scale_for(16.0) == pytest.approx(4.0) and cal.scale_for(1.5) == pytest.approx(2.0)  # held beyond
    assert cal.scale_for(None) == CAL.scale and CAL.scale_for(4.0) == CAL.scale  # one fitted factor: pooled c
    record = describe(cal, 4.0, sampler="dpmpp", steps=10, tau_f=0.7, tau_d=0.9)
    assert record["scale"] == pytest.approx(3.0) and "at s = 4" in record["note"]


def test_c4_is_the_mean_of_the_sample_std_of_gaussian_draws_and_fewer_draws_raise_c():
    from scipy.stats import chi

    for n in (2, 3, 8, 30):  # s·√(n−1)/σ is χ with n − 1 degrees of freedom
        assert c4(n) == pytest.approx(chi.mean(n - 1) / np.sqrt(n - 1), rel=1e-12)
    draws = np.random.default_rng(1).normal(size=(200_000, 3))
    assert draws.std(axis=1, ddof=1).mean() == pytest.approx(c4(3), rel=0.01)
    with pytest.raises(ValueError, match="n ≥ 2"):
        c4(1)
    # CAL was fitted with 8 samples: with 3, the same σ reads c4(3)/c4(8) lower, so c grows by the inverse
    assert CAL.scale_for(None, 3) == pytest.approx(CAL.scale * c4(8) / c4(3))
    assert CAL.scale_for(None, 8) == CAL.scale and CAL.scale_for(None, 1) == CAL.scale  # 1 sample: std is 0 anyway
    assert "c4(8) / c4(3)" in describe(CAL, 4.0, 3, sampler="dpmpp", steps=10, tau_f=0.7, tau_d=0.9)["note"]
