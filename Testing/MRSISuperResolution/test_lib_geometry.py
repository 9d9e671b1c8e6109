"""Array order, affines, slice axis and upscaling factor — checked against ftddm_core.volume (the engine)."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from MRSISuperResolutionLib import geometry


def random_affine(rng, spacing=None, oblique=True):
    rot = Rotation.random(random_state=rng.integers(1 << 30)).as_matrix() if oblique else np.eye(3)
    a = np.eye(4)
    a[:3, :3] = rot * (spacing if spacing is not None else rng.uniform(0.5, 15, 3))
    a[:3, 3] = rng.uniform(-100, 100, 3)
    return a


def test_slicer_order_round_trip_matches_voxel_indexing():
    rng = np.random.default_rng(0)
    kji = rng.random((4, 5, 6))
    ijk = geometry.kji_to_ijk(kji)
    assert ijk.shape == (6, 5, 4)
    assert ijk[5, 1, 2] == kji[2, 1, 5]  # voxel (i, j, k) = (5, 1, 2)
    np.testing.assert_array_equal(geometry.ijk_to_kji(ijk), kji)
    assert geometry.kji_to_ijk(rng.random((2, 3, 4, 7))).shape == (4, 3, 2, 7)
    with pytest.raises(ValueError, match="3D"):
        geometry.kji_to_ijk(np.zeros((3, 3)))


def test_world_affine_applies_parent_after_ijk_to_ras():
    rng = np.random.default_rng(1)
    ijk_to_ras, parent = random_affine(rng), random_affine(rng, spacing=np.ones(3))
    world = geometry.world_affine(ijk_to_ras, parent)
    p = np.array([3.0, 1.0, 2.0, 1.0])
    np.testing.assert_allclose(world @ p, parent @ (ijk_to_ras @ p))
    np.testing.assert_array_equal(geometry.world_affine(ijk_to_ras), ijk_to_ras)


@pytest.mark.parametrize("bad, message", [
    (np.eye(3), "4×4"), (np.diag([1, 1, 0, 1.0]), "invertible"),
    (np.full((4, 4), np.nan), "finite"), (np.ones((4, 4)), "last row")])
def test_check_affine_rejects_bad_matrices(bad, message):
    with pytest.raises(ValueError, match=message):
        geometry.check_affine(bad)


def test_lps_ras_flip_is_an_involution_and_negates_x_y():
    a = random_affine(np.random.default_rng(2))
    flipped = geometry.lps_to_ras(a)
    np.testing.assert_allclose(flipped[:2], -a[:2])
    np.testing.assert_allclose(flipped[2:], a[2:])
    np.testing.assert_allclose(geometry.lps_to_ras(flipped), a)


SHAPES = [(16, 16, 10), (10, 16, 16), (16, 10, 16), (16, 16, 16), (24, 16, 8), (32, 32, 1), (12, 12, 12), (8, 16, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_slice_axis_and_factor_agree_with_the_engine(shape):
    vol = pytest.importorskip("ftddm_core.volume")
    rng = np.random.default_rng(sum(shape))
    for trial in range(6):
        spacing = rng.choice([3.4, 6.8, 10.0, 13.6], 3)
        if trial % 2 == 0 and shape[0] != shape[1]:  # equal in-plane FOVs with a non-square matrix
            spacing[1] = spacing[0] * shape[0] / shape[1]
        affine = random_affine(rng, spacing=spacing, oblique=trial > 1)
        engine = vol.Volume(np.ones(shape, np.float32), affine)
        axis = geometry.detect_slice_axis(shape, affine)
        assert axis == vol.slice_axis(engine)
        # the default grid (no --factor): the same factor, or the same refusal, as the engine's
        try:
            grid = vol.target_grid(engine, axis, 64)
        except ValueError as refused:
            with pytest.raises(ValueError) as ours:
                geometry.detect_upscaling_factor(shape, affine)
            assert str(ours.value) == str(refused).removeprefix("<array>: ")
        else:
            assert geometry.detect_upscaling_factor(shape, affine) == (axis, grid.lr_matrix, grid.factor)


@pytest.mark.parametrize("shape", SHAPES)
def test_output_grid_with_a_factor_agrees_with_the_engine(shape):
    """Any in-plane matrix with F: the same (m1, m2) → (n1, n2) and realised s as ftddm_core.volume.target_grid."""
    vol = pytest.importorskip("ftddm_core.volume")
    rng = np.random.default_rng(7 + sum(shape))
    affine = random_affine(rng, spacing=rng.choice([3.4, 6.8, 10.0], 3), oblique=True)
    axis = geometry.detect_slice_axis(shape, affine)
    for factor in (2.0, 2.5, 3.0, 7.5):
        engine = vol.target_grid(vol.Volume(np.ones(shape, np.float32), affine), axis, 64, factor=factor)
        ours = geometry.output_grid(shape, affine, factor)
        assert (ours.axis, ours.lr_inplane, ours.inplane, ours.factor, ours.scale) == \
            (engine.axis, engine.lr_inplane, engine.inplane, engine.requested_factor, engine.factor)
        assert all(n == int(np.floor(factor * m + 0.5)) for m, n in zip(ours.lr_inplane, ours.inplane))


def test_output_grid_of_a_rectangular_scan_and_the_automatic_refusal():
    affine = np.diag([10.0, 10.0, 20.0, 1.0])
    grid = geometry.output_grid((24, 20, 4), affine, 3.0)
    assert (grid.axis, grid.lr_inplane, grid.inplane, grid.scale) == (2, (24, 20), (72, 60), 3.0)
    with pytest.raises(ValueError, match="not square"):
        geometry.output_grid((24, 20, 4), affine)
    with pytest.raises(ValueError, match="outside the model's trained range"):
        geometry.output_grid((24, 20, 4), affine, 9.0)
    assert geometry.output_grid((24, 20, 4), affine, 9.0, force=True).inplane == (216, 180)
    assert geometry.AUTOMATIC_MATRICES == (8, 32)  # 64/8 … 64/2


def test_factor_rejects_high_resolution_inputs_and_honours_override():
    assert geometry.detect_upscaling_factor((16, 16, 8), np.eye(4)) == (2, 16, 4.0)
    assert geometry.detect_upscaling_factor((16, 16, 16), np.eye(4), slice_axis=0) == (0, 16, 4.0)
    with pytest.raises(ValueError, match="cannot be zero-filled onto the default 64×64"):
        geometry.detect_upscaling_factor((128, 128, 4), np.eye(4))
    with pytest.raises(ValueError, match="not square.*--factor"):
        geometry.detect_upscaling_factor((16, 12, 4), np.diag([3.0, 4.0, 5.0, 1.0]))
    with pytest.raises(ValueError, match="slice axis"):
        geometry.detect_upscaling_factor((16, 16, 8), np.eye(4), slice_axis=3)


def test_same_grid_and_slice_centre():
    a = random_affine(np.random.default_rng(3))
    assert geometry.same_grid((8, 8, 4), a, (8, 8, 4), a + 1e-9)
    assert not geometry.same_grid((8, 8, 4), a, (8, 8, 5), a)
    shifted = a.copy()
    shifted[:3, 3] += 0.5
    assert not geometry.same_grid((8, 8, 4), a, (8, 8, 4), shifted)
    centre = geometry.slice_centre_ras((8, 6, 4), a, 2, 3)
    np.testing.assert_allclose(centre, a[:3, :3] @ [3.5, 2.5, 3] + a[:3, 3])
    with pytest.raises(ValueError, match="outside"):
        geometry.slice_centre_ras((8, 6, 4), a, 2, 4)
