"""In-vivo-like synthetic MRSI patients: any matrix and voxel size, oblique slab, k-space-limited noisy maps,
lipid ring, B0 dropout, quality masks built like real ones, arbitrary units.

Reuses the anatomy of ``phantom`` (MNI152 templates, head pose, elastic warp, glioma lesion, T1/FLAIR synthesis)
and adds the acquisition: the "true" concentration (plus the scalp lipid) is computed on a 2× supersampled grid
over the map's field of view, its centred n1×n2 k-space block is kept (optionally Hamming-filtered) with white
Gaussian noise added in k-space, and the result is the stored map (institutional units, one gain per patient).

Stored map = acquired signal, lipid leakage included; the quality mask excludes the lipid ring, lipid-
contaminated voxels and B0 regions, and the training target is map × mask (see docs/dataset_format.md).
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from . import kspace
from . import phantom as ph
from .config import METABOLITES
from .volume import grid_centres

KINDS = ("mixed", "rectangular", "noisy", "5mm", "factor2")
UNITS = "a.u."

# Acquisition ranges. Clinical 3T MRSI: 16×16 … 48×48 at 5–10 mm, 7T / FID-MRSI: 64×64 … 80×80 at 2.2–3.4 mm
# (Maudsley et al., NMR Biomed 34:e4309, 2021, consensus on clinical MRSI; Hangel et al., NeuroImage Clin 2020).
MATRIX_RANGE = (24, 80)  # HR in-plane matrix per axis
VOXEL_RANGE_MM = (2.5, 7.0)  # HR in-plane voxel
FOV_RANGE_MM = (170.0, 250.0)  # in-plane FOV per axis, covering the head (Maudsley 2021: 200–240 mm typical)
SLICE_MM_RANGE = (3.0, 10.0)  # slice thickness
SLAB_MM_RANGE = (30.0, 80.0)  # slab thickness = slices × slice thickness (kept short for generation cost)
SLICES_RANGE = (3, 16)
TILT_DEG = 20.0  # oblique slab: rotations up to ±20° about L-R and A-P (AC–PC / tumour-aligned slabs)
# In-brain SNR (mean signal / noise sd) of real maps ~5–27, voxel-to-voxel variation 20–40 % (issue 11);
# drawn log-uniformly per metabolite map.
SNR_RANGE = {"mixed": (5.0, 40.0), "noisy": (5.0, 10.0)}
GAIN_RANGE = (1e-1, 1e4)  # institutional units: one global gain per patient, log-uniform
# Residual scalp lipid after suppression, × mean in-brain metabolite signal (OVS / inversion nulling leave
# lipids of the order of the metabolites up to ~20× them; Bilgic et al., JMRI 40:181–191, 2014).
LIPID_FACTOR_RANGE = (1.0, 20.0)
# Without a k-space filter the sinc side lobes carry the lipid across the whole brain; such protocols rely on
# stronger suppression, so unfiltered scans draw a lower residual (our modelling choice).
LIPID_FACTOR_RANGE_UNFILTERED = (1.0, 5.0)
# Real maps have weaker GM/WM contrast than single-voxel values: fitted GM/WM ratios from MRSI tissue regression
# ≈ 1.0 for NAA, 1.1–1.3 for tCr, 0.7–0.9 for tCho (Maudsley et al., MRM 61:548–559, 2009; Goryawala et al.,
# MRM 79:2886–2895, 2018). We shrink the phantom's GM–WM difference by a per-patient factor in this range.
CONTRAST_SHRINK_RANGE = (0.4, 0.9)
SUPERSAMPLE = 2  # fine points per map voxel in-plane (truth grid before the k-space truncation)
SUB_SLICES = 2  # sub-slices per slice (rectangular slice profile, partial volume through the slab)
# Quality filtering as in practice: SNR ≥ 3 and CRLB ≤ 20 % (Wilson et al., MRM 82:527–550, 2019 consensus;
# Kreis, NMR Biomed 29:1–4, 2016). CRLB ≈ k / SNR with k = 0.6 gives CRLB 3–12 % at SNR 5–20 as reported.
SNR_THRESHOLD, CRLB_THRESHOLD, CRLB_K = 3.0, 0.20, 0.6
SNR_PEAKS = ("NAA", "tCr", "tCho")  # the singlets a fit's SNR is read from
LIPID_CONTAMINATION = 0.2  # QC: a voxel whose lipid leakage exceeds 20 % of the mean NAA signal is rejected
MRI_VOXEL_MM = 1.7  # T1/FLAIR grid spacing (as phantom)


# ------------------------------------------------------------------------------------------- anatomy extras
@functools.lru_cache(maxsize=2)
def brain_distance_template(resolution: int = 1) -> np.ndarray:
    """Distance (mm) outside the MNI brain mask on the template grid; the skull/scalp shell lies at 5–20 mm."""
    templ = ph.load_templates(resolution)
    return ndimage.distance_transform_edt(templ.brain < 0.5, sampling=float(resolution)).astype(np.float32)


# ------------------------------------------------------------------------------------------- geometry
def rotation_lr_ap(tilt_lr_deg: float, tilt_ap_deg: float) -> np.ndarray:
    """Rotation about L-R (x) then A-P (y), R = Ry·Rx, in RAS."""
    a, b = np.deg2rad([tilt_lr_deg, tilt_ap_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rx


def slab_affine(shape, voxel_mm, rotation: np.ndarray, centre_mm) -> np.ndarray:
    """Voxel → RAS affine of an oblique slab whose FFT-centre voxel (n1//2, n2//2, mid-slab) sits at centre_mm."""
    n1, n2, s = shape
    aff = np.eye(4)
    aff[:3, :3] = rotation @ np.diag(voxel_mm)
    aff[:3, 3] = np.asarray(centre_mm) - aff[:3, :3] @ [n1 // 2, n2 // 2, (s - 1) / 2]
    return aff


def fine_affine(affine: np.ndarray, shape, ss: int = SUPERSAMPLE, sub: int = SUB_SLICES) -> np.ndarray:
    """Affine of the supersampled truth grid: same FOV, FFT centres coincide in-plane (fine N//2 ↔ coarse n//2),
    `sub` sub-slice centres inside each slice."""
    n1, n2, _ = shape
    m = np.eye(4)
    m[0, 0] = m[1, 1] = 1.0 / ss
    m[0, 3] = n1 // 2 - (ss * n1 // 2) / ss
    m[1, 3] = n2 // 2 - (ss * n2 // 2) / ss
    m[2, 2], m[2, 3] = 1.0 / sub, 0.5 / sub - 0.5
    return affine @ m


def fine_to_map(fine: np.ndarray, shape, ss: int = SUPERSAMPLE, sub: int = SUB_SLICES) -> np.ndarray:
    """Voxel fractions on the map grid of a fine-grid quantity: box average over each map voxel's footprint."""
    n1, n2, s = shape
    z = fine.reshape(fine.shape[0], fine.shape[1], s, sub).mean(axis=3)
    kernel = np.full(ss + 1, 1.0 / ss)
    kernel[0] = kernel[-1] = 0.5 / ss  # fine points on a voxel border count half (ss even)
    for axis in (0, 1):
        z = ndimage.convolve1d(z, kernel, axis=axis, mode="constant")
    i1 = (ss * n1) // 2 + ss * (np.arange(n1) - n1 // 2)
    i2 = (ss * n2) // 2 + ss * (np.arange(n2) - n2 // 2)
    return z[np.ix_(i1, i2)]


# ------------------------------------------------------------------------------------------- acquisition
def kspace_window(matrix, window: str) -> np.ndarray:
    """Acquisition weighting of the centred n1×n2 k-space block: 1 (none) or Hamming 0.54 + 0.46·cos(2πk/n).

    For even n the unpaired line k = −n/2 is given weight 0, so the block is Hermitian-symmetric and the map
    of a real object is real (a symmetric acquisition).
    """
    if window not in ("none", "hamming"):
        raise ValueError(f"window must be 'none' or 'hamming', got {window!r}")
    ws = []
    for n in matrix:
        k = np.arange(n) - n // 2
        w = np.ones(n) if window == "none" else 0.54 + 0.46 * np.cos(2 * np.pi * k / n)
        if n % 2 == 0:
            w[0] = 0.0
        ws.append(w)
    return np.outer(*ws)


def acquire(truth: np.ndarray, matrix, window: str = "none") -> np.ndarray:
    """Noise-free acquired map (…, n1, n2) of a truth on a finer grid of the same FOV (…, N1, N2): the centred
    k-space block (kspace.downsample), weighted by the window; real part (phase-corrected fit)."""
    k = kspace.fft2c(kspace.downsample(np.asarray(truth, dtype=np.float64), tuple(matrix)))
    return np.real(kspace.ifft2c(k * kspace_window(matrix, window)))


def kspace_noise(rng: np.random.Generator, shape, window: str, sd: float) -> np.ndarray:
    """Image-space noise (…, n1, n2) from white complex Gaussian k-space noise through the window, with real-
    part sd `sd` in the image (the per-sample k-space sd is sd / rms(window))."""
    w = kspace_window(shape[-2:], window)
    a = sd / np.sqrt(np.mean(w**2))
    k = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) * a
    return np.real(kspace.ifft2c(k * w))


# ------------------------------------------------------------------------------------------- drawing
def draw_acquisition(rng: np.random.Generator, kind: str = "mixed") -> dict:
    """Matrix, voxel and slice sizes, slab tilt, window, SNR per metabolite, gain and lipid level of one scan."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    lo, hi = MATRIX_RANGE
    while True:
        fov = rng.uniform(*FOV_RANGE_MM, size=2)
        if kind == "5mm":
            voxel = np.array([5.0, 5.0])
            matrix = np.clip(np.rint(fov / voxel), lo, hi).astype(int)
        elif rng.random() < 0.5:  # voxel first, matrix from the FOV
            voxel = np.full(2, rng.uniform(*VOXEL_RANGE_MM))
            matrix = np.clip(np.rint(fov / voxel), lo, hi).astype(int)
        else:  # matrix first, voxel from the FOV (covers the whole matrix range evenly); square voxels
            n1 = int(rng.integers(lo, hi + 1))
            voxel = np.full(2, np.clip(fov[0] / n1, *VOXEL_RANGE_MM))
            matrix = np.array([n1, np.clip(np.rint(fov[1] / voxel[0]), lo, hi)], dtype=int)
        if kind != "rectangular" or abs(int(matrix[0]) - int(matrix[1])) >= 6:
            break
    slice_mm = float(rng.uniform(*SLICE_MM_RANGE))
    slab_mm = rng.uniform(*SLAB_MM_RANGE)
    slices = int(np.clip(round(slab_mm / slice_mm), *SLICES_RANGE))
    snr_range = SNR_RANGE["noisy" if kind == "noisy" else "mixed"]
    log_uniform = lambda r: float(np.exp(rng.uniform(*np.log(r))))  # noqa: E731
    window = "hamming" if rng.random() < 0.5 else "none"
    lipid_range = LIPID_FACTOR_RANGE if window == "hamming" else LIPID_FACTOR_RANGE_UNFILTERED
    return {
        "kind": kind, "matrix": [int(m) for m in matrix], "voxel_mm": [float(v) for v in voxel],
        "slice_mm": slice_mm, "slices": slices,
        "tilt_deg_lr_ap": [float(t) for t in rng.uniform(-TILT_DEG, TILT_DEG, size=2)],
        "window": window,
        "snr": {m: log_uniform(snr_range) for m in METABOLITES},
        "lipid_factor": {m: log_uniform(lipid_range) for m in METABOLITES},
        "gain": log_uniform(GAIN_RANGE),
        "contrast_shrink": float(rng.uniform(*CONTRAST_SHRINK_RANGE)),
        "lipid_shell_mm": [float(rng.uniform(6.0, 10.0)), float(rng.uniform(4.0, 8.0))],  # skull, then scalp
    }


def _b0_weight(rng, mni: np.ndarray) -> tuple[np.ndarray, list]:
    """Soft membership (0…1) of 1–2 B0-inhomogeneity regions (frontal sinus, temporal lobes) at MNI points."""
    names = list(ph.B0_REGIONS_MNI)
    chosen = rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)
    weight, regions = np.zeros(mni.shape[:-1]), []
    for i in sorted(chosen):
        centre = np.array(ph.B0_REGIONS_MNI[names[i]]) + rng.uniform(-6, 6, size=3)
        radius = float(rng.uniform(18.0, 30.0))
        r = np.linalg.norm(mni - centre, axis=-1)
        weight = np.maximum(weight, np.clip((radius - r) / 8.0 + 0.5, 0.0, 1.0))  # ~8 mm soft edge
        regions.append({"name": names[i], "centre_mni_mm": centre.tolist(), "radius_mm": radius})
    return weight, regions


def _mri_grid(rng, map_affine: np.ndarray, shape) -> tuple[np.ndarray, tuple]:
    """T1/FLAIR grid at 1.7 mm: the slab's orientation ±3°, left-right flipped storage, covering the slab ± 1 slice."""
    n1, n2, s = shape
    fov = np.linalg.norm(map_affine[:3, :3], axis=0) * [n1, n2, s + 2]
    size = np.ceil(np.minimum(fov, [240.0, 240.0, 200.0]) / MRI_VOXEL_MM).astype(int) + 2
    jitter = ph._random_rotation(rng, (3.0, 3.0, 3.0))[0]
    direction = jitter @ (map_affine[:3, :3] / np.linalg.norm(map_affine[:3, :3], axis=0))
    direction[:, 0] *= -1  # stored flipped, as many scanners export
    centre = map_affine[:3, :3] @ [n1 // 2, n2 // 2, (s - 1) / 2] + map_affine[:3, 3]
    centre = centre + rng.uniform(-0.5, 0.5, size=3) * MRI_VOXEL_MM
    aff = np.eye(4)
    aff[:3, :3] = direction * MRI_VOXEL_MM
    aff[:3, 3] = centre - aff[:3, :3] @ ((size - 1) / 2)
    return aff, tuple(int(v) for v in size)


# ------------------------------------------------------------------------------------------- the patient
def make_invivo_patient(seed: int | np.random.SeedSequence, *, kind: str = "mixed", patient_id: str | None = None,
                        resolution: int = 1, gain: float | None = None, noise: bool = True) -> ph.Patient:
    """One in-vivo-like MRSI patient, a deterministic function of `seed`; `gain` overrides the drawn gain and
    noise=False gives the same patient without measurement noise (both for tests)."""
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    # fixed children (not seq.spawn, which depends on earlier spawns): noise draws never shift the rest
    anatomy_seq, acq_seq, noise_seq = (np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, 9000 + k))
                                       for k in range(3))
    rng, arng, nrng = (np.random.default_rng(s) for s in (anatomy_seq, acq_seq, noise_seq))
    acq = draw_acquisition(arng, kind)
    if gain is not None:
        acq["gain"] = float(gain)
    shape = (acq["matrix"][0], acq["matrix"][1], acq["slices"])
    voxel = (*acq["voxel_mm"], acq["slice_mm"])

    templ = ph.load_templates(resolution)
    pose, pose_info = ph._draw_pose(rng)
    lesion, lesion_info = ph._draw_lesion(rng, templ)
    lesion_pos = pose.to_patient(lesion.centre)
    slab_mm = acq["slices"] * acq["slice_mm"]
    centre = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8),
                       lesion_pos[2] + rng.uniform(-0.25, 0.25) * slab_mm])
    affine = slab_affine(shape, voxel, rotation_lr_ap(*acq["tilt_deg_lr_ap"]), centre)

    # truth grid: 2× in-plane, 2 sub-slices per slice
    f_affine = fine_affine(affine, shape)
    f_shape = (SUPERSAMPLE * shape[0], SUPERSAMPLE * shape[1], SUB_SLICES * shape[2])
    f_points = grid_centres(f_affine, f_shape)
    mni = pose.to_mni(f_points)
    f = ph._sample({k: getattr(templ, k) for k in ("gm", "wm", "brain")}, templ.affine, mni)
    labels = lesion.labels(mni, f["wm"], f["brain"])
    dist = ph._sample({"d": brain_distance_template(resolution)}, templ.affine, mni, outside=99.0)["d"]
    inner, thick = acq["lipid_shell_mm"]
    lipid_shell = np.clip(np.minimum(dist - inner, inner + thick - dist) / 1.5 + 0.5, 0.0, 1.0)
    lipid_shell *= 1 + 0.3 * np.tanh(ph.SmoothField.draw(rng, (30.0, 90.0), 6)(f_points))
    b0_fine, b0_regions = _b0_weight(rng, mni)
    bias = 1 + 0.15 * np.tanh(ph.SmoothField.draw(rng, (150.0, 400.0), 4)(f_points))  # receive profile

    gm_c, wm_c = ph._draw_concentrations(rng)
    c = acq["contrast_shrink"]
    for name in METABOLITES:  # weaker GM/WM contrast, same mean
        mean = 0.5 * (gm_c[name] + wm_c[name])
        gm_c[name], wm_c[name] = mean + c * (gm_c[name] - mean), mean + c * (wm_c[name] - mean)
    factors = ph._draw_lesion_factors(rng)
    b0_loss = float(rng.uniform(0.3, 0.8))  # fraction of the signal lost at the centre of a B0 region

    brain_frac = fine_to_map(f["brain"], shape)
    brain = brain_frac >= 0.5
    b0_map = fine_to_map(b0_fine * (f["brain"] > 0.5), shape)
    lipid_map = fine_to_map(lipid_shell, shape)
    label_fracs = np.stack([fine_to_map((labels == v).astype(np.float32), shape) for v in range(4)])
    lesion_map = np.where(brain, np.argmax(label_fracs, axis=0), 0).astype(np.uint8)
    tissue = {"gm": fine_to_map(f["gm"], shape), "wm": fine_to_map(f["wm"], shape)}
    tissue["csf"] = np.clip(brain_frac - tissue["gm"] - tissue["wm"], 0.0, 1.0)
    tissue["lipid"], tissue["b0"] = lipid_map, b0_map  # shell fraction and B0-region weight (not written)

    def slab(fine_vol):  # sub-slices → slices, slices first for the 2D k-space operations
        return np.moveaxis(fine_vol.reshape(*f_shape[:2], shape[2], SUB_SLICES).mean(axis=3), 2, 0)

    matrix, window = tuple(acq["matrix"]), acq["window"]
    lipid_acq = np.moveaxis(acquire(slab(lipid_shell * bias), matrix, window), 0, 2)
    maps, noise_sd, truth_mean = {}, {}, {}
    for name in METABOLITES:
        conc = f["gm"] * gm_c[name] + f["wm"] * wm_c[name]  # CSF holds ~no metabolites
        per_label = np.array([1.0, factors["core"][name], factors["rim"][name], factors["edema"][name]])
        conc = conc * per_label[labels]
        texture = ph.SmoothField.draw(rng, (12.0, 80.0), 6)(f_points)  # physiological / fitting texture ±15 %
        conc *= (1 + 0.15 * np.tanh(texture)) * bias * (1 - b0_loss * b0_fine)
        signal = np.moveaxis(acquire(slab(conc), matrix, window), 0, 2)
        mean_signal = float(signal[brain].mean())
        sd = mean_signal / acq["snr"][name]
        acquired = signal + acq["lipid_factor"][name] * mean_signal * lipid_acq
        if noise:
            white = kspace_noise(nrng, (shape[2], *matrix), window, sd)
            extra = nrng.normal(size=shape) * sd * 2.0 * b0_map  # fitting failures in B0 regions: noisier
            acquired = acquired + np.moveaxis(white, 0, 2) + extra
        maps[name] = acquired
        noise_sd[name], truth_mean[name] = sd, mean_signal

    quality, qinfo = _quality_mask({m: maps[m] / noise_sd[m] for m in SNR_PEAKS}, truth_mean["NAA"], brain,
                                   b0_map, lipid_map, acq["lipid_factor"]["NAA"] * truth_mean["NAA"] * lipid_acq)
    fit_failures = float(rng.uniform(0.01, 0.04))  # scattered voxels whose fit fails QC for other reasons
    quality &= rng.random(shape) >= fit_failures
    qinfo["fit_failure_fraction"] = fit_failures
    qinfo["kept_fraction_of_brain"] = float(quality.sum() / max(brain.sum(), 1))
    g = acq["gain"]
    maps = {k: (v * g).astype(np.float32) for k, v in maps.items()}

    mri_affine, mri_shape = _mri_grid(rng, affine, shape)
    mri_points = grid_centres(mri_affine, mri_shape)
    q = pose.to_mni(mri_points)
    mri = ph._sample({k: getattr(templ, k) for k in ("t1", "gm", "wm", "brain")}, templ.affine, q)
    t1, flair, contrast_info = ph._mri_contrasts(rng, mri, lesion.labels(q, mri["wm"], mri["brain"]), mri_points)

    info = {
        "generator": "ftddm_core.invivo", "seed": ph._seed_info(seq), "units": UNITS, "acquisition": acq,
        "noise": bool(noise), "noise_sd": {k: v * g for k, v in noise_sd.items()},
        "mean_brain_signal": {k: v * g for k, v in truth_mean.items()},
        "pose": pose_info, "lesion": lesion_info, "concentrations_gm_mM": gm_c, "concentrations_wm_mM": wm_c,
        "lesion_factors": factors, "b0_loss": b0_loss, "b0_regions": b0_regions, "quality": qinfo,
        "mri": contrast_info,
    }
    return ph.Patient(
        patient_id=patient_id or f"invivo-{ph._seed_info(seq)['entropy']}", maps=maps, affine=affine,
        t1=t1, flair=flair, mri_affine=mri_affine, quality_mask=quality, brain_mask=brain, lesion=lesion_map,
        tissue={k: v.astype(np.float32) for k, v in tissue.items()}, info=info,
    )


def _quality_mask(peak_snr: dict, mean_signal, brain, b0_map, lipid_map, lipid_leak) -> tuple[np.ndarray, dict]:
    """brain ∧ SNR ≥ 3 ∧ CRLB ≤ 20 % ∧ no lipid (ring or leakage) ∧ outside B0 regions, as real pipelines.

    peak_snr: measured map / white-noise sd of the singlets; the voxel SNR is the highest one (LCModel's
    SNR is the largest peak over the noise, so tumour voxels with tCho but little NAA still pass)."""
    widen = np.sqrt(1 + (2.0 * b0_map) ** 2)  # the extra B0-region noise
    snr = np.max(np.stack(list(peak_snr.values())), axis=0) / widen
    crlb = CRLB_K * (1 + 2.0 * b0_map) / np.maximum(snr, 1e-6)  # broader lines in B0 regions raise the CRLB
    lipid_free = (lipid_map < 0.05) & (np.abs(lipid_leak) <= LIPID_CONTAMINATION * mean_signal)
    keep = brain & (snr >= SNR_THRESHOLD) & (crlb <= CRLB_THRESHOLD) & lipid_free & (b0_map < 0.3)
    return keep, {"snr_threshold": SNR_THRESHOLD, "crlb_threshold": CRLB_THRESHOLD, "crlb_k": CRLB_K,
                  "lipid_contamination": LIPID_CONTAMINATION, "kept_fraction_of_brain":
                  float(keep.sum() / max(brain.sum(), 1))}


def make_invivo_patients(n: int, seed: int = 0, *, kind: str = "mixed", resolution: int = 1) -> list[ph.Patient]:
    """A cohort sub-001 … of in-vivo-like patients with per-patient generators spawned from `seed`."""
    if n < 1:
        raise ValueError(f"number of patients must be ≥ 1, got {n}")
    return [make_invivo_patient(ph.patient_seed(seed, i), kind=kind, patient_id=f"sub-{i + 1:03d}",
                                resolution=resolution) for i in range(n)]
