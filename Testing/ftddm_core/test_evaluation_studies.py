"""The seams of the evaluation package: one object per study (its points, the factors they run at, its report
section), the method specs' Ttrunc default, and the `ftddm evaluate` flags generated from EvaluateOptions."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftddm_core.cli import build_parser
from ftddm_core.evaluation.methods import REFERENCE, method_specs, resolve_spec
from ftddm_core.evaluation.options import STUDIES, EvaluateOptions
from ftddm_core.flags import dataclass_from_args
from ftddm_core.evaluation.studies import (STUDY_TYPES, T_TRUNC_VALUES, TAU_D_VALUES, CalibrationStudy,
                                           ScaleMismatchStudy, Study, build_studies)
from ftddm_core.schedule import DiffusionSchedule


def fake_models(t_trunc=20, num_timesteps=1000):
    """Loaded-model stand-ins: what resolve_spec and the studies read (Ttrunc, last index, schedule, file name)."""
    model = SimpleNamespace(schedule=DiffusionSchedule.cosine(num_timesteps))
    lm = SimpleNamespace(t_trunc=t_trunc, last_index=num_timesteps - 1, model=model, path=Path("m.safetensors"))
    return {"main": lm}


def test_every_study_has_one_object_and_they_are_planned_in_a_fixed_order():
    assert tuple(STUDY_TYPES) == STUDIES
    opts = EvaluateOptions(scales=(4.0,), studies=("calibration", "tau_d"))
    studies = build_studies(opts, fake_models(), method_specs())
    assert list(studies) == ["tau_d", "calibration"]  # STUDIES order, whatever order was asked for
    assert all(isinstance(s, Study) and s.name == n for n, s in studies.items())


def test_study_points_follow_the_papers_sweeps():
    opts = EvaluateOptions(scales=(8.0, 4.0, 2.0))
    methods = method_specs(opts.tau_d)
    studies = build_studies(opts, fake_models(t_trunc=20), methods)
    tau = studies["tau_d"].specs()
    assert [s.tau_d for s in tau] == list(TAU_D_VALUES) and {s.t_start for s in tau} == {20}  # at the model's Ttrunc
    t_trunc = studies["t_trunc"].specs()
    assert t_trunc[0] == methods["flow_only"] and [s.t_start for s in t_trunc[1:]] == list(T_TRUNC_VALUES[1:])
    assert studies["calibration"].specs() == [methods[REFERENCE]]
    assert all(studies[n].scales(s) == opts.scales for n in ("tau_d", "t_trunc") for s in studies[n].specs())


def test_scale_mismatch_runs_each_pair_once_at_its_actual_factor():
    opts = EvaluateOptions(scales=(8.0, 4.0))
    methods = method_specs()
    study = ScaleMismatchStudy(opts, fake_models(), methods)
    pairs = {(study.scales(s)[0], s.cond_scale) for s in study.specs()}
    assert pairs == {(8.0, None), (8.0, 4.0), (4.0, 8.0), (4.0, None)}  # None: conditioned on the actual s
    same = [s for s in study.specs() if s.cond_scale is None]
    # the s' = s points are the reference method itself: same identity, hence the same cache entry
    assert all(s.identity() == methods[REFERENCE].identity() for s in same)


def test_fast_ftddm_specs_start_at_the_models_ttrunc():
    spec = method_specs()["ftddm_dpmpp_10"]
    assert spec.t_start is None
    for t_trunc in (20, 100):
        resolved, why = resolve_spec(spec, fake_models(t_trunc=t_trunc))
        assert why is None and resolved.t_start == t_trunc and resolved.start == "flow"
    resolved, why = resolve_spec(method_specs()["ftddm_anc_50"], fake_models(t_trunc=100))
    assert why is None and resolved.start == "renoised"  # below the flow's index
    assert "above the flow's index" in resolve_spec(method_specs()["ftddm_anc_100"], fake_models(t_trunc=20))[1]


def test_the_reference_method_is_what_super_resolve_runs_by_default():
    """The evaluation's reference (Wilcoxon, headline, calibration study) must be the shipped default sampler."""
    from ftddm_core.options import SuperResolveOptions

    opts = SuperResolveOptions()
    for t_trunc in (20, 100):
        spec, why = resolve_spec(method_specs(opts.tau_d)[REFERENCE], fake_models(t_trunc=t_trunc))
        kw = opts.sample_kwargs(t_trunc)
        assert why is None and (spec.sampler, spec.start, spec.t_start, spec.tau_d) == (
            kw["sampler"], kw["start"], kw["t_trunc"], kw["tau_d"])


def test_a_study_section_has_its_notes_and_figure_and_a_table_only_with_rows():
    opts = EvaluateOptions(scales=(4.0,), samples=1)
    study = CalibrationStudy(opts, fake_models(), method_specs())
    ctx = SimpleNamespace(study_resolved={REFERENCE: (study.spec, None)})
    rows, notes = study.rows(ctx)
    assert rows == [] and notes == ["skipped: per-voxel std needs --samples ≥ 2 (got 1)"]
    text = study.markdown(rows, notes, None)
    assert text[0] == "### Uncertainty calibration" and "- skipped: per-voxel std needs --samples ≥ 2 (got 1)" in text
    assert not any(line.startswith("|") for line in text) and not any("![" in line for line in text)
    row = {"scale": 4.0, "n": 10, "pearson": 0.5, "spearman": 0.4, "rmse": 0.2, "mean_std": 0.1,
           "calibration_scale": 2.5}
    text = study.markdown([row], [], "figures/calibration.png")
    # RMSE / mean std = 2, and with the stored factor c = 2.5: 0.2 / (2.5 · 0.1) = 0.8
    assert "\n| 4 | 10 | 0.5 | 0.4 | 0.2 | 0.1 | 2 | 2.5 | 0.8 |" in "\n".join(text)
    assert text[-2] == "![calibration](figures/calibration.png)"


def evaluate_parser():
    sub = next(a for a in build_parser("evaluate")._actions if a.dest == "command")
    return sub.choices["evaluate"]


def test_evaluate_flags_are_the_options_fields_with_help_and_their_defaults():
    parser = evaluate_parser()
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    for field in EvaluateOptions.__dataclass_fields__:
        assert field in flags, field
    for dest, action in flags.items():
        assert action.help and len(action.help) > 30, f"--{dest} has no real help"
    # the flags' defaults are the dataclass defaults (one place for them)
    args = parser.parse_args(["--data", "d", "--out", "o"])
    assert dataclass_from_args(EvaluateOptions, args) == EvaluateOptions()
    args = parser.parse_args(["--data", "d", "--out", "o", "--scales", "4,2", "--methods", "bicubic",
                              "--studies", "none", "--max-slices", "3", "--tau-d", "0.5", "--bf16"])
    assert dataclass_from_args(EvaluateOptions, args) == EvaluateOptions(
        scales=(4.0, 2.0), methods=("bicubic",), studies=(), max_slices=3,
        tau_d=0.5, bf16=True)
    with pytest.raises(ValueError, match="unknown method"):
        dataclass_from_args(EvaluateOptions, parser.parse_args(["--data", "d", "--out", "o", "--methods", "magic"]))
    assert "%" in parser.format_help()  # help texts with % are escaped for argparse


def test_validation_maps_are_the_recorded_validation_patients_only(tiny_model_file, tiny_dataset, tmp_path):
    import json

    from ftddm_core.checkpoint import read_safetensors, write_safetensors
    from ftddm_core.data import list_patients
    from ftddm_core.evaluation.runs import validation_maps

    with pytest.raises(ValueError, match="tiny.safetensors: its training record names no validation patients"):
        validation_maps(tiny_model_file, tiny_dataset, (4.0,), 2)
    ids = list_patients(tiny_dataset)
    tensors, meta = read_safetensors(tiny_model_file)
    meta["training"] = json.dumps({"data": {"validation": ids[:1]}})
    recorded = write_safetensors(tmp_path / "recorded.safetensors", tensors, meta)
    validation, data = validation_maps(recorded, tiny_dataset, (4.0,), 2)
    assert validation == ids[:1] and {pid for pid, _, _ in data[4.0].ids} == set(ids[:1])
