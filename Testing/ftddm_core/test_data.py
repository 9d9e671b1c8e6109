"""Dataset on disk, loader validation, physical-space resampling, 2D examples, batches and patient folds."""
import json
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from ftddm_core import data, kspace, nifti, phantom
from ftddm_core.config import METABOLITES

SEED, N_PATIENTS, SLICES = 3, 2, 6


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_ds")
    calls = []
    data.write_phantom_dataset(root, patients=N_PATIENTS, seed=SEED, slices=SLICES,
                               progress=lambda done, total, pid: calls.append((done, total, pid)))
    assert calls == [(1, 2, "sub-001"), (2, 2, "sub-002")]
    return root


@pytest.fixture(scope="module")
def loaded(dataset_dir):
    return data.load_dataset(dataset_dir)


@pytest.fixture()
def patient_copy(dataset_dir, tmp_path):
    """A writable copy of sub-001 inside a dataset folder (with dataset.json)."""
    shutil.copy(dataset_dir / "dataset.json", tmp_path / "dataset.json")
    return shutil.copytree(dataset_dir / "sub-001", tmp_path / "sub-001")


# ------------------------------------------------------------------------------------------- on disk
def test_layout_and_dataset_json(dataset_dir):
    meta = json.loads((dataset_dir / "dataset.json").read_text())
    assert meta["metabolites"] == list(METABOLITES) and meta["units"] == "mM" and meta["seed"] == SEED
    assert meta["patients"] == ["sub-001", "sub-002"] and meta["description"]
    files = {p.name for p in (dataset_dir / "sub-001").iterdir()}
    assert files == {f"{m}.nii.gz" for m in METABOLITES} | {"t1.nii.gz", "flair.nii.gz", "mask.nii.gz",
                                                           "lesion.nii.gz", "phantom.json"}
    assert not list(dataset_dir.rglob(".tmp-*"))  # atomic writes leave no temporary files


def test_round_trip_equals_the_phantom(dataset_dir):
    original = phantom.make_patient(phantom.patient_seed(SEED, 0), slices=SLICES, patient_id="sub-001")
    p = data.load_patient(dataset_dir / "sub-001", resample_mri=False)
    for name in METABOLITES:
        np.testing.assert_array_equal(p.maps[name], original.maps[name])
    np.testing.assert_allclose(p.affine, original.affine, atol=1e-4)
    np.testing.assert_allclose(p.mri_affine, original.mri_affine, atol=1e-4)
    np.testing.assert_array_equal(p.t1, original.t1)
    np.testing.assert_array_equal(p.flair, original.flair)
    np.testing.assert_array_equal(p.quality_mask, original.quality_mask)
    np.testing.assert_array_equal(p.lesion, original.lesion)
    assert p.info["phantom"] == json.loads(json.dumps(original.info))
    nii = nib.load(str(dataset_dir / "sub-001" / "NAA.nii.gz"))
    assert nii.header.get_xyzt_units()[0] == "mm" and int(nii.header["sform_code"]) == 1


def test_loaded_patient_on_map_grid(loaded):
    for p in loaded:
        assert p.t1.shape == p.shape and np.allclose(p.mri_affine, p.affine)
        assert not (p.quality_mask & ~p.brain_mask).any()
        assert p.brain_mask.sum() > 0.9 * np.count_nonzero(p.maps["tCr"])  # brain from T1 > 0 ≈ where maps live


def test_refuses_non_empty_folder_unless_overwrite(dataset_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        data.write_phantom_dataset(tmp_path, patients=1, slices=2)
    data.write_phantom_dataset(tmp_path, patients=1, slices=2, overwrite=True)
    assert data.list_patients(tmp_path) == ["sub-001"]


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(img, filename):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        data.save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "NAA.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- validation
def _rewrite(path, array=None, affine=None):
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj) if array is None else array
    nib.save(nib.Nifti1Image(arr, img.affine if affine is None else affine), str(path))


def test_missing_map_is_named(patient_copy):
    (patient_copy / "NAA.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"NAA\.nii\.gz: missing"):
        data.load_patient(patient_copy)


def test_missing_t1_is_named(patient_copy):
    (patient_copy / "t1.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"t1\.nii\.gz: missing"):
        data.load_patient(patient_copy)


def test_shape_mismatch_is_named(patient_copy):
    _rewrite(patient_copy / "Gly.nii.gz", array=np.zeros((64, 64, SLICES + 1), np.float32))
    with pytest.raises(ValueError, match=r"Gly\.nii\.gz: shape .*expected \(64, 64, 6\)"):
        data.load_patient(patient_copy)


def test_affine_mismatch_is_named(patient_copy):
    affine = nib.load(str(patient_copy / "Gln.nii.gz")).affine.copy()
    affine[0, 3] += 1.7
    _rewrite(patient_copy / "Gln.nii.gz", affine=affine)
    with pytest.raises(ValueError, match=r"Gln\.nii\.gz: affine differs"):
        data.load_patient(patient_copy)


def test_nan_map_is_named(patient_copy):
    arr = np.asarray(nib.load(str(patient_copy / "tCho.nii.gz")).dataobj).copy()
    arr[10, 10, 2] = np.nan
    _rewrite(patient_copy / "tCho.nii.gz", array=arr)
    with pytest.raises(ValueError, match=r"tCho\.nii\.gz: 1 NaN"):
        data.load_patient(patient_copy)


def test_empty_or_misplaced_mask_is_named(patient_copy):
    _rewrite(patient_copy / "mask.nii.gz", array=np.zeros((64, 64, SLICES), np.uint8))
    with pytest.raises(ValueError, match=r"mask\.nii\.gz: empty mask"):
        data.load_patient(patient_copy)
    _rewrite(patient_copy / "mask.nii.gz", array=np.ones((32, 32, SLICES), np.uint8))
    with pytest.raises(ValueError, match=r"mask\.nii\.gz: shape"):
        data.load_patient(patient_copy)


def test_without_mask_or_dataset_json(dataset_dir, tmp_path):
    folder = shutil.copytree(dataset_dir / "sub-002", tmp_path / "alone")  # no dataset.json beside it
    (folder / "mask.nii.gz").unlink()
    p = data.load_patient(folder)
    assert p.metabolites == METABOLITES and p.info["mask_from"] == "t1"
    np.testing.assert_array_equal(p.quality_mask, p.brain_mask)


# ------------------------------------------------------------------------------------------- examples
def test_slice_dataset_examples(loaded):
    ds = data.SliceDataset(loaded, augment=True, seed=1)
    total_mask = [(p.quality_mask & p.brain_mask).mean(axis=(0, 1)) for p in loaded]
    assert len(ds) == sum(int((f >= 0.05).sum()) for f in total_mask) * len(METABOLITES)
    for i in range(0, len(ds), max(1, len(ds) // 25)):
        ex = ds[i]
        x0, cond, mask, m = ex["x0"].numpy(), ex["cond"].numpy(), ex["mask"].numpy()[0], ex["lr_size"]
        assert x0.shape == (1, 64, 64) and cond.shape == (4, 64, 64) and m in data.LR_SIZES
        assert ex["scale"] == pytest.approx(64 / m) and mask.mean() >= 0.05
        np.testing.assert_array_equal(cond[1], mask)
        assert np.all(x0[0][mask == 0] == 0) and 0 <= cond[2:].min() and cond[2:].max() <= 1
        # the scale is the 99.5th percentile of |LR_zf| inside M, so the normalised LR has it at 1
        assert np.percentile(cond[0][mask > 0], 99.5) == pytest.approx(1.0, rel=1e-4)


def test_unaugmented_example_restores_physical_units(loaded):
    ds = data.SliceDataset(loaded, lr_size=16)
    ex = ds[5]
    p = next(q for q in loaded if q.patient_id == ex["patient"])
    hr = p.maps[ex["metabolite"]][:, :, ex["slice"]] * (p.quality_mask & p.brain_mask)[:, :, ex["slice"]]
    np.testing.assert_allclose(ex["x0"][0].numpy() * ex["norm"], hr, rtol=1e-5, atol=1e-6)
    # LR channel = the zero-filled magnitude of the m×m map a scanner gives (whole slab, not only M)
    raw = p.maps[ex["metabolite"]][:, :, ex["slice"]].astype(np.float64)
    lr_zf = np.abs(kspace.zero_fill(np.abs(kspace.downsample(raw, 16)), 64))
    np.testing.assert_allclose(ex["cond"][0].numpy() * ex["norm"], lr_zf, rtol=1e-4, atol=1e-4)
    assert ex["lr_size"] == 16 and ds[(5, 10)]["lr_size"] == 10


def test_augmentation_is_one_transform_on_every_channel(loaded):
    plain = data.SliceDataset(loaded, lr_size=12)
    aug = data.SliceDataset(loaded, lr_size=12, augment=True, seed=4)
    for i in (0, 7, 30):
        a, b = plain[i], aug[i]
        found = False
        for k in range(4):
            for flip in (False, True):
                for sx in range(-3, 4):
                    for sy in range(-3, 4):
                        def t(img):
                            img = np.rot90(img, k, axes=(-2, -1))
                            return np.roll(img[..., ::-1] if flip else img, (sx, sy), axis=(-2, -1))
                        if np.array_equal(t(a["cond"][1:].numpy()), b["cond"][1:].numpy()):
                            np.testing.assert_allclose(t(a["x0"].numpy()) * a["norm"], b["x0"].numpy() * b["norm"],
                                                       rtol=1e-5, atol=1e-6)
                            found = True
        assert found


def test_scale_does_not_look_at_hr_beyond_the_kspace_centre(loaded):
    p = loaded[0]
    z = p.shape[2] // 2
    hr, t1, flair = p.maps["NAA"][:, :, z], np.zeros((64, 64)), np.zeros((64, 64))
    m = 16
    rng = np.random.default_rng(0)
    spectrum = rng.normal(size=(64, 64)) + 1j * rng.normal(size=(64, 64))
    spectrum[32 - m // 2: 32 + m // 2 + 1, 32 - m // 2: 32 + m // 2 + 1] = 0  # block ∪ its mirror stays empty
    detail = 3.0 * np.real(kspace.ifft2c(spectrum))
    assert np.abs(kspace.truncate_kspace(kspace.fft2c(detail), m)).max() < 1e-9
    ones = np.ones((64, 64))
    a = data.make_example(hr, ones, t1, flair, m)
    b = data.make_example(hr + detail, ones, t1, flair, m)
    assert b["norm"] == pytest.approx(a["norm"], rel=1e-9)
    np.testing.assert_allclose(b["cond"], a["cond"], atol=1e-5)
    assert not np.allclose(b["x0"], a["x0"], atol=1e-3)
    # The target is zero outside M while the LR keeps all of the slab's signal, as a scanner's LR map does.
    mask = (p.quality_mask & p.brain_mask)[:, :, z].astype(float)
    c = data.make_example(hr, mask, t1, flair, m)
    assert np.all(c["x0"][0][mask == 0] == 0)


def test_batches_share_one_lr_size(loaded):
    # paper: one LR size m per batch, drawn from 8…32 on the 64×64 grid; scale s = 64/m for every example
    src = data.BatchSource(data.SliceDataset(loaded, augment=True))
    sizes = set()
    for seed in range(12):
        scale = src.sample_batch(4, torch.Generator().manual_seed(seed))["scale"].double()
        assert len(set(scale.tolist())) == 1
        m = round(64.0 / float(scale[0]))
        assert torch.allclose(scale, torch.full_like(scale, 64.0 / m))
        sizes.add(m)
    assert len(sizes) > 3 and sizes <= set(data.LR_SIZES)


def test_dataset_rejects_wrong_grid(loaded):
    # Any in-plane grid is accepted now (examples are tiled); a grid too small for a 4×4 LR is refused.
    tiny = replace(loaded[0], maps={m: v[:6, :6] for m, v in loaded[0].maps.items()}, t1=loaded[0].t1[:6, :6],
                   flair=loaded[0].flair[:6, :6], quality_mask=loaded[0].quality_mask[:6, :6],
                   brain_mask=loaded[0].brain_mask[:6, :6])
    with pytest.raises(ValueError, match="in-plane"):
        data.SliceDataset([tiny])
    with pytest.raises(ValueError, match="LR size"):
        data.make_example(np.zeros((64, 64)), np.ones((64, 64)), np.zeros((64, 64)), np.zeros((64, 64)), 65)
    with pytest.raises(ValueError, match="square"):
        data.make_example(np.zeros((40, 64)), np.ones((40, 64)), np.zeros((40, 64)), np.zeros((40, 64)), 16)


# ------------------------------------------------------------------------------------- any grid, tiles
def synthetic_patient(shape, seed=0, gain=1.0):
    """A patient on an arbitrary map grid (T1/FLAIR on the same grid): smooth map, elliptic brain."""
    rng = np.random.default_rng(seed)
    n1, n2, s = shape
    x, y = np.meshgrid(np.linspace(-1, 1, n1), np.linspace(-1, 1, n2), indexing="ij")
    brain = np.repeat(((x / 0.8) ** 2 + (y / 0.7) ** 2 < 1)[:, :, None], s, axis=2)
    maps = {m: (gain * (ndimage_smooth(rng.random(shape)) * brain + 3 * (~brain) * rng.random(shape))).astype(np.float32)
            for m in ("NAA", "tCho")}
    t1 = (brain * (0.5 + rng.random(shape))).astype(np.float32)
    aff = np.diag([5.0, 5.0, 6.0, 1.0])
    return phantom.Patient("syn", maps, aff, t1, t1.copy(), aff.copy(), brain.copy(), brain.copy())


def ndimage_smooth(a):
    from scipy import ndimage
    return ndimage.gaussian_filter(a, 2.0) * 10


@pytest.mark.parametrize("shape,tile", [((45, 71, 3), 64), ((27, 33, 3), 64), ((80, 58, 3), 32)])
def test_tiles_of_any_grid_hold_the_global_derivation(shape, tile):
    p = synthetic_patient(shape)
    ds = data.SliceDataset([p], image_size=tile, augment=False, factor_range=(2, 8))
    for factor in (2.0, 3.3, 8.0):
        ex = ds[(1, factor)]
        name, z = ex["metabolite"], ex["slice"]
        hr, mask = p.maps[name][:, :, z].astype(np.float64), p.quality_mask[:, :, z]
        m = tuple(max(int(np.floor(n / factor + 0.5)), 4) for n in shape[:2])
        assert ex["lr_shape"] == m and ex["x0"].shape == (1, tile, tile) and ex["cond"].shape == (4, tile, tile)
        assert ex["scale"] == pytest.approx(np.sqrt(shape[0] * shape[1] / (m[0] * m[1])))
        # the LR of the whole slice (lipid and all), zero-filled onto the full slice, then the same window
        lr_zf = np.abs(kspace.zero_fill(np.abs(kspace.downsample(hr, m)), shape[:2]))
        o1, o2 = ex["tile_origin"]
        full = np.zeros((tile, tile)), np.zeros((tile, tile)), np.zeros((tile, tile))
        for dst, src in zip(full, (lr_zf, hr * mask, mask)):
            for i in range(tile):
                for j in range(tile):
                    if 0 <= i + o1 < shape[0] and 0 <= j + o2 < shape[1]:
                        dst[i, j] = src[i + o1, j + o2]
        np.testing.assert_allclose(ex["cond"][0].numpy() * ex["norm"], full[0], rtol=1e-4, atol=1e-4 * lr_zf.max())
        np.testing.assert_allclose(ex["x0"][0].numpy() * ex["norm"], full[1], rtol=1e-5, atol=1e-5 * hr.max())
        np.testing.assert_array_equal(ex["cond"][1].numpy(), full[2])
        # scale from the whole slice's LR inside M, never from the HR map
        assert ex["norm"] == pytest.approx(np.percentile(lr_zf[mask], 99.5), rel=1e-5)
        assert ex["mask"].sum() > 0


def test_random_tiles_prefer_the_mask_and_batches_are_reproducible():
    p = synthetic_patient((80, 76, 4), seed=1)
    ds = data.SliceDataset([p], image_size=32, augment=True, factor_range=(2, 8))
    src = data.BatchSource(ds)
    a = src.sample_batch(6, torch.Generator().manual_seed(3))
    b = src.sample_batch(6, torch.Generator().manual_seed(3))
    assert a["x0"].shape == (6, 1, 32, 32) and a["cond"].shape == (6, 4, 32, 32) and a["scale"].shape == (6,)
    assert all(v.dtype == torch.float32 for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert len(set(a["scale"].tolist())) >= 1 and 1.9 < float(a["scale"].min()) and float(a["scale"].max()) < 9
    assert all(float(c[1].mean()) > 0.2 for c in a["cond"])  # crops land on the brain (mask)
    factors = {round(float(src.sample_batch(1, torch.Generator().manual_seed(s))["scale"][0]), 1) for s in range(8)}
    assert len(factors) > 4  # F ~ U(2, 8) per batch


def test_gain_does_not_change_the_normalised_example():
    from ftddm_core import invivo

    seed = phantom.patient_seed(4, 0)
    a = invivo.make_invivo_patient(seed, gain=1.0)
    b = invivo.make_invivo_patient(seed, gain=2500.0)
    da = data.SliceDataset([a], image_size=48, augment=True, seed=5, factor_range=(2, 8))
    db = data.SliceDataset([b], image_size=48, augment=True, seed=5, factor_range=(2, 8))
    for i in (0, len(da) // 2, len(da) - 1):
        ea, eb = da[(i, 3.0)], db[(i, 3.0)]
        assert eb["norm"] == pytest.approx(2500.0 * ea["norm"], rel=1e-5)
        torch.testing.assert_close(ea["x0"], eb["x0"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ea["cond"], eb["cond"], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def invivo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("invivo_ds")
    data.write_phantom_dataset(root, patients=3, seed=2, realism="invivo", kind="mixed")
    return root


def test_invivo_dataset_on_disk_and_training_sources(invivo_dir):
    meta = data.read_dataset_json(invivo_dir)
    assert meta["units"] == "a.u." and meta["kind"] == "mixed" and meta["generator"] == "ftddm_core.invivo"
    p = data.load_patient(invivo_dir / "sub-001")
    assert p.shape[:2] != (64, 64) and (p.maps["NAA"][~p.brain_mask] != 0).any()  # acquired map, lipid kept
    train, val, info = data.training_sources(invivo_dir, fold=0, seed=0)
    assert info["factor_range"] == [2.0, 8.0] and info["tile"] == 64
    batch = train.sample_batch(4, torch.Generator().manual_seed(0))
    assert batch["x0"].shape == (4, 1, 64, 64) and batch["cond"].shape == (4, 4, 64, 64)
    # the target is the stored map × M (lipid excluded): zero wherever the mask channel is zero
    assert torch.all(batch["x0"][:, 0][batch["cond"][:, 1] == 0] == 0)
    assert val.sample_batch(2, torch.Generator().manual_seed(0))["scale"].shape == (2,)


def test_units_must_be_known(invivo_dir, tmp_path):
    meta = json.loads((invivo_dir / "dataset.json").read_text())
    meta["units"] = "g/L"
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="units"):
        data.read_dataset_json(tmp_path)
    with pytest.raises(ValueError, match="realism"):
        data.write_phantom_dataset(tmp_path / "x", patients=1, realism="photoreal")


# ------------------------------------------------------------------------------------------- folds
def test_patient_folds_15_5_5_disjoint_and_covering():
    ids = [f"sub-{i:03d}" for i in range(1, 26)]
    tests = []
    for fold in range(5):
        train, val, test = data.patient_folds(ids, k=5, fold=fold, seed=0)
        assert (len(train), len(val), len(test)) == (15, 5, 5)
        assert set(train) | set(val) | set(test) == set(ids)
        assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
        tests += test
    assert sorted(tests) == ids  # every patient is tested exactly once across the folds
    assert data.patient_folds(ids, fold=2, seed=0) == data.patient_folds(ids, fold=2, seed=0)
    assert data.patient_folds(ids, fold=2, seed=0) != data.patient_folds(ids, fold=2, seed=1)
    with pytest.raises(ValueError, match="fold"):
        data.patient_folds(ids, fold=5)
    with pytest.raises(ValueError, match="unique"):
        data.patient_folds(ids + ids[:1])
