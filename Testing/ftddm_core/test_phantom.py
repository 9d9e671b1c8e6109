"""Synthetic glioma phantom: shapes, determinism, literature concentrations, lesion and MRI contrast, masks."""
import numpy as np
import pytest
from scipy import ndimage

from ftddm_core import data, phantom
from ftddm_core.config import METABOLITES

SEED, SLICES = 5, 8


@pytest.fixture(scope="module")
def cohort():
    return phantom.make_patients(2, seed=SEED, slices=SLICES)


def world_x(p):
    """RAS x (mm) of every map voxel, computed from the affine."""
    i = np.arange(p.shape[0], dtype=float)
    return np.broadcast_to((p.affine[0, 0] * i + p.affine[0, 3])[:, None, None], p.shape)


def regions(p):
    """Normal WM / GM / CSF voxels away from the lesion, tumour voxels, contralateral normal WM."""
    lesion_zone = ndimage.binary_dilation(p.lesion > 0, iterations=2)
    normal = p.brain_mask & ~lesion_zone
    tumour = np.isin(p.lesion, (1, 2))
    side = np.sign(world_x(p)[tumour].mean())
    wm = normal & (p.tissue["wm"] > 0.9)
    return {"wm": wm, "gm": normal & (p.tissue["gm"] > 0.6), "csf": normal & (p.tissue["csf"] > 0.7),
            "tumour": tumour, "contra_wm": wm & (np.sign(world_x(p)) != side)}


def test_shapes_and_geometry(cohort):
    for p in cohort:
        assert tuple(p.maps) == METABOLITES
        assert p.shape == (64, 64, SLICES)
        for hr in p.maps.values():
            assert hr.dtype == np.float32 and hr.shape == p.shape and np.all(np.isfinite(hr)) and hr.min() >= 0
            assert np.all(hr[~p.brain_mask] == 0)  # true concentrations inside the brain, 0 outside
        np.testing.assert_allclose(np.abs(np.diag(p.affine)[:3]), 3.4)
        assert p.t1.shape == p.flair.shape and p.t1.shape[:2] == (128, 128)
        np.testing.assert_allclose(np.linalg.norm(p.mri_affine[:3, :3], axis=0), 1.7)
        assert not np.allclose(p.mri_affine, p.affine)  # T1/FLAIR live on their own grid
        assert p.quality_mask.dtype == bool and p.brain_mask.dtype == bool
        assert set(np.unique(p.lesion)) <= {0, 1, 2, 3} and (p.lesion == 2).any()
        total = p.tissue["gm"] + p.tissue["wm"] + p.tissue["csf"]
        assert np.all(total[p.brain_mask] <= 1.0 + 1e-5)


def test_determinism_per_seed():
    a, b = phantom.make_patient(7, slices=4), phantom.make_patient(7, slices=4)
    c = phantom.make_patient(8, slices=4)
    for name in METABOLITES:
        np.testing.assert_array_equal(a.maps[name], b.maps[name])
        assert not np.array_equal(a.maps[name], c.maps[name])
    for field in ("t1", "flair", "quality_mask", "brain_mask", "lesion", "affine", "mri_affine"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.info == b.info


def test_cohort_patient_is_its_spawned_seed(cohort):
    child = np.random.SeedSequence(SEED).spawn(2)[1]
    again = phantom.make_patient(child, slices=SLICES, patient_id="sub-002")
    np.testing.assert_array_equal(again.maps["NAA"], cohort[1].maps["NAA"])
    assert cohort[0].patient_id == "sub-001" and not np.array_equal(cohort[0].t1, cohort[1].t1)


def test_normal_tissue_concentrations_match_literature_table(cohort):
    # Tissue regression (conc = c_GM·f_GM + c_WM·f_WM + c_CSF·f_CSF over normal voxels), as in quantitative MRS.
    for p in cohort:
        normal = p.brain_mask & (p.lesion == 0)
        design = np.stack([p.tissue[t][normal] for t in ("gm", "wm", "csf")], axis=1)
        for name in METABOLITES:
            c_gm, c_wm, c_csf = np.linalg.lstsq(design, p.maps[name][normal], rcond=None)[0]
            for tissue, fitted in (("gm", c_gm), ("wm", c_wm)):
                lo, hi = phantom.NORMAL_CONCENTRATIONS_MM[name][tissue]
                assert 0.95 * lo <= fitted <= 1.05 * hi, (p.patient_id, name, tissue, fitted)
            assert abs(c_csf) < 0.15 * c_wm  # CSF holds ~no metabolites
            assert c_gm == pytest.approx(p.info["concentrations_gm_mM"][name], rel=0.05)


def test_lesion_changes_against_contralateral_white_matter(cohort):
    for p in cohort:
        r = regions(p)
        assert r["contra_wm"].sum() > 100 and r["tumour"].sum() > 20
        med = lambda name, sel: np.median(p.maps[name][sel])  # noqa: E731
        assert med("tCho", p.lesion == 2) > 1.3 * med("tCho", r["contra_wm"])
        assert med("NAA", r["tumour"]) < 0.6 * med("NAA", r["contra_wm"])
        assert med("tCr", r["tumour"]) < med("tCr", r["contra_wm"])
        assert med("Gly", p.lesion == 2) > med("Gly", r["contra_wm"])
        assert med("NAA", p.lesion == 3) < med("NAA", r["contra_wm"])  # edema: mild NAA loss
        if (p.lesion == 1).sum() >= 20:
            for name in METABOLITES:  # necrotic core: everything low
                assert med(name, p.lesion == 1) < 0.6 * med(name, r["contra_wm"])


def test_quality_mask_inside_brain_without_skull_rim(cohort):
    for p in cohort:
        q, brain = p.quality_mask, p.brain_mask
        assert q.any() and q.sum() > 0.5 * brain.sum()
        assert not (q & ~brain).any()
        for z in range(p.shape[2]):  # in-plane brain edge (lipid bleed) never passes quality control
            edge = brain[:, :, z] & ~ndimage.binary_erosion(brain[:, :, z])
            assert not (q[:, :, z] & edge).any()
        interior = ndimage.binary_erosion(brain, iterations=3)
        assert 0.005 < (interior & ~q).sum() / interior.sum() < 0.5  # B0 regions / low-SNR voxels removed


def test_mri_contrast_ordering(cohort):
    for p in cohort:
        r, m = regions(p), data.to_map_grid(p)
        fl, t1 = m.flair, m.t1
        med = lambda img, sel: float(np.median(img[sel]))  # noqa: E731
        assert med(fl, p.lesion == 3) > 1.2 * med(fl, r["wm"])  # FLAIR: edema bright
        assert med(fl, r["gm"]) > med(fl, r["wm"]) > med(fl, r["csf"])  # CSF suppressed, GM > WM
        assert med(t1, r["wm"]) > med(t1, r["gm"]) > med(t1, r["csf"])  # T1 contrast of the template
        if (p.lesion == 1).sum() >= 20:
            assert med(t1, p.lesion == 1) < med(t1, r["wm"])  # necrotic core dark on T1


def test_mri_and_map_grids_see_the_same_anatomy(cohort):
    p = cohort[0]
    t1 = data.to_map_grid(p).t1
    wm = p.tissue["wm"]
    inside = p.brain_mask
    assert np.corrcoef(t1[inside], wm[inside])[0, 1] > 0.7
    flipped = p.mri_affine.copy()  # a wrong (anterior↔posterior) geometry must break the agreement
    flipped[1] *= -1
    wrong = data.resample_to_grid(p.t1, flipped, p.affine, p.shape)
    assert np.corrcoef(wrong[inside], wm[inside])[0, 1] < 0.4


def test_bad_arguments():
    with pytest.raises(ValueError, match="slices"):
        phantom.make_patient(0, slices=0)
    with pytest.raises(ValueError, match="patients"):
        phantom.make_patients(0)
    with pytest.raises(ValueError, match="resolution"):
        phantom.load_templates(3)


def test_plot_patients_writes_png(cohort, tmp_path):
    path = phantom.plot_patients(cohort, tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
