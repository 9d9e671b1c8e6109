"""The numpy NIfTI reader/writer against nibabel (an independent implementation of the standard)."""
import gzip
import os
import stat

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from MRSISuperResolutionLib import niftiio


def oblique(seed, left_handed=False, shear=False):
    rng = np.random.default_rng(seed)
    a = np.eye(4)
    a[:3, :3] = Rotation.random(random_state=seed).as_matrix() * rng.uniform(0.8, 14, 3)
    if left_handed:
        a[:3, 0] *= -1
    if shear:
        a[0, 1] += 2.5
    a[:3, 3] = rng.uniform(-120, 120, 3)
    return a


CASES = [(np.float32, False, False, ".nii.gz"), (np.int16, True, False, ".nii"),
         (np.uint8, False, True, ".nii.gz"), (np.float64, True, True, ".nii")]


@pytest.mark.parametrize("dtype, left, shear, suffix", CASES)
def test_written_files_read_back_identically_by_nibabel(tmp_path, dtype, left, shear, suffix):
    rng = np.random.default_rng(7)
    data = (rng.random((5, 6, 7)) * 100).astype(dtype)
    affine = oblique(11, left, shear)
    path = niftiio.write_nifti(tmp_path / f"x{suffix}", data, affine)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_allclose(img.header.get_sform(), affine, atol=1e-4)  # stored as float32
    qform, code = img.header.get_qform(coded=True)
    if shear:
        assert code == 0  # a qform cannot hold a shear; readers must use the sform
    else:
        assert code == 1
        np.testing.assert_allclose(qform, affine, atol=1e-3)


@pytest.mark.parametrize("left, shear", [(False, False), (True, False), (False, True)])
def test_reads_nibabel_files_with_their_affine(tmp_path, left, shear):
    rng = np.random.default_rng(3)
    data = rng.random((4, 5, 6, 2)).astype(np.float32)
    affine = oblique(5, left, shear)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "n.nii.gz"))
    got, got_affine = niftiio.read_nifti(tmp_path / "n.nii.gz")
    np.testing.assert_array_equal(got, data)
    np.testing.assert_allclose(got_affine, affine, atol=1e-4)


def test_qform_only_and_scaled_data_match_nibabel(tmp_path):
    affine = oblique(9, left_handed=True)
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), affine)
    img.set_sform(None, code=0)
    img.set_qform(affine, code=1)
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, str(tmp_path / "q.nii"))
    ref = nib.load(str(tmp_path / "q.nii"))
    data, got_affine = niftiio.read_nifti(tmp_path / "q.nii")
    np.testing.assert_allclose(data, ref.get_fdata(), rtol=1e-6)
    assert data.dtype == np.float32
    np.testing.assert_allclose(got_affine, ref.affine, atol=1e-4)


def test_big_endian_files_are_read(tmp_path):
    data = np.arange(60, dtype=">f4").reshape(3, 4, 5)
    header = nib.Nifti1Header(endianness=">")
    img = nib.Nifti1Image(data, np.diag([2, 3, 4, 1.0]), header=header)
    nib.save(img, str(tmp_path / "be.nii"))
    assert nib.load(str(tmp_path / "be.nii")).header.endianness == ">"
    got, affine = niftiio.read_nifti(tmp_path / "be.nii")
    np.testing.assert_array_equal(got, data.astype("<f4"))
    np.testing.assert_allclose(affine, np.diag([2, 3, 4, 1.0]))


def test_gzip_output_is_reproducible(tmp_path):
    data = np.ones((3, 3, 3), np.float32)
    a = niftiio.write_nifti(tmp_path / "a.nii.gz", data, np.eye(4)).read_bytes()
    b = niftiio.write_nifti(tmp_path / "sub" / "b.nii.gz", data, np.eye(4)).read_bytes()
    assert a == b  # no timestamp or file name inside the gzip stream


def test_errors_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        niftiio.write_nifti(tmp_path / "x.nrrd", np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="3D"):
        niftiio.write_nifti(tmp_path / "x.nii", np.zeros((2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="unsupported data type"):
        niftiio.write_nifti(tmp_path / "x.nii", np.zeros((2, 2, 2), np.complex64), np.eye(4))
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"x" * 400))
    with pytest.raises(ValueError, match="NIfTI-1"):
        niftiio.read_nifti(tmp_path / "junk.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["junk.nii.gz"]  # failed writes leave nothing behind


def test_written_files_get_the_mode_of_a_normally_created_file(tmp_path):
    # through ftddm_core.atomic: a temporary from mkstemp alone would stay 0o600, unreadable to colleagues
    old = os.umask(0o022)
    try:
        path = niftiio.write_nifti(tmp_path / "m.nii.gz", np.ones((2, 2, 2), np.uint8), np.eye(4))
        plain = tmp_path / "plain.txt"
        plain.write_text("reference")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz", "plain.txt"]
