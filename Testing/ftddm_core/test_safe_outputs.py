"""Issue 16, safe outputs: file modes, signs and units, refusals before compute, SIGTERM, CLI wording, the figure."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ftddm_core import atomic, figures, kspace, volume as V
from ftddm_core.checkpoint import write_safetensors
from ftddm_core.cli import cli_message, main
from ftddm_core.data import save_nifti
from ftddm_core.demo import simulate_lr
from ftddm_core.model import FTDDM
from ftddm_core.pipeline import check_mask_coverage, negative_share, super_resolve, zero_filled_in_input_units

REPO = Path(__file__).resolve().parents[2]
# Child processes print "…" and "×": decode as UTF-8 whatever the locale of the test run (an ASCII locale
# made these tests fail with UnicodeDecodeError, not on the behaviour they check).
UTF8 = {"text": True, "encoding": "utf-8", "env": {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUTF8": "1"}}


@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    """A synthetic patient's LR NAA/tCho (16×16, 3 slices) with T1, FLAIR and mask as NIfTI files."""
    from ftddm_core.phantom import make_patient

    root = tmp_path_factory.mktemp("exam16")
    p = make_patient(7, slices=3)
    paths = {name: V.save_volume(simulate_lr(V.Volume(p.maps[name], p.affine), 16), root / f"{name}.nii.gz")
             for name in ("NAA", "tCho")}
    paths["t1"] = V.save_volume(V.Volume(p.t1, p.mri_affine), root / "t1.nii.gz")
    paths["flair"] = V.save_volume(V.Volume(p.flair, p.mri_affine), root / "flair.nii.gz")
    paths["mask"] = V.save_volume(V.Volume(p.quality_mask.astype(np.uint8), p.affine), root / "mask.nii.gz")
    return paths


def cli_args(exam, out, model, *extra):
    return ["super-resolve", "--lr", str(exam["NAA"]), "--lr", str(exam["tCho"]), "--t1", str(exam["t1"]),
            "--flair", str(exam["flair"]), "--out", str(out), "--model", str(model), "--steps", "2",
            "--samples", "2", "--device", "cpu", *extra]


def expected_outputs():
    return sorted(f"{s}_{k}" for s in ("NAA", "tCho")
                  for k in ("sr.nii.gz", "zerofilled.nii.gz", "uncertainty.nii.gz", "run.json"))


# -------------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644  # what open() gives a new file under umask 022
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_gives_the_umask_mode(umask_022, tmp_path, exam, tiny_model_file):
    plain = tmp_path / "plain.txt"
    plain.write_text("reference: a normally created file")
    assert _mode(plain) == umask_022
    vol = V.Volume(np.ones((4, 4, 2), np.float32), np.eye(4))
    written = [V.save_volume(vol, tmp_path / "v.nii.gz"),
               write_safetensors(tmp_path / "w.safetensors", {"a": torch.ones(2)}, {"k": "v"}),
               atomic.atomic_write_text(tmp_path / "t.json", "{}")]
    save_nifti(vol.data, vol.affine, tmp_path / "d.nii.gz")
    written.append(tmp_path / "d.nii.gz")
    written.append(figures.calibration_plot([{"scale": 4.0, "pearson": 0.3, "bins": [{"std_mean": 1, "rmse": 1}]}],
                                            tmp_path / "f.png"))
    from ftddm_core.evaluation.runs import write_cache

    write_cache(tmp_path / "c.npz", "k", {"mean": np.zeros(2), "std": np.zeros(2), "nfe": 1})
    written.append(tmp_path / "c.npz")
    out = tmp_path / "out"
    assert main(cli_args(exam, out, tiny_model_file)) == 0
    written += sorted(out.iterdir())
    assert {p.name: _mode(p) for p in written} == {p.name: umask_022 for p in written}


def test_atomic_write_follows_another_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = atomic.atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_figures_are_saved_atomically_and_closed(umask_022, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    path = atomic.atomic_savefig(fig, tmp_path / "f.png", dpi=20)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _mode(path) == umask_022
    assert fig.number not in plt.get_fignums()  # pyplot no longer holds it
    broken = plt.figure(figsize=(1, 1))
    broken.savefig = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_savefig(broken, tmp_path / "g.png", dpi=20)
    assert broken.number not in plt.get_fignums() and sorted(os.listdir(tmp_path)) == ["f.png"]


# ----------------------------------------------------------------------------------- signs and units
def test_zero_fill_keeps_the_sign_and_units():
    rng = np.random.default_rng(0)
    lr = rng.normal(0.0, 1.0, (2, 16, 16)).astype(np.float32)
    zf = zero_filled_in_input_units(lr, 64)
    # the centred zero-fill of a real map, sampled back on the LR grid, returns the map (HR voxel 4·i = LR i)
    # where it is exactly band-limited (odd part); the real part keeps negative values negative
    assert zf.min() < 0
    odd = kspace.zero_fill(kspace.downsample(lr, 15), 64).real  # an odd block is Hermitian-complete: real
    np.testing.assert_allclose(zero_filled_in_input_units(kspace.downsample(lr, 15).real, 64), odd, atol=1e-5)
    # mean of the zero-fill = mean of the input (DC kept; orthonormal FFT rescaled by the sizes)
    np.testing.assert_allclose(zf.mean(axis=(1, 2)), lr.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_negative_share_is_the_negative_fraction_of_the_total():
    assert negative_share(np.array([1.0, -1.0, 2.0])) == pytest.approx(0.25)
    assert negative_share(np.zeros(3)) == 0.0


def _signed_case(sign_flip: bool, noise: float):
    from Testing.ftddm_core.test_pipeline import IdentityModel, oblique_case

    lr, t1, flair = oblique_case()
    data = lr.data.copy()
    data[0, 0, :] = -noise  # a few negative (noise) voxels
    if sign_flip:
        data = -data
    return V.Volume(data, lr.affine, "signed.nii.gz"), t1, flair, IdentityModel()


def test_mostly_negative_map_is_refused_before_sampling():
    lr, t1, flair, model = _signed_case(sign_flip=True, noise=0.5)
    with pytest.raises(ValueError, match=r"signed\.nii\.gz: negative voxels carry (9\d|100)% .*non-negative"):
        super_resolve(lr, t1, flair, model=model, samples=1)
    assert model.calls == []


def test_map_with_negative_noise_voxels_proceeds_and_the_zero_fill_keeps_the_sign():
    lr, t1, flair, model = _signed_case(sign_flip=False, noise=3.0)
    out = super_resolve(lr, t1, flair, model=model, samples=1)
    expected = V.from_slices(np.real(kspace.zero_fill(V.to_slices(lr.data, 2), 64)), 2)
    np.testing.assert_allclose(out.zero_filled.data[..., 0], expected, atol=1e-4)
    assert out.zero_filled.data.min() < 0  # not the magnitude


# ------------------------------------------------------------------------------- refusals before compute
@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if the model is ever loaded or sampled (the refusal must come before)."""
    def refuse(*a, **k):
        raise AssertionError("sampling started before the refusal")

    monkeypatch.setattr(FTDDM, "sample", refuse)
    monkeypatch.setattr("ftddm_core.model.load_model", refuse)


def test_out_that_is_a_file_is_refused_before_sampling(exam, tmp_path, tiny_model_file, no_sampling, capsys):
    out = tmp_path / "results.nii.gz"
    out.write_text("a user's file")
    assert main(cli_args(exam, out, tiny_model_file)) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: a file of that name exists" in err and "Errno" not in err
    assert out.read_text() == "a user's file"


def test_out_below_a_file_is_refused(exam, tmp_path, tiny_model_file, no_sampling, capsys):
    (tmp_path / "f").write_text("x")
    assert main(cli_args(exam, tmp_path / "f" / "sub", tiny_model_file)) == 2
    assert "is a file, so the output folder cannot be created" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write in a read-only folder")
def test_unwritable_out_is_refused(exam, tmp_path, tiny_model_file, no_sampling, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert main(cli_args(exam, ro / "out", tiny_model_file)) == 2
    assert "cannot write in" in capsys.readouterr().err


def test_existing_outputs_are_refused_before_sampling(exam, tmp_path, tiny_model_file, no_sampling, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tCho_sr.nii.gz").write_text("earlier result")
    assert main(cli_args(exam, out, tiny_model_file)) == 2
    assert "tCho_sr.nii.gz already exists" in capsys.readouterr().err


def _mask_file(tmp_path, exam, keep: int, shift_mm: float = 0.0) -> Path:
    lr = V.load_volume(exam["NAA"])
    data = np.zeros(lr.shape, np.uint8)
    data.flat[np.linspace(0, data.size - 1, keep).astype(int)] = 1
    affine = lr.affine.copy()
    affine[:3, 3] += [shift_mm, 0, 0]
    return V.save_volume(V.Volume(data, affine), tmp_path / f"mask{keep}_{shift_mm:g}.nii.gz")


def test_mask_outside_the_field_of_view_is_refused_before_sampling(exam, tmp_path, tiny_model_file, no_sampling,
                                                                   capsys):
    lr = V.load_volume(exam["NAA"])
    shift = 0.8 * lr.fov[0]  # a mask from other coordinates: overlaps about 20 % of the MRSI field of view
    mask = _mask_file(tmp_path, exam, lr.data.size, shift)
    assert main(cli_args(exam, tmp_path / "o", tiny_model_file, "--mask", str(mask))) == 2
    err = capsys.readouterr().err
    assert str(mask) in err and re.search(r"covers only (1\d|2\d)% of the MRSI field of view", err)


def test_mask_keeping_few_voxels_gets_a_warning(exam, tmp_path):
    lr = V.load_volume(exam["NAA"])  # 16 × 16 × 3 = 768 voxels
    with pytest.warns(UserWarning, match=r"keeps only 18 of 768 voxels"):
        assert check_mask_coverage(V.load_volume(_mask_file(tmp_path, exam, 18), allow_all_zero=True), lr) \
            == pytest.approx(18 / 768)
    with pytest.raises(ValueError, match="keeps no voxel"):
        check_mask_coverage(V.Volume(np.zeros(lr.shape), lr.affine, "empty.nii.gz"), lr)


# ----------------------------------------------------------------------------------- CLI wording
def test_nan_hint_names_the_flag_and_the_flag_works(exam, tmp_path, tiny_model_file, capsys):
    img = nib.load(str(exam["NAA"]))
    data = img.get_fdata().astype(np.float32)
    data[0, 0, 0] = np.nan
    bad = tmp_path / "NAA.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    args = cli_args({**exam, "NAA": bad}, tmp_path / "o", tiny_model_file)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--nan-policy zero" in err and "nan_policy" not in err
    assert main([*args, "--nan-policy", "zero"]) == 0
    assert "warning: " + str(bad) + ": 1 of" in capsys.readouterr().err


def test_out_of_range_matrix_says_force(tmp_path, exam, tiny_model_file, capsys):
    lr = V.load_volume(exam["NAA"])
    small = V.save_volume(simulate_lr(V.Volume(np.ones((64, 64, 3), np.float32) + 1, lr.affine), 4),
                          tmp_path / "small.nii.gz")
    args = ["super-resolve", "--lr", str(small), "--t1", str(exam["t1"]), "--flair", str(exam["flair"]),
            "--out", str(tmp_path / "o"), "--model", str(tiny_model_file)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "force=True" not in err
    assert cli_message("in-plane LR matrix 4 …; pass force=True to run anyway") == \
        "in-plane LR matrix 4 …; pass --force to run anyway"


@pytest.mark.parametrize("change, words", [("origin", "origin (1, 0, 0) vs (0, 0, 0) mm"),
                                           ("spacing", "spacing (3, 2, 2) vs (2, 2, 2) mm"),
                                           ("matrix", "matrix (8, 8, 3) vs (8, 8, 4)")])
def test_grid_mismatch_says_what_differs(change, words):
    ref = V.Volume(np.ones((8, 8, 4)), np.diag([2.0, 2, 2, 1]), "NAA.nii")
    affine, shape = np.diag([2.0, 2, 2, 1]), (8, 8, 4)
    if change == "origin":
        affine[0, 3] = 1.0
    elif change == "spacing":
        affine[0, 0] = 3.0
    else:
        shape = (8, 8, 3)
    with pytest.raises(ValueError) as err:
        V.check_same_grid([ref, V.Volume(np.ones(shape), affine, "tCho.nii")])
    msg = str(err.value)
    assert msg.startswith("metabolite volumes must share one grid: tCho.nii (") and words in msg
    others = {"origin", "spacing", "matrix"} - {change}
    assert not any(f"{o} (" in msg for o in others)  # only what differs is named


def test_folder_input_prints_no_itk_warning(tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    code = (f"from ftddm_core import volume as V\ntry:\n    V.load_volume({str(tmp_path)!r})\n"
            "except ValueError as e:\n    print('ERROR', e)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60, **UTF8)
    assert "no DICOM series in the folder" in run.stdout
    assert "WARNING" not in run.stderr and "WARNING" not in run.stdout


# ----------------------------------------------------------------------------------- signals
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import ftddm_core.volume as V
    from ftddm_core.cli import main
    from ftddm_core.model import FTDDM
    phase = sys.argv[1]
    kill = lambda: signal.raise_signal(signal.SIGTERM)  # delivered in this thread, at this point
    if phase == "sampling":
        real = FTDDM.sample
        def sample(self, *a, **k):
            kill()
            return real(self, *a, **k)
        FTDDM.sample = sample
    elif phase == "staging":
        real_save, calls = V.save_volume, []
        def save(volume, path, **k):
            calls.append(path)
            if len(calls) == 3:
                kill()
            return real_save(volume, path, **k)
        V.save_volume = save
    elif phase == "move":
        real_replace, moves = os.replace, []
        def replace(src, dst):
            real_replace(src, dst)
            if ".ftddm-partial-" not in str(dst):  # into the output folder
                moves.append(dst)
                if len(moves) == 2:
                    kill()
        os.replace = replace
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("phase, complete", [("sampling", False), ("staging", False), ("move", True)])
def test_sigterm_leaves_complete_outputs_or_none(phase, complete, exam, tmp_path, tiny_model_file):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **UTF8["env"]}
    run = subprocess.run([sys.executable, "-c", DRIVER, phase, *cli_args(exam, out, tiny_model_file),
                          "--progress-lines"], cwd=REPO, capture_output=True, timeout=120,
                         **{**UTF8, "env": env})
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if not ln.startswith("PROGRESS")]
    assert lines == ["ftddm super-resolve: interrupted (SIGTERM); no partial outputs were left"]
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    # a signal during the renames is held until they are done: then every output is there and complete
    assert names == (expected_outputs() if complete else [])
    for name in names:
        if name.endswith(".nii.gz"):
            assert V.load_volume(out / name, allow_all_zero=True).shape == (64, 64, 3)
        else:
            json.loads((out / name).read_text())


def test_failed_move_restores_the_earlier_outputs(exam, tmp_path, tiny_model_file, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(cli_args(exam, out, tiny_model_file)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, moves = os.replace, []

    def failing(src, dst):
        if ".ftddm-partial-" not in str(dst) and ".replaced" not in str(dst):
            moves.append(dst)
            if len(moves) == 3:
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        main(cli_args(exam, out, tiny_model_file, "--overwrite", "--seed", "5"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier run, whole


def test_deferred_interrupts_hold_a_signal_until_the_block_ends():
    seen = []
    # Python's own Ctrl-C handler, whatever the test process inherited: a job started in the background by a
    # non-interactive shell ignores SIGINT, and the block then rightly delivers it to SIG_IGN
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic.deferred_interrupts():
                # raise_signal runs the C handler in this thread before it returns (os.kill may hand the signal
                # to one of torch's threads and the Python handler then runs late, after the block: a flaky test)
                signal.raise_signal(signal.SIGINT)
                seen.append("block finished")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == ["block finished"]


def test_deferred_interrupts_deliver_to_an_ignoring_handler_as_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with atomic.deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored, and the held signal stayed ignored
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------ --samples 1
def test_one_sample_notes_the_undefined_uncertainty(exam, tmp_path, tiny_model_file, capsys):
    args = cli_args(exam, tmp_path / "o", tiny_model_file)
    args[args.index("--samples") + 1] = "1"
    assert main(args) == 0
    report = json.loads((tmp_path / "o" / "NAA_run.json").read_text())
    assert report["uncertainty"].startswith("undefined with --samples 1")
    assert "warning: undefined with --samples 1" in capsys.readouterr().err


def test_run_json_records_the_uncertainty_calibration(exam, tmp_path, tiny_model_file):
    assert main(cli_args(exam, tmp_path / "o", tiny_model_file)) == 0
    report = json.loads((tmp_path / "o" / "NAA_run.json").read_text())
    assert report["uncertainty_calibration"] == {"scale": 1.0, "calibrated": False,
                                                 "note": report["uncertainty_calibration"]["note"]}
    assert "no uncertainty calibration" in report["uncertainty_calibration"]["note"]


# ------------------------------------------------------------------------------------------ the demo
def test_demo_interrupt_removes_what_it_wrote(tmp_path, monkeypatch):
    import ftddm_core.pipeline as P
    from ftddm_core.demo import run_demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")

    def interrupt(*a, **k):
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(P, "run_super_resolve", interrupt)
    monkeypatch.setattr("ftddm_core.demo.make_patient",
                        lambda seed, patient_id: __import__("ftddm_core.phantom").phantom.make_patient(
                            seed, patient_id=patient_id, slices=2))
    with pytest.raises(KeyboardInterrupt, match=r"removed the 10 files this demo had written"):
        run_demo(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------------------------------------ the figure
def _point_slice(x_mm: float, affine: np.ndarray) -> np.ndarray:
    """A 32×32 slice (axis 2) that is 1 at the voxel nearest RAS x = x_mm, y = 0."""
    vol = V.Volume(np.zeros((32, 32, 1)), affine)
    ijk = np.rint(vol.world_to_voxel([x_mm, 0.0, 0.0])).astype(int)
    img = np.zeros((32, 32))
    img[ijk[0], ijk[1]] = 1.0
    return img


@pytest.mark.parametrize("x_step", [3.0, -3.0])  # i towards patient-right (RAS) or patient-left (LAS)
def test_patient_left_is_on_the_image_right_half(x_step):
    plt = figures._pyplot()
    affine = np.diag([x_step, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-x_step * 15.5, -46.5, 0.0]  # centred on the origin
    img = _point_slice(-30.0, affine)  # RAS x < 0: patient-left
    fig, ax = plt.subplots()
    figures.map_panel(ax, img, affine, 2, window=(0, 1), cmap="viridis", mask=np.ones_like(img, bool))
    shown = np.asarray(ax.images[0].get_array())
    col = np.unravel_index(np.argmax(shown), shown.shape)[1]
    assert col > shown.shape[1] / 2
    labels = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert labels["L"] > 0.5 > labels["R"]  # markers: L on the right edge
    plt.close(fig)


def test_masked_voxels_are_shown_as_no_data_not_zero():
    plt = figures._pyplot()
    img = np.full((8, 8), 5.0)
    mask = np.ones((8, 8), bool)
    mask[:4] = False
    fig, ax = plt.subplots()
    figures.map_panel(ax, img, np.eye(4), 2, window=(0, 10), cmap="viridis", mask=mask)
    shown = ax.images[0].get_array()
    assert np.ma.count_masked(shown) == 32 and float(shown.min()) == 5.0
    plt.close(fig)


def test_slice_position_in_mm():
    affine = np.diag([3.4, 3.4, 5.0, 1.0])
    affine[:3, 3] = [-100.0, -100.0, -10.0]
    assert figures.slice_position_mm(affine, (64, 64, 4), 2, 3) == "S +5.0 mm"
