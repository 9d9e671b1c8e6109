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


# ------------------------------------------------------------------------------- in-vivo-like generator
from ftddm_core import invivo, kspace  # noqa: E402

INVIVO_SEED = 11


@pytest.fixture(scope="module")
def scans():
    """Two in-vivo-like patients and the first one again without measurement noise."""
    seeds = [phantom.patient_seed(INVIVO_SEED, i) for i in range(2)]
    noisy = [invivo.make_invivo_patient(s) for s in seeds]
    clean = invivo.make_invivo_patient(seeds[0], noise=False)
    return noisy, clean


def test_acquired_map_is_the_centred_kspace_block_of_the_truth():
    # Independent of ftddm_core.kspace: numpy FFT of the fine truth, keep the symmetric centred block, invert.
    rng = np.random.default_rng(0)
    for matrix in ((25, 32), (32, 25), (24, 24)):
        fine = (2 * matrix[0], 2 * matrix[1])
        truth = ndimage.gaussian_filter(rng.random(fine), 1.0)
        acquired = invivo.acquire(truth, matrix, "none")
        assert acquired.shape == matrix and np.isrealobj(acquired)
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(truth)))
        keep = np.ones(fine, dtype=bool)
        for axis, (n, big) in enumerate(zip(matrix, fine)):
            freq = np.arange(big) - big // 2
            band = (freq >= -((n - 1) // 2)) & (freq <= (n - 1) // 2)  # even n: the unpaired −n/2 line is dropped
            keep &= band[:, None] if axis == 0 else band[None, :]
        expected = np.real(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k * keep))))
        np.testing.assert_allclose(np.real(kspace.zero_fill(acquired, fine)), expected, atol=1e-10)
        outside = np.abs(kspace.fft2c(kspace.zero_fill(acquired, fine)))[~keep]
        assert outside.max() < 1e-10 * np.abs(k).max()  # band-limited to the acquisition block


def fwhm_voxels(profile: np.ndarray, upsample: int) -> float:
    peak = profile.max()
    above = np.flatnonzero(profile >= peak / 2)
    return (above[-1] - above[0] + 1) / upsample


def test_hamming_widens_the_point_spread_as_expected():
    # Harris, Proc. IEEE 66:51–83 (1978): −6 dB main-lobe width 1.21 bins (rectangular) and 1.81 (Hamming).
    n, ss, up = 64, 2, 16
    truth = np.zeros((ss * n, ss * n))
    truth[n, n] = 1.0  # the fine FFT centre coincides with map voxel n//2
    widths = {}
    for window in ("none", "hamming"):
        psf = invivo.acquire(truth, (n, n), window)
        dense = np.real(kspace.zero_fill(psf, (up * n, up * n)))
        widths[window] = fwhm_voxels(dense[:, up * n // 2], up)
    assert widths["none"] == pytest.approx(1.21, abs=0.08)
    assert widths["hamming"] == pytest.approx(1.81, abs=0.08)
    assert widths["hamming"] / widths["none"] == pytest.approx(1.5, abs=0.1)


def test_kspace_noise_has_the_requested_image_sd():
    rng = np.random.default_rng(1)
    for window in ("none", "hamming"):
        noise = invivo.kspace_noise(rng, (40, 33, 41), window, 2.5)
        assert noise.std() == pytest.approx(2.5, rel=0.03)
        corr = np.mean(noise[:, 1:] * noise[:, :-1]) / noise.var()
        assert (corr > 0.2) if window == "hamming" else (abs(corr) < 0.05)  # the filter correlates neighbours


def test_acquisition_ranges_and_kinds():
    rng = np.random.default_rng(2)
    draws = [invivo.draw_acquisition(rng) for _ in range(300)]
    matrices = np.array([d["matrix"] for d in draws])
    voxels = np.array([d["voxel_mm"][0] for d in draws])
    assert matrices.min() >= 24 and matrices.max() <= 80
    assert matrices.min() <= 30 and matrices.max() >= 76  # the whole range is covered
    assert (matrices % 2 == 1).any() and (matrices % 2 == 0).any() and (matrices[:, 0] != matrices[:, 1]).mean() > 0.5
    assert 2.5 <= voxels.min() <= 3.0 and 6.5 <= voxels.max() <= 7.0
    fov = matrices * voxels[:, None]
    assert np.median(fov) > 170 and np.percentile(fov, 5) > 110 and fov.max() < 290
    snr = np.array([v for d in draws for v in d["snr"].values()])
    assert 5 <= snr.min() < 6 and 35 < snr.max() <= 40
    assert {d["window"] for d in draws} == {"none", "hamming"}
    gains = np.array([d["gain"] for d in draws])
    assert 0.1 <= gains.min() < 1 and 1e3 < gains.max() <= 1e4
    slab = np.array([d["slices"] * d["slice_mm"] for d in draws])
    assert all(3 <= d["slices"] <= 16 and 3 <= d["slice_mm"] <= 10 for d in draws) and slab.max() < 120
    for _ in range(30):
        rect = invivo.draw_acquisition(rng, "rectangular")
        assert abs(rect["matrix"][0] - rect["matrix"][1]) >= 6
        assert invivo.draw_acquisition(rng, "5mm")["voxel_mm"] == [5.0, 5.0]
        assert max(invivo.draw_acquisition(rng, "noisy")["snr"].values()) <= 10
    with pytest.raises(ValueError, match="kind"):
        invivo.draw_acquisition(rng, "weird")


def test_invivo_geometry_is_oblique_and_t1_covers_the_slab(scans):
    for p in scans[0]:
        acq = p.info["acquisition"]
        assert p.shape == (*acq["matrix"], acq["slices"])
        np.testing.assert_allclose(np.linalg.norm(p.affine[:3, :3], axis=0), [*acq["voxel_mm"], acq["slice_mm"]])
        normal = p.affine[:3, 2] / acq["slice_mm"]  # slice axis = third array axis
        expected = invivo.rotation_lr_ap(*acq["tilt_deg_lr_ap"]) @ [0, 0, 1]
        np.testing.assert_allclose(normal, expected, atol=1e-9)
        assert 0.5 < np.degrees(np.arccos(normal[2])) < 29  # oblique, at most the two ±20° tilts
        covered = data.resample_to_grid((p.t1 > 0).astype(np.float32), p.mri_affine, p.affine, p.shape) >= 0.5
        assert (covered == p.brain_mask).mean() > 0.95 and p.brain_mask.sum() > 500


def test_invivo_measured_snr_matches_the_drawn_one(scans):
    (p, _), clean = scans
    acq = p.info["acquisition"]
    outside = ~ndimage.binary_dilation(p.brain_mask, iterations=1)  # white k-space noise only (B0 noise is in-brain)
    for name in METABOLITES:
        noise = (p.maps[name] - clean.maps[name])[outside]
        snr = clean.maps[name][p.brain_mask].mean() / noise.std()
        assert 5 <= acq["snr"][name] <= 40
        assert snr == pytest.approx(acq["snr"][name], rel=0.1), name
    np.testing.assert_array_equal(p.affine, clean.affine)
    np.testing.assert_array_equal(p.t1, clean.t1)  # noise draws never change the rest of the patient


def test_invivo_quality_mask_excludes_lipid_ring_b0_and_low_snr(scans):
    for p in scans[0]:
        q, brain, g = p.quality_mask, p.brain_mask, p.info["acquisition"]["gain"]
        assert q.sum() > 0.3 * brain.sum() and not (q & ~brain).any()
        assert not (q & (p.tissue["lipid"] > 0.05)).any() and not (q & (p.tissue["b0"] >= 0.3)).any()
        ring = p.tissue["lipid"] > 0.5
        naa = p.maps["NAA"]
        assert ring.sum() > 50 and np.abs(naa[ring]).mean() > 0.5 * naa[brain].mean()  # lipid is in the data
        peak = np.max([p.maps[m][q] / p.info["noise_sd"][m] for m in invivo.SNR_PEAKS], axis=0)
        assert np.all(peak >= invivo.SNR_THRESHOLD)
        assert p.info["units"] == "a.u." and 0.1 <= g <= 1e4


def test_invivo_weaker_gm_wm_contrast_than_legacy(scans):
    # Tissue regression on the noise-free acquired map: the GM/WM ratio sits between 1 and the legacy one.
    p = scans[1]
    normal = p.brain_mask & (p.lesion == 0) & (p.tissue["b0"] == 0)
    design = np.stack([p.tissue[t][normal] for t in ("gm", "wm", "csf")], axis=1)
    c_gm, c_wm, _ = np.linalg.lstsq(design, p.maps["tCr"][normal], rcond=None)[0]
    lo_gm, hi_gm = phantom.NORMAL_CONCENTRATIONS_MM["tCr"]["gm"]
    lo_wm, hi_wm = phantom.NORMAL_CONCENTRATIONS_MM["tCr"]["wm"]
    assert 1.0 < c_gm / c_wm < (lo_gm + hi_gm) / (lo_wm + hi_wm)


def test_invivo_determinism_and_gain():
    seed = phantom.patient_seed(INVIVO_SEED, 5)
    a, b = invivo.make_invivo_patient(seed, kind="rectangular"), invivo.make_invivo_patient(seed, kind="rectangular")
    c = invivo.make_invivo_patient(phantom.patient_seed(INVIVO_SEED, 6), kind="rectangular")
    for name in METABOLITES:
        np.testing.assert_array_equal(a.maps[name], b.maps[name])
    for f in ("t1", "flair", "quality_mask", "brain_mask", "lesion", "affine", "mri_affine"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.info == b.info and a.shape != c.shape or not np.array_equal(a.maps["NAA"], c.maps["NAA"])
    assert abs(a.shape[0] - a.shape[1]) >= 6
    scaled = invivo.make_invivo_patient(seed, kind="rectangular", gain=a.info["acquisition"]["gain"] * 1000)
    np.testing.assert_allclose(scaled.maps["NAA"], a.maps["NAA"] * 1000, rtol=1e-5, atol=1e-6 * np.abs(scaled.maps["NAA"]).max())
    np.testing.assert_array_equal(scaled.quality_mask, a.quality_mask)
