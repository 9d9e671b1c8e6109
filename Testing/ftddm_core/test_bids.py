"""`ftddm bids` (a BIDS App) on a synthetic BIDS dataset: discovery, derivative names and sidecars, resumability,
interrupts, the group level, the BIDS schema tools, and the cohort examples (Dask, Slurm)."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("bids", reason="needs pybids (pip install 'ftddm_core[bids]')")

from ftddm_core import kspace, volume as V  # noqa: E402
from ftddm_core.bids import find_sessions, open_dataset, output_name, split_bids_name  # noqa: E402
from ftddm_core.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAST = ["--factor", "2", "--samples", "2", "--steps", "2", "--t-trunc", "2", "--device", "cpu"]
METS = ("NAA", "tCho")


def grid_affine(shape, spacing):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    return a


def save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """sub-01 with sessions V1 and V2 (T1w, FLAIR, NAA and tCho maps, a CRLB map that is not a signal map, a quality
    mask in V1); sub-02 with V1 and no FLAIR. Maps 8×8×3 at 8×8×6 mm; T1w/FLAIR 16×16×6 over the same field."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    write_json(root / "dataset_description.json", {"Name": "toy", "BIDSVersion": "1.10.0"})
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    der = root / "derivatives" / "mrsi"
    write_json(der / "dataset_description.json", {"Name": "fit", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                                                  "GeneratedBy": [{"Name": "toyfit"}]})
    lr_aff, mri_aff = grid_affine((8, 8, 3), (8.0, 8.0, 6.0)), grid_affine((16, 16, 6), (4.0, 4.0, 3.0))
    head = np.sum((V.grid_centres(mri_aff, (16, 16, 6)) / [26.0, 28.0, 40.0]) ** 2, -1) < 1
    lxyz = V.grid_centres(lr_aff, (8, 8, 3))
    rng = np.random.default_rng(0)
    for sub, sessions, has_flair in (("01", ["V1", "V2"], True), ("02", ["V1"], False)):
        for ses in sessions:
            anat, mrs, stem = root / f"sub-{sub}/ses-{ses}/anat", der / f"sub-{sub}/ses-{ses}/mrs", f"sub-{sub}_ses-{ses}"
            save(anat / f"{stem}_T1w.nii.gz", head * (80 + 20 * rng.random(head.shape)), mri_aff)
            write_json(anat / f"{stem}_T1w.json", {"RepetitionTime": 2.3})
            if has_flair:
                save(anat / f"{stem}_FLAIR.nii.gz", head * (40 + 10 * rng.random(head.shape)), mri_aff)
            for k, met in enumerate(METS):
                blob = (10 - 4 * k) * np.exp(-np.sum((lxyz - [4.0 * k, -3.0, 0]) ** 2, -1) / (2 * 14.0 ** 2)) + 0.5
                save(mrs / f"{stem}_space-orig_met-{met}_desc-signal_mrsi.nii.gz", blob * (1 + (ses == "V2")), lr_aff)
                write_json(mrs / f"{stem}_space-orig_met-{met}_desc-signal_mrsi.json", {"Units": "mM"})
            save(mrs / f"{stem}_space-orig_met-NAA_desc-crlb_mrsi.nii.gz", np.full((8, 8, 3), 5.0), lr_aff)
            if (sub, ses) == ("01", "V1"):
                mask = np.zeros((8, 8, 3))
                mask[1:7, 1:7] = 1
                save(mrs / f"{stem}_space-orig_desc-quality_mask.nii.gz", mask, lr_aff)
    return root


def bids_cli(dataset, out, model, *extra, level="participant"):
    return main(["bids", str(dataset), str(out), level, "--model", str(model), *FAST, *extra])


@pytest.fixture(scope="module")
def run(dataset, tiny_model_file, tmp_path_factory):
    """One participant-level run over the whole dataset; its exit code, output folder and printed report."""
    out = tmp_path_factory.mktemp("deriv") / "ftddm"
    import contextlib
    import io

    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        code = bids_cli(dataset, out, tiny_model_file)
    return {"code": code, "out": out, "stdout": buf_out.getvalue(), "stderr": buf_err.getvalue()}


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def expected_outputs(sub, ses):
    return sorted(f"sub-{sub}_ses-{ses}_space-orig_met-{m}_desc-{d}_mrsi{e}" for m in METS
                  for d in ("ftddm", "ftddmUncertainty", "zerofilled") for e in (".nii.gz", ".json"))


# ------------------------------------------------------------------------------------------ discovery, names
def test_names_keep_the_input_entities_and_replace_desc():
    assert output_name("sub-01_ses-V1_space-orig_met-NAA_desc-signal_mrsi.nii.gz", "ftddmUncertainty") == \
        "sub-01_ses-V1_space-orig_met-NAA_desc-ftddmUncertainty_mrsi.nii.gz"
    assert output_name("sub-01_met-NAA_mrsi.nii", "ftddm", ".json") == "sub-01_met-NAA_desc-ftddm_mrsi.json"
    assert split_bids_name("sub-01_T1w.nii.gz") == ([("sub", "01")], "T1w", ".nii.gz")
    with pytest.raises(ValueError, match="not a BIDS file name"):
        split_bids_name("NAA_map.nii.gz")


def test_the_right_maps_anatomy_and_mask_are_found(dataset, tmp_path):
    ds = open_dataset(dataset, tmp_path / "out")
    found = {(s.subject, s.session): s for s in find_sessions(ds)}
    assert sorted(found) == [("01", "V1"), ("01", "V2"), ("02", "V1")]
    v1 = found[("01", "V1")]
    assert {m: p.name for m, p in v1.maps.items()} == {  # desc-signal only: the CRLB map is not an input
        m: f"sub-01_ses-V1_space-orig_met-{m}_desc-signal_mrsi.nii.gz" for m in METS}
    assert v1.t1w.name == "sub-01_ses-V1_T1w.nii.gz" and v1.flair.name == "sub-01_ses-V1_FLAIR.nii.gz"
    assert v1.mask.name == "sub-01_ses-V1_space-orig_desc-quality_mask.nii.gz" and not v1.problems
    assert found[("01", "V2")].mask is None and found[("01", "V2")].units == {"NAA": "mM", "tCho": "mM"}
    assert found[("02", "V1")].problems == ["no FLAIR image"] and found[("02", "V1")].t1w is not None
    only = find_sessions(ds, ["sub-01"], ["ses-V2"], mets=["tCho"])
    assert [(s.session, list(s.maps)) for s in only] == [("V2", ["tCho"])]
    crlb = find_sessions(ds, ["01"], ["V1"], mrsi_desc="crlb")[0]
    assert list(crlb.maps) == ["NAA"]


def test_participant_level_writes_named_outputs_and_reports_the_missing_flair(run):
    assert run["code"] == 1  # one session could not run
    assert "sub-02 ses-V1: skipped — no FLAIR image" in run["stdout"]
    assert "failed: sub-02 ses-V1 (no FLAIR image)" in run["stderr"]
    assert "2 done, 0 skipped" in run["stdout"]
    out = run["out"]
    for ses in ("V1", "V2"):
        folder = out / "sub-01" / f"ses-{ses}" / "mrs"
        assert sorted(p.name for p in folder.iterdir()) == expected_outputs("01", ses)  # no staging folder left
    assert not (out / "sub-02").exists()


def test_outputs_are_on_the_upsampled_grid_and_zero_filled_is_the_kspace_zero_fill(run, dataset):
    lr = nib.load(str(dataset / "derivatives/mrsi/sub-01/ses-V2/mrs/sub-01_ses-V2_space-orig_met-tCho_desc-signal_mrsi.nii.gz"))
    zf = nib.load(str(run["out"] / "sub-01/ses-V2/mrs/sub-01_ses-V2_space-orig_met-tCho_desc-zerofilled_mrsi.nii.gz"))
    assert zf.shape == (16, 16, 3)
    np.testing.assert_allclose(np.linalg.norm(zf.affine[:3, :3], axis=0), [4.0, 4.0, 6.0], atol=1e-5)
    slices = np.moveaxis(lr.get_fdata(), 2, 0)  # per slice along the slab axis
    expected = np.moveaxis(np.real(kspace.zero_fill(slices, (16, 16))), 0, 2)
    np.testing.assert_allclose(zf.get_fdata(), expected, rtol=1e-4, atol=1e-4)
    sr = nib.load(str(run["out"] / "sub-01/ses-V2/mrs/sub-01_ses-V2_space-orig_met-tCho_desc-ftddm_mrsi.nii.gz"))
    assert np.isfinite(sr.get_fdata()).all() and sr.get_fdata().min() >= 0


def test_sidecars_carry_provenance(run, dataset, tiny_model_file):
    folder = run["out"] / "sub-01/ses-V1/mrs"
    for desc in ("ftddm", "ftddmUncertainty", "zerofilled"):
        side = json.loads((folder / f"sub-01_ses-V1_space-orig_met-NAA_desc-{desc}_mrsi.json").read_text())
        assert side["Metabolite"] == "NAA" and side["Units"] == "mM"
        by_role = {(i["role"], Path(i["path"]).name): i["sha256"] for i in side["Inputs"]}
        files = [dataset / "sub-01/ses-V1/anat/sub-01_ses-V1_T1w.nii.gz",
                 dataset / "sub-01/ses-V1/anat/sub-01_ses-V1_FLAIR.nii.gz",
                 dataset / "derivatives/mrsi/sub-01/ses-V1/mrs/sub-01_ses-V1_space-orig_desc-quality_mask.nii.gz",
                 *(dataset / f"derivatives/mrsi/sub-01/ses-V1/mrs/sub-01_ses-V1_space-orig_met-{m}_desc-signal_mrsi.nii.gz"
                   for m in METS)]
        assert sorted(by_role.values()) == sorted(sha256(f) for f in files)
        assert side["Model"]["sha256"] == sha256(tiny_model_file)
        assert side["Options"]["samples"] == 2 and side["Options"]["steps"] == 2 and side["Options"]["mask"] == "user"
        assert side["NFEPerSample"] == 3  # ancestral from the re-noised t = 2: indices 2, 1, 0
        assert side["Timings"]["total_s"] > 0 and side["Grid"]["shape"] == [16, 16, 3]
        # the tiny model has no σ-scaling: the uncertainty sidecar says its map is the raw std
        assert desc != "ftddmUncertainty" or side["UncertaintyCalibration"]["scale"] == 1.0
        assert "bids:raw:sub-01/ses-V1/anat/sub-01_ses-V1_T1w.nii.gz" in side["Sources"]
    description = json.loads((run["out"] / "dataset_description.json").read_text())
    by = description["GeneratedBy"][0]
    assert by["Name"] == "ftddm" and by["Version"] == __import__("ftddm_core").__version__
    assert by["CodeURL"].startswith("https://") and by["ModelSHA256"] == sha256(tiny_model_file)
    assert description["DatasetType"] == "derivative" and set(description["DatasetLinks"]) == {"raw", "mrsi"}


# ------------------------------------------------------------------------------------------ resume, interrupt
def test_a_rerun_skips_finished_sessions_and_overwrite_redoes_them(dataset, tiny_model_file, tmp_path, capsys):
    out = tmp_path / "ftddm"
    assert bids_cli(dataset, out, tiny_model_file, "--participant-label", "01", "--session-label", "V2") == 0
    target = out / "sub-01/ses-V2/mrs/sub-01_ses-V2_space-orig_met-NAA_desc-ftddm_mrsi.nii.gz"
    first = target.stat().st_mtime_ns
    capsys.readouterr()
    assert bids_cli(dataset, out, tiny_model_file, "--participant-label", "01", "--session-label", "V2") == 0
    assert "sub-01 ses-V2: finished earlier, skipped" in capsys.readouterr().out
    assert target.stat().st_mtime_ns == first
    assert bids_cli(dataset, out, tiny_model_file, "--participant-label", "01", "--session-label", "V2",
                    "--overwrite") == 0
    assert "sub-01 ses-V2: done" in capsys.readouterr().out and target.stat().st_mtime_ns != first
    # a session with only some outputs (another --met earlier) is not silently completed or replaced
    assert bids_cli(dataset, out, tiny_model_file, "--participant-label", "01", "--session-label", "V2",
                    "--met", "NAA", "tCho") == 0
    (out / "sub-01/ses-V2/mrs/sub-01_ses-V2_space-orig_met-tCho_desc-ftddm_mrsi.json").unlink()
    assert bids_cli(dataset, out, tiny_model_file, "--participant-label", "01", "--session-label", "V2") == 1
    assert "some outputs exist but not all" in capsys.readouterr().out


def test_an_interrupted_participant_leaves_finished_sessions_and_nothing_half_written(dataset, tiny_model_file,
                                                                                     tmp_path, monkeypatch, capsys):
    calls, real = [], V.save_volume

    def interrupt_in_second_session(volume, path, **kw):
        calls.append(path)
        if len(calls) == 8:  # V1 wrote its 6 maps; stop in the middle of V2's staging
            raise KeyboardInterrupt
        return real(volume, path, **kw)

    monkeypatch.setattr(V, "save_volume", interrupt_in_second_session)
    out = tmp_path / "ftddm"
    assert bids_cli(dataset, out, tiny_model_file, "--participant-label", "01") == 130
    assert sorted(p.name for p in (out / "sub-01/ses-V1/mrs").iterdir()) == expected_outputs("01", "V1")
    assert list((out / "sub-01/ses-V2/mrs").iterdir()) == []  # staging folder removed, nothing published
    monkeypatch.setattr(V, "save_volume", real)
    capsys.readouterr()
    assert bids_cli(dataset, out, tiny_model_file, "--participant-label", "01") == 0  # resumes
    text = capsys.readouterr().out
    assert "sub-01 ses-V1: finished earlier, skipped" in text and "sub-01 ses-V2: done" in text


def test_bad_requests_get_one_clear_error(dataset, tiny_model_file, tmp_path, capsys):
    assert bids_cli(dataset, tmp_path / "o", tiny_model_file, "--participant-label", "03") == 2
    assert "--participant-label 03: not in" in capsys.readouterr().err
    assert bids_cli(dataset, tmp_path / "o", tiny_model_file, "--mrsi-derivatives", "nope") == 2
    assert "--mrsi-derivatives nope" in capsys.readouterr().err
    bad = tmp_path / "filter.json"
    bad.write_text('{"bold": {}}')
    assert bids_cli(dataset, tmp_path / "o", tiny_model_file, "--bids-filter-file", str(bad)) == 2
    assert "--bids-filter-file" in capsys.readouterr().err
    assert main(["bids", str(tmp_path), str(tmp_path / "o"), "participant"]) == 2
    assert "not a BIDS dataset" in capsys.readouterr().err


def test_every_super_resolve_option_is_a_bids_flag():
    from ftddm_core.cli import build_parser

    def flags(command):
        sub = build_parser(command)._subparsers._group_actions[0].choices[command]
        return {o for a in sub._actions for o in a.option_strings}

    missing = (flags("super-resolve") - {"--lr", "--t1", "--flair", "--mask", "--out", "--ratio"}) - flags("bids")
    assert not missing


# ------------------------------------------------------------------------------------------ group level
def test_group_level_table_figure_and_page(run, dataset, tiny_model_file, capsys):
    import matplotlib.image

    assert main(["bids", str(dataset), str(run["out"]), "group"]) == 0
    lines = (run["out"] / "group_ftddm.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]
    assert [(r["participant_id"], r["session_id"], r["status"]) for r in rows] == [
        ("sub-01", "ses-V1", "done"), ("sub-01", "ses-V2", "done"), ("sub-02", "ses-V1", "missing_inputs")]
    assert rows[0]["maps"] == "NAA,tCho" and rows[0]["mask"] == "user" and rows[1]["mask"] == "automatic"
    assert rows[2]["warnings"] == "no FLAIR image" and rows[2]["total_s"] == "n/a"
    for row in rows[:2]:
        side = json.loads((run["out"] / f"sub-01/{row['session_id']}/mrs/sub-01_{row['session_id']}_space-orig_"
                           "met-NAA_desc-ftddm_mrsi.json").read_text())
        assert float(row["total_s"]) == pytest.approx(side["Timings"]["total_s"], abs=1e-3)
        sr = nib.load(str(run["out"] / f"sub-01/{row['session_id']}/mrs/sub-01_{row['session_id']}_space-orig_"
                          "met-NAA_desc-ftddm_mrsi.nii.gz")).get_fdata()
        assert (sr > 0).mean() <= float(row["mask_coverage"]) + 1e-4 <= 1  # SR is zero outside the mask
    # the user mask keeps 6×6 of 8×8 MRSI voxels: the coverage on the 16×16 grid is close to 36/64
    assert float(rows[0]["mask_coverage"]) == pytest.approx(36 / 64, abs=0.1)
    assert set(json.loads((run["out"] / "group_ftddm.json").read_text())) == set(header)
    image = matplotlib.image.imread(str(run["out"] / "group_ftddm.png"))
    assert image.shape[0] > image.shape[1] * 0.5  # two rows of panels
    page = (run["out"] / "group_ftddm.html").read_text()
    assert "group_ftddm.png" in page and page.count("<tr>") == 4


# ------------------------------------------------------------------------------------------ BIDS schema tools
def test_raw_dataset_and_derivatives_pass_the_bids_schema_tools(run, dataset):
    """bidsschematools' validator runs offline. The raw dataset must pass as it is; the derivatives use the
    `met` entity, which BIDS 1.11 does not have, so they are checked against the schema extended by exactly that
    entity and one rule for MRSI derivative maps (space/desc/met), everything else as the schema says."""
    from bidsschematools import rules, schema, validator

    raw = validator.validate_bids([str(dataset)])
    assert raw["path_tracking"] == [] and raw["match_listing"]

    spec = schema.load_schema()
    entities = dict(spec.objects.entities.to_dict())
    entities["metabolite"] = {"name": "met", "display_name": "Metabolite", "type": "string", "format": "label"}
    order = list(spec.rules.entities)
    order.insert(order.index("description"), "metabolite")
    extended = schema.Namespace.build({**spec.to_dict(), "objects": {**spec.objects.to_dict(), "entities": entities},
                                       "rules": {**spec.rules.to_dict(), "entities": order}})
    mrs = extended.rules.files.raw.mrs.mrs.to_dict()
    rule = {**mrs, "entities": {**mrs["entities"], "space": "optional", "metabolite": "required",
                                "description": "optional"}, "extensions": [".nii.gz", ".nii", ".json"]}
    deriv_rules = rules.regexify_filename_rules(schema.Namespace.build({"mrs": {"maps": rule}}), extended, level=2)
    common, _ = rules.regexify_all()
    paths = validator._get_paths([str(run["out"])])
    result = validator.validate_all(paths, common + deriv_rules)
    assert result["path_tracking"] == [] and len(result["match_listing"]) == 25  # 24 outputs + description
    # dataset_description.json: the fields the schema requires of a derivative, with their schema types
    description = json.loads((run["out"] / "dataset_description.json").read_text())
    required = [k for k, v in spec.rules.json.dataset.dataset_description.fields.items() if v == "required"]
    required += list(spec.rules.json.dataset.derivative_description.fields)
    assert all(k in description for k in required) and required
    items = spec.objects.metadata.GeneratedBy["items"]
    for entry in description["GeneratedBy"]:
        assert set(items["required"]) <= set(entry)
        assert all(isinstance(entry[k], str) for k in items["properties"] if k in entry and k != "Container")


# ------------------------------------------------------------------------------------------ cohort examples
def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "cohort" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dask_example_runs_two_participants_in_parallel(dataset, tiny_model_file, tmp_path):
    pytest.importorskip("distributed")
    dask_cohort = load_script("dask_cohort")
    assert dask_cohort.participants(str(dataset)) == ["01", "02"]
    results = dask_cohort.run_cohort(str(dataset), str(tmp_path / "ftddm"), ["01", "02"],
                                     ["--model", str(tiny_model_file), *FAST, "--session-label", "V1"], workers=2,
                                     group=False)
    by = {r["label"]: r for r in results}
    assert by["01"]["returncode"] == 0 and by["02"]["returncode"] == 1  # sub-02 has no FLAIR
    assert by["01"]["start"] < by["02"]["end"] and by["02"]["start"] < by["01"]["end"]  # the runs overlapped
    assert (tmp_path / "ftddm/sub-01/ses-V1/mrs/sub-01_ses-V1_space-orig_met-NAA_desc-ftddm_mrsi.nii.gz").is_file()


def test_slurm_array_script_runs_the_task_of_its_array_index(dataset, tiny_model_file, tmp_path):
    listing = tmp_path / "participants.txt"
    listing.write_text("02\n01\n")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "FTDDM": f"{sys.executable} -m ftddm_core.cli",
           "PYTHONPATH": str(REPO), "SLURM_CPUS_PER_TASK": "1"}
    done = subprocess.run(["bash", str(REPO / "scripts/cohort/slurm_array.sh"), str(dataset), str(tmp_path / "o"),
                           str(listing), "--model", str(tiny_model_file), *FAST, "--session-label", "V2"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "sub-01 ses-V2: done" in done.stdout
    env.pop("SLURM_ARRAY_TASK_ID")
    missing = subprocess.run(["bash", str(REPO / "scripts/cohort/slurm_array.sh"), str(dataset), str(tmp_path / "o"),
                              str(listing)], cwd=REPO, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "SLURM_ARRAY_TASK_ID" in missing.stderr


# ------------------------------------------------------------------------------------------ the Slicer helper
def test_slicer_helper_lists_a_participants_outputs_with_their_anatomy(run, dataset):
    sys.path.insert(0, str(REPO / "MRSISuperResolution"))
    try:
        from MRSISuperResolutionLib import bidsoutputs
    finally:
        sys.path.remove(str(REPO / "MRSISuperResolution"))
    maps = bidsoutputs.participant_outputs(run["out"], "sub-01")
    assert [(m.session, m.metabolite) for m in maps] == [("V1", "NAA"), ("V1", "tCho"), ("V2", "NAA"), ("V2", "tCho")]
    first = maps[0]
    assert {k: p.name for k, p in first.files.items()} == {
        "sr": "sub-01_ses-V1_space-orig_met-NAA_desc-ftddm_mrsi.nii.gz",
        "uncertainty": "sub-01_ses-V1_space-orig_met-NAA_desc-ftddmUncertainty_mrsi.nii.gz",
        "zerofilled": "sub-01_ses-V1_space-orig_met-NAA_desc-zerofilled_mrsi.nii.gz"}
    assert first.anatomy["T1w"].resolve() == (dataset / "sub-01/ses-V1/anat/sub-01_ses-V1_T1w.nii.gz").resolve()
    assert first.name == "sub-01_ses-V1_NAA"
    assert [m.session for m in bidsoutputs.participant_outputs(run["out"], "01", "ses-V2")] == ["V2", "V2"]
