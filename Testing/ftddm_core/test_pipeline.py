"""super_resolve and `ftddm super-resolve`: geometry and units end to end, outputs, reports, bad input."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from ftddm_core import kspace, volume as V
from ftddm_core.cli import main
from ftddm_core.config import preset
from ftddm_core.demo import simulate_lr
from ftddm_core.options import RENOISED_T_TRUNC, SuperResolveOptions
from ftddm_core.pipeline import super_resolve
from ftddm_core.sampling import SampleResult


class IdentityModel:
    """An oracle 'model' whose sample is its normalised LR input: SR must then equal |zero-filled LR| ⊙ M in the
    input's units, on the right grid — which checks normalisation, slice order and geometry end to end."""

    def __init__(self):
        self.config = preset("tiny")
        self.calls = []

    def to(self, device):
        return self

    def eval(self):
        return self

    def sample(self, cond, scale, *, force_scale=False, callback=None, **kw):
        self.calls.append((cond.clone(), scale.clone(), kw))
        mean = cond[:, :1] * cond[:, 1:2]
        return SampleResult(mean=mean, std=0.1 * mean, nfe=11, network_calls=1, seconds=0.0)


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def oblique_case(m=16, slices=5, axis=2, centre_mm=(4.0, -6.0, 3.0)):
    """An oblique LR slab with a smooth blob at a known RAS point, and a T1/FLAIR on another rotated 2 mm grid."""
    rot = rotation([1, 2, 0.5], 23.0)
    spacing = [3.4 * 64 / m] * 3
    spacing[axis] = 5.0
    shape = [m, m, m]
    shape[axis] = slices
    lr_aff = np.eye(4)
    lr_aff[:3, :3] = rot * spacing
    lr_aff[:3, 3] = -(rot * spacing) @ ((np.array(shape) - 1) / 2)  # slab centred on the origin
    xyz = V.grid_centres(lr_aff, shape)
    blob = 5.0 + 40.0 * np.exp(-np.sum((xyz - centre_mm) ** 2, -1) / (2 * 12.0 ** 2))
    lr = V.Volume(blob.astype(np.float32), lr_aff, "lr.nii.gz")
    mri_aff = np.eye(4)
    mri_aff[:3, :3] = rotation([0, 1, 1], -15.0) * 2.0
    mri_aff[:3, 3] = -mri_aff[:3, :3] @ np.array([60.0, 60.0, 60.0])
    mxyz = V.grid_centres(mri_aff, (120, 120, 120))
    head = (np.linalg.norm(mxyz / [80, 95, 70], axis=-1) < 1).astype(np.float32)
    t1 = V.Volume(head * (100 + 0.2 * mxyz[..., 0]), mri_aff, "t1.nii.gz")
    return lr, t1, V.Volume(head * 50.0, mri_aff, "flair.nii.gz")


@pytest.mark.parametrize("axis", [2, 0])
def test_oblique_volume_lands_on_the_sample_aligned_grid_in_input_units(axis):
    lr, t1, flair = oblique_case(axis=axis)
    model = IdentityModel()
    out = super_resolve(lr, t1, flair, model=model, samples=2)
    grid = V.target_grid(lr, axis, 64)
    assert np.allclose(out.sr.affine, grid.affine) and out.sr.shape == grid.shape
    assert out.options["slice_axis"] == axis and out.options["scale"] == pytest.approx(4.0)
    # the oracle returns the normalised LR: SR must be |zero-fill(LR)|·M in the input's units
    zf = V.from_slices(np.abs(kspace.zero_fill(V.to_slices(lr.data, axis), 64)), axis)
    mask = out.mask.data > 0
    assert mask.any() and not mask.all()
    np.testing.assert_allclose(out.sr.data[..., 0], zf * mask, rtol=1e-4, atol=1e-4)
    # the zero-filled output keeps the input's sign: the real part of the zero-fill, not its magnitude
    zf_real = V.from_slices(np.real(kspace.zero_fill(V.to_slices(lr.data, axis), 64)), axis)
    np.testing.assert_allclose(out.zero_filled.data[..., 0], zf_real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.uncertainty.data[..., 0], 0.1 * zf * mask, rtol=1e-4, atol=1e-4)
    # the blob's maximum is where it is in physical space (within one output voxel)
    peak = np.unravel_index(np.argmax(out.zero_filled.data[..., 0]), grid.shape)
    assert np.linalg.norm(V.grid_centres(grid.affine, grid.shape)[peak] - [4.0, -6.0, 3.0]) < 3.4 * 1.5
    # the condition fed to the model: [LR, M, T1, FLAIR] with MRI in [0, 1] and s = 4
    cond, scale, kw = model.calls[0]
    assert cond.shape[1:] == (4, 64, 64) and torch.all(scale == 4.0) and kw["n_samples"] == 2
    assert 0 <= float(cond[:, 2:].min()) and float(cond[:, 2:].max()) <= 1


def test_several_metabolites_are_one_batch_and_keep_their_order():
    lr, t1, flair = oblique_case()
    second = V.Volume(lr.data * 3.0, lr.affine, "cho.nii.gz")
    model = IdentityModel()
    out = super_resolve([lr, second], t1, flair, model=model, samples=1)
    assert len(model.calls) == 1 and out.sr.data.shape[-1] == 2
    np.testing.assert_allclose(out.sr.data[..., 1], 3.0 * out.sr.data[..., 0], rtol=1e-4, atol=1e-4)


def test_user_mask_is_resampled_and_used():
    lr, t1, flair = oblique_case()
    half = np.zeros(lr.shape, np.float32)
    half[: lr.shape[0] // 2] = 1
    out = super_resolve(lr, t1, flair, V.Volume(half, lr.affine), model=IdentityModel(), samples=1)
    mask = out.mask.data > 0
    assert 0.3 < mask.mean() < 0.7 and out.options["mask"] == "user"
    assert np.all(out.sr.data[..., 0][~mask] == 0)


def test_options_are_validated():
    for bad in (dict(sampler="euler"), dict(samples=0), dict(data_consistency=2.0), dict(tau_d=-1),
                dict(slice_axis=3)):
        with pytest.raises(ValueError):
            SuperResolveOptions(**bad)
    lr, t1, flair = oblique_case()
    with pytest.raises(ValueError, match="T1 and FLAIR"):
        super_resolve(lr, None, flair, model=IdentityModel())


def test_t1_outside_the_mrsi_field_of_view_is_refused():
    lr, t1, flair = oblique_case()
    far = t1.affine.copy()
    far[:3, 3] += 500.0
    with pytest.raises(ValueError, match="covers only"):
        super_resolve(lr, V.Volume(t1.data, far, "t1.nii.gz"), flair, model=IdentityModel())


def test_lr_matrix_outside_the_trained_range():
    lr, t1, flair = oblique_case(m=40)
    with pytest.raises(ValueError, match="trained range"):
        super_resolve(lr, t1, flair, model=IdentityModel())


# ------------------------------------------------------------------------- any matrix and factor (issue 11)
def real_scan_case(slices=22):
    """Issue 11's geometry: 32×42×22 at 5×5×5.25 mm, slightly oblique, a smooth blob at a known RAS point."""
    rot = rotation([1, 0.3, 0.2], 8.0)
    shape, spacing = (32, 42, slices), np.array([5.0, 5.0, 5.25])
    aff = np.eye(4)
    aff[:3, :3] = rot * spacing
    aff[:3, 3] = -(rot * spacing) @ ((np.array(shape) - 1) / 2)
    xyz = V.grid_centres(aff, shape)
    blob = 1e3 * (5.0 + 40.0 * np.exp(-np.sum((xyz - [10.0, -20.0, 5.0]) ** 2, -1) / (2 * 15.0 ** 2)))
    _, t1, flair = oblique_case()
    return V.Volume(blob.astype(np.float32), aff, "scan.nii.gz"), t1, flair


def test_rectangular_oblique_scan_at_factor_4_gives_a_128x168_grid_within_a_stated_memory():
    import tracemalloc

    lr, t1, flair = real_scan_case()
    model = IdentityModel()
    tracemalloc.start()
    out = super_resolve(lr, t1, flair, model=model, samples=1, factor=4.0, max_batch=8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    grid = V.target_grid(lr, 2, factor=4.0)
    assert out.sr.shape == (128, 168, 22) and np.allclose(out.sr.affine, grid.affine)
    assert out.options["slice_axis"] == 2 and out.options["factor"] == 4.0 and out.options["scale"] == 4.0
    cond, scale, kw = model.calls[0]
    assert cond.shape == (22, 4, 128, 168) and torch.all(scale == 4.0) and kw["max_batch"] == 8
    zf = V.from_slices(np.abs(kspace.zero_fill(V.to_slices(lr.data, 2), (128, 168))), 2)
    mask = out.mask.data > 0
    assert 0.05 < mask.mean() < 0.95
    np.testing.assert_allclose(out.sr.data[..., 0], zf * mask, rtol=1e-4, atol=1e-4 * zf.max())
    # Memory of the pipeline outside the network (numpy, traced by tracemalloc; measured 37.9 MB): the output
    # grid has V = 22·128·168 = 473 088 voxels per map; the bound 30·4·V bytes (57 MB) is 30 float32 copies
    # of it, the T1/FLAIR resampling (120³ float32, 6.9 MB each) included. The torch tensors (cond 4·V,
    # mean and std V each, float32) are not traced: + 11 MB. The network's own activations are bounded by
    # max_batch images of n1×n2 per call.
    voxels = 22 * 128 * 168
    assert peak < 30 * 4 * voxels, f"peak {peak / 1e6:.1f} MB"


def test_factor_contract_of_super_resolve():
    lr, t1, flair = oblique_case(m=16)
    model = IdentityModel()
    out = super_resolve(lr, t1, flair, model=model, samples=1, factor=2.0)  # overrides 64/m = 4
    assert out.sr.shape == (32, 32, 5) and float(model.calls[-1][1][0]) == 2.0
    assert np.allclose(out.sr.affine, V.target_grid(lr, 2, factor=2.0).affine)
    out = super_resolve(lr, t1, flair, model=model, samples=1, factor=2.5)  # 16 → 40
    assert out.sr.shape == (40, 40, 5) and float(model.calls[-1][1][0]) == 2.5
    with pytest.raises(ValueError, match=r"--factor 10 is outside .*--force"):
        super_resolve(lr, t1, flair, model=model, factor=10.0)
    out = super_resolve(lr, t1, flair, model=model, samples=1, factor=10.0, force=True)
    assert out.sr.shape == (160, 160, 5)
    big, t1, flair = oblique_case(m=40)
    with pytest.raises(ValueError, match=r"trained range.*--factor"):
        super_resolve(big, t1, flair, model=model)
    assert super_resolve(big, t1, flair, model=model, samples=1, factor=2.0).sr.shape == (80, 80, 5)
    scan, t1, flair = real_scan_case(slices=4)
    with pytest.raises(ValueError, match=r"32×42 is not square.*--factor"):
        super_resolve(scan, t1, flair, model=model)


def test_odd_rounded_factor_conditions_on_the_geometric_mean():
    scan, t1, flair = real_scan_case(slices=3)
    odd = V.Volume(scan.data[:31, :41], scan.affine, "odd.nii.gz")  # 31×41 · 2.5 → 78 (77.5 up) × 103 (102.5 up)
    model = IdentityModel()
    out = super_resolve(odd, t1, flair, model=model, samples=1, factor=2.5)
    assert out.sr.shape == (78, 103, 3)
    s = float(model.calls[-1][1][0])
    assert s == pytest.approx(np.sqrt(78 / 31 * 103 / 41)) and out.options["scale"] == pytest.approx(s)
    assert np.allclose(out.sr.affine, V.target_grid(odd, 2, factor=2.5).affine)


def test_a_4d_file_with_one_volume_is_treated_as_3d():
    lr, t1, flair = oblique_case()
    four = V.Volume(lr.data[..., None], lr.affine, "one.nii.gz")
    a = super_resolve(lr, t1, flair, model=IdentityModel(), samples=1)
    b = super_resolve(four, t1, flair, model=IdentityModel(), samples=1)
    assert b.options["inputs"] == ["one.nii.gz"] and b.sr.data.shape == a.sr.data.shape == (64, 64, 5, 1)
    np.testing.assert_array_equal(a.sr.data, b.sr.data)


def test_mask_on_a_finer_rotated_grid_is_resampled_in_physical_space():
    lr, t1, flair = oblique_case()
    maff = np.eye(4)
    maff[:3, :3] = rotation([0.3, -1, 0.6], 33.0) * 1.5  # a 1.5 mm mask grid, rotated against the MRSI
    maff[:3, 3] = -maff[:3, :3] @ np.array([60.0, 60.0, 60.0])
    ball = np.linalg.norm(V.grid_centres(maff, (120, 120, 120)) - [5.0, 8.0, 0.0], axis=-1) < 35.0
    out = super_resolve(lr, t1, flair, V.Volume(ball.astype(np.uint8), maff, "mask.nii.gz"),
                        model=IdentityModel(), samples=1)
    dist = np.linalg.norm(V.grid_centres(out.mask.affine, out.mask.shape) - [5.0, 8.0, 0.0], axis=-1)
    got = out.mask.data > 0
    slack = 1.5 * np.sqrt(3) / 2  # nearest neighbour: within half a mask-voxel diagonal of the sphere
    assert got[dist < 35.0 - slack].all() and not got[dist > 35.0 + slack].any() and got.any()


def test_intensity_units_do_not_change_the_mask_or_the_condition():
    lr, t1, flair = oblique_case()
    model = IdentityModel()
    a = super_resolve(lr, t1, flair, model=model, samples=1)
    b = super_resolve(V.Volume(lr.data * 1e3, lr.affine), t1, flair, model=model, samples=1)
    np.testing.assert_array_equal(a.mask.data, b.mask.data)
    np.testing.assert_allclose(model.calls[1][0].numpy(), model.calls[0][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(b.sr.data, 1e3 * a.sr.data, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    """A synthetic patient's LR NAA/tCho (16×16) with T1, FLAIR and mask as NIfTI files."""
    from ftddm_core.phantom import make_patient

    root = tmp_path_factory.mktemp("exam")
    p = make_patient(7, slices=3)
    paths = {}
    for name in ("NAA", "tCho"):
        paths[name] = V.save_volume(simulate_lr(V.Volume(p.maps[name], p.affine), 16), root / f"{name}.nii.gz")
    paths["t1"] = V.save_volume(V.Volume(p.t1, p.mri_affine), root / "t1.nii.gz")
    paths["flair"] = V.save_volume(V.Volume(p.flair, p.mri_affine), root / "flair.nii.gz")
    paths["mask"] = V.save_volume(V.Volume(p.quality_mask.astype(np.uint8), p.affine), root / "mask.nii.gz")
    paths["hr_affine"] = p.affine
    return paths


def cli(exam, out, model, *extra):
    args = ["super-resolve", "--lr", str(exam["NAA"]), "--lr", str(exam["tCho"]), "--t1", str(exam["t1"]),
            "--flair", str(exam["flair"]), "--out", str(out), "--model", str(model), "--steps", "2", "--t-trunc", "2",
            "--samples", "2", "--device", "cpu", *extra]
    return main(args)


def test_cli_end_to_end_writes_outputs_with_the_hr_geometry(exam, tmp_path, tiny_model_file, capsys):
    out = tmp_path / "out"
    assert cli(exam, out, tiny_model_file, "--mask", str(exam["mask"]), "--ratio", "tCho/NAA") == 0
    names = sorted(p.name for p in out.iterdir())
    expected = sorted([f"{s}_{k}" for s in ("NAA", "tCho") for k in ("sr.nii.gz", "zerofilled.nii.gz",
                                                                     "uncertainty.nii.gz", "run.json")]
                      + ["tCho_over_NAA_sr.nii.gz"])
    assert names == expected  # and no staging folder left behind
    img = nib.load(str(out / "NAA_sr.nii.gz"))
    assert img.shape == (64, 64, 3)
    np.testing.assert_allclose(img.affine, exam["hr_affine"], atol=1e-4)  # inverse of the LR simulation
    sr, unc = img.get_fdata(), nib.load(str(out / "NAA_uncertainty.nii.gz")).get_fdata()
    assert np.isfinite(sr).all() and sr.min() >= 0 and unc.min() >= 0 and unc.max() > 0
    report = json.loads((out / "NAA_run.json").read_text())
    assert report["nfe_per_sample"] == 3 and report["options"]["samples"] == 2
    assert set(report["inputs"]) >= {str(exam["NAA"]), str(exam["t1"]), str(exam["mask"])}
    assert len(report["model"]["sha256"]) == 64
    # running again refuses to overwrite, --overwrite replaces
    assert cli(exam, out, tiny_model_file) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(exam, out, tiny_model_file, "--overwrite") == 0


def test_cli_progress_lines(exam, tmp_path, tiny_model_file, capsys):
    assert cli(exam, tmp_path / "o", tiny_model_file, "--progress-lines") == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("PROGRESS ")]
    assert lines and lines[-1].startswith("PROGRESS 1/1")


def test_interrupted_run_leaves_no_output(exam, tmp_path, tiny_model_file, monkeypatch):
    calls = []
    real = V.save_volume

    def interrupt_on_third(volume, path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(volume, path, **kw)

    monkeypatch.setattr(V, "save_volume", interrupt_on_third)
    out = tmp_path / "out"
    assert cli(exam, out, tiny_model_file) == 130
    assert list(out.iterdir()) == []  # nothing half-written, staging folder removed


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"), ("text", "not"), ("2d", "2D"), ("nan", "NaN"), ("zeros", "every voxel is 0"),
    ("grids", "share one grid"),
])
def test_cli_bad_input_names_the_file(exam, tmp_path, tiny_model_file, capsys, case, message):
    bad = tmp_path / "bad.nii.gz"
    lr = nib.load(str(exam["NAA"]))
    if case == "text":
        bad.write_text("not an image")
    elif case == "2d":
        nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), str(bad))
    elif case == "nan":
        data = lr.get_fdata().astype(np.float32)
        data[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(data, lr.affine), str(bad))
    elif case == "zeros":
        nib.save(nib.Nifti1Image(np.zeros(lr.shape, np.float32), lr.affine), str(bad))
    elif case == "grids":
        nib.save(nib.Nifti1Image(np.ones((12, 12, 3), np.float32), lr.affine), str(bad))
    args = ["super-resolve", "--lr", str(exam["NAA"]), "--lr", str(bad), "--t1", str(exam["t1"]),
            "--flair", str(exam["flair"]), "--out", str(tmp_path / "o"), "--model", str(tiny_model_file)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower() and "bad" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_4d_file_with_one_volume_writes_3d_outputs(exam, tmp_path, tiny_model_file):
    img = nib.load(str(exam["NAA"]))
    four = tmp_path / "NAA4d.nii.gz"
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32)[..., None], img.affine), str(four))
    out = tmp_path / "o"
    assert main(["super-resolve", "--lr", str(four), "--t1", str(exam["t1"]), "--flair", str(exam["flair"]),
                 "--out", str(out), "--model", str(tiny_model_file), "--steps", "1", "--samples", "1",
                 "--device", "cpu"]) == 0
    sr = nib.load(str(out / "NAA4d_sr.nii.gz"))
    assert sr.shape == (64, 64, 3)
    np.testing.assert_allclose(sr.affine, exam["hr_affine"], atol=1e-4)


def test_cli_factor_flag(exam, tmp_path, tiny_model_file, capsys):
    assert cli(exam, tmp_path / "o", tiny_model_file, "--factor", "9") == 2
    err = capsys.readouterr().err
    assert "--factor 9" in err and "--force" in err


def test_the_old_sampler_name_ddpm_is_refused_with_its_new_name():
    with pytest.raises(ValueError, match="'ddpm' was renamed 'respaced'"):
        SuperResolveOptions(sampler="ddpm")
    assert SuperResolveOptions(sampler="respaced").tau_d_has_effect()


def test_the_default_chain_is_the_renoised_short_chain_and_the_flow_start_keeps_the_models_ttrunc():
    lr, t1, flair = oblique_case()
    model = IdentityModel()
    ttrunc = model.config.diffusion.t_trunc
    result = super_resolve(lr, t1, flair, model=model, samples=2)
    kw = model.calls[-1][2]
    assert (kw["start"], kw["t_trunc"], kw["sampler"]) == ("renoised", min(RENOISED_T_TRUNC, ttrunc), "ancestral")
    assert result.options["chain_start_index"] == kw["t_trunc"]
    super_resolve(lr, t1, flair, model=model, samples=2, start="renoised", t_trunc=5, sampler="dpmpp", steps=5)
    assert (model.calls[-1][2]["t_trunc"], model.calls[-1][2]["steps"]) == (5, 5)
    super_resolve(lr, t1, flair, model=model, samples=2, start="flow", sampler="dpmpp")
    assert (model.calls[-1][2]["start"], model.calls[-1][2]["t_trunc"]) == ("flow", ttrunc)
    with pytest.raises(ValueError, match="needs start 'renoised'"):
        SuperResolveOptions(start="flow", t_trunc=10)
    with pytest.raises(ValueError, match="steps.*20.*index t = 10.*--start flow"):
        SuperResolveOptions(sampler="dpmpp", steps=20)
    assert SuperResolveOptions(sampler="dpmpp", steps=20, start="flow").steps == 20
