"""nifti: the one NIfTI writer/reader, checked with nibabel's own header reading as the independent reader."""
import nibabel as nib
import numpy as np
import pytest

from ftddm_core import data, nifti
from ftddm_core import volume as V

# A sheared voxel → RAS affine: columns not orthogonal, so no qform (rotation × zooms) can represent it.
# Every entry is exact in float32 (the header's storage), so the round trip can be checked for equality.
SHEARED = np.array([[2.0, 0.5, 0.0, -10.25],
                    [0.0, 3.0, 0.25, 5.5],
                    [0.0, 0.0, 4.0, 1.5],
                    [0.0, 0.0, 0.0, 1.0]])


def test_sheared_affine_round_trips_exactly_with_the_qform_unset(tmp_path):
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5) / 7
    path = nifti.save_nifti(arr, SHEARED, tmp_path / "s.nii.gz")
    img = nib.load(str(path))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 0
    np.testing.assert_array_equal(img.get_sform(), SHEARED)
    np.testing.assert_array_equal(img.affine, SHEARED)  # nibabel: the sform wins, no qform to disagree with it
    back, affine = nifti.read_nifti(path)
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_array_equal(affine, SHEARED)


def test_datasets_and_super_resolve_write_through_the_same_writer(tmp_path):
    # data.py (training datasets) and volume.py (super-resolve outputs) must agree on qform for a shear: unset
    arr = np.ones((3, 4, 5), np.float32)
    data.save_nifti(arr, SHEARED, tmp_path / "d.nii.gz")
    V.save_volume(V.Volume(arr, SHEARED), tmp_path / "v.nii.gz")
    for name in ("d.nii.gz", "v.nii.gz"):
        img = nib.load(str(tmp_path / name))
        assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 1, name
        np.testing.assert_array_equal(img.affine, SHEARED)
        np.testing.assert_array_equal(V.load_volume(tmp_path / name).affine, SHEARED)


def test_oblique_affine_without_shear_sets_the_qform_too(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[2 * c, -3 * s, 0, 1.0], [2 * s, 3 * c, 0, 2.0], [0, 0, -4.0, 3.0], [0, 0, 0, 1]])
    img = nib.load(str(nifti.save_nifti(np.zeros((2, 2, 2), np.uint8), affine, tmp_path / "o.nii")))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    assert img.get_data_dtype() == np.uint8  # the writer keeps the dtype (masks and labels stay integers)


def test_reader_names_the_file_and_what_was_expected(tmp_path):
    bad = tmp_path / "t1.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match=r"t1\.nii\.gz: not a readable NIfTI image .*expected the T1 image"):
        nifti.read_nifti(bad, expected="the T1 image")
