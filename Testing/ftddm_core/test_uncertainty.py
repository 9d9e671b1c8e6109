"""σ-scaling of the uncertainty map: the fitted factor, its storage in the model file, its use in the pipeline."""
import json

import numpy as np
import pytest

from ftddm_core.checkpoint import read_safetensors, write_safetensors
from ftddm_core.model import FTDDM
from ftddm_core.pipeline import super_resolve
from ftddm_core.uncertainty import UncertaintyCalibration, describe, fit_std_scale

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
    plain = super_resolve(lr, t1, flair, model=plain_model, samples=2)
    scaled = super_resolve(lr, t1, flair, model=calibrated_model, samples=2)
    np.testing.assert_array_equal(plain.sr.data, scaled.sr.data)
    assert np.abs(plain.uncertainty.data).max() > 0
    np.testing.assert_allclose(scaled.uncertainty.data, 2.5 * plain.uncertainty.data, rtol=1e-6)
    assert scaled.uncertainty_calibration["scale"] == 2.5 and not plain.uncertainty_calibration["calibrated"]

