"""Parameters ↔ the real `ftddm super-resolve` parser (ftddm_core.cli), validation and the command line."""
import dataclasses

import pytest

from ftddm_core.options import SAMPLERS
from MRSISuperResolutionLib.options import SuperResolveOptions, engine_bootstrap, super_resolve_command


def parse_with_engine(argv):
    cli = pytest.importorskip("ftddm_core.cli")
    return cli.build_parser().parse_args(argv)


def test_the_module_uses_the_engines_one_options_class():
    from ftddm_core import options, pipeline

    assert SuperResolveOptions is options.SuperResolveOptions is pipeline.SuperResolveOptions


def test_every_value_reaches_the_engine_parser():
    params = SuperResolveOptions(tau_d=0.35, tau_f=1.2, sampler="ancestral", steps=7, samples=3,
                                    data_consistency=0.25, seed=42, device="cpu", scale=5.3, slice_axis=1,
                                    max_batch=16, bf16=True, force=False)
    cmd = super_resolve_command(["python"], "/engine", ["a.nii", "b.nii"], "t1.nii", "fl.nii", "/out",
                                mask="m.nii", model="w.safetensors", parameters=params)
    argv = cmd[cmd.index("super-resolve"):]
    args = parse_with_engine(argv)
    for f in dataclasses.fields(params):
        assert getattr(args, f.name) == getattr(params, f.name), f.name
    assert [str(p) for p in args.lr] == ["a.nii", "b.nii"]
    assert (str(args.t1), str(args.flair), str(args.mask), str(args.model)) == ("t1.nii", "fl.nii", "m.nii",
                                                                                "w.safetensors")
    assert args.progress_lines and args.overwrite


def test_factor_reaches_the_engine_parser_set_or_automatic():
    for factor in (0.0, 2.5):
        cmd = super_resolve_command(["py"], "/e", ["a.nii"], "t", "f", "o",
                                    parameters=SuperResolveOptions(factor=factor))
        assert parse_with_engine(cmd[cmd.index("super-resolve"):]).factor == factor
        assert ("--factor" in cmd) == bool(factor)  # automatic: left to the flag's default, which is automatic
    for ok in (0.0, 2.0, 8.0):
        SuperResolveOptions(factor=ok).validate()


def test_default_model_and_no_mask_leave_flags_out():
    cmd = super_resolve_command(["py"], "/e", ["a.nii"], "t", "f", "o", model="")
    assert "--model" not in cmd and "--mask" not in cmd
    args = parse_with_engine(cmd[cmd.index("super-resolve"):])
    assert args.model is None and args.mask is None


def test_bootstrap_imports_the_engine_from_the_given_folder(tmp_path):
    pkg = tmp_path / "ftddm_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("import sys\ndef main():\n    print('ARGS', sys.argv[1:])\n    return 3\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", engine_bootstrap(tmp_path), "super-resolve", "--x"],
                          capture_output=True, text=True, cwd=tmp_path.parent)
    assert done.returncode == 3
    assert "ARGS ['super-resolve', '--x']" in done.stdout


@pytest.mark.parametrize("change, message", [
    ({"tau_d": -0.1}, "tau_d"), ({"tau_f": 3.0}, "tau_f"), ({"steps": 0}, "steps"), ({"steps": 2.5}, "integer"),
    ({"samples": 0}, "samples"), ({"data_consistency": 1.5}, "data_consistency"), ({"sampler": "euler"}, "sampler"),
    ({"device": "tpu"}, "device"), ({"scale": 12.0}, "scale"), ({"slice_axis": 3}, "slice_axis"),
    ({"tau_d": float("nan")}, "tau_d"), ({"steps": True}, "steps"), ({"factor": 1.5}, "factor"),
    ({"factor": 8.5}, "factor"), ({"factor": -2.0}, "factor")])
def test_validation_names_the_bad_parameter(change, message):
    with pytest.raises(ValueError, match=message):
        SuperResolveOptions(**change)
    params = SuperResolveOptions()
    for name, value in change.items():
        setattr(params, name, value)  # changed after construction: validate() and the command line refuse it
    with pytest.raises(ValueError, match=message):
        params.cli_arguments()


def test_force_allows_scales_outside_the_trained_range_and_from_dict_refuses_typos():
    assert SuperResolveOptions(scale=12.0, force=True).validate().scale == 12.0
    assert SuperResolveOptions(device="cuda:1").validate().device == "cuda:1"
    with pytest.raises(ValueError, match="unknown"):
        SuperResolveOptions.from_dict({"tauD": 0.5})
    assert SuperResolveOptions.from_dict({"tau_d": 0.5}).tau_d == 0.5


def test_tau_d_has_an_effect_on_the_noisy_samplers_only():
    assert [s for s in SAMPLERS if SuperResolveOptions(sampler=s).tau_d_has_effect()] == ["ancestral", "respaced",
                                                                                          "dpmpp-sde"]


def test_command_requires_inputs():
    with pytest.raises(ValueError, match="T1 and FLAIR"):
        super_resolve_command(["py"], "/e", ["a"], None, "f", "o")
    with pytest.raises(ValueError, match="at least one"):
        super_resolve_command(["py"], "/e", [], "t", "f", "o")
    with pytest.raises(ValueError, match="interpreter"):
        super_resolve_command([], "/e", ["a"], "t", "f", "o")
