"""Synthetic high-grade-glioma MRSI patients built on real anatomy (nilearn's MNI152 2009 templates, offline).

Every patient is a deterministic function of its seed: a random head pose (small rotation, scaling,
translation) plus a smooth elastic deformation maps the patient's scanner space onto MNI space; a slab of
N axial slices on a 64×64 grid at 3.4 mm isotropic (the paper's 7T protocol) holds the 7 metabolite maps
in mM, mixed from grey/white-matter fractions (CSF ≈ 0) with a lesion (necrotic core, enhancing rim,
edema) drawn as thresholded smooth random fields. T1 and a synthesised FLAIR live on their own 1.7 mm
grid with their own affine. A quality mask (lipid rim, B0 regions, low-SNR voxels) is stored separately:
the ground-truth maps stay the true concentrations everywhere inside the brain.

Every tissue property is a function of MNI coordinates, so the map grid (2×2×2 supersampled, then block
averaged for partial volume) and the MRI grid see one and the same anatomy and lesion.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .config import METABOLITES
from .masks import largest_component
from .volume import apply_affine, grid_centres

MAP_SIZE = 64  # in-plane matrix of the HR maps (paper: 64×64)
MAP_VOXEL_MM = 3.4  # isotropic HR voxel (paper: 3.4 mm)
MRI_SIZE = 128  # in-plane matrix of T1/FLAIR
MRI_VOXEL_MM = 1.7  # T1/FLAIR voxel, a finer grid than the maps
SLICE_RANGE = (12, 18)  # default number of slab slices, drawn uniformly (paper: 9–18 slices with brain)
SUPERSAMPLE = 2  # fine points per map voxel and axis, averaged for partial-volume tissue fractions
HEAD_CENTRE_MNI = np.array([0.0, -18.0, 15.0])  # MNI point placed near the scanner isocentre

# Normal-tissue concentrations in mM, (low, high) per tissue; each patient draws one point u ∈ U(0, 1) per
# metabolite and uses low + u·(high − low) for both tissues, so the GM/WM ordering is kept.
# Sources: Pouwels & Frahm, MRM 39:53–60 (1998) — tCr, Ins, Glu, Gln lower in cortical WM than GM, tCho
# higher in WM; Pouwels & Frahm, NMR Biomed 10:73–78 (1997) — NAA 8.0–8.9 mM in GM and WM, NAAG 0.6–1.5 mM
# (GM) vs 1.5–2.7 mM (WM), so total NAA is slightly higher in WM; Govindaraju, Young & Maudsley, NMR Biomed
# 13:129–153 (2000) — whole-brain ranges, approx. Glu 6–12.5, Gln 3–6, m-Ins 4–8, Gly ~1 mM;
# de Graaf, "In vivo NMR spectroscopy" (Wiley, 3rd ed. 2019), brain concentration table. Gly: ~0.5–1 mM
# (Govindaraju 2000; Prescot et al., MRM 55:681–686, 2006); its GM > WM split is our assumption.
# The numbers below are rounded ranges consistent with these sources, not values copied from one table.
NORMAL_CONCENTRATIONS_MM: dict[str, dict[str, tuple[float, float]]] = {
    "tCr": {"gm": (7.0, 8.5), "wm": (5.0, 6.5)},
    "tCho": {"gm": (0.9, 1.4), "wm": (1.4, 2.0)},
    "NAA": {"gm": (8.6, 10.4), "wm": (9.5, 11.6)},
    "Glu": {"gm": (8.5, 10.5), "wm": (5.5, 7.0)},
    "Ins": {"gm": (4.5, 6.0), "wm": (3.8, 5.0)},
    "Gln": {"gm": (3.0, 4.5), "wm": (1.5, 2.5)},
    "Gly": {"gm": (0.6, 1.0), "wm": (0.4, 0.7)},
}

# Lesion factors relative to the local normal concentration, (low, high) drawn per patient.
# Enhancing rim / solid tumour: tCho ↑ 1.5–3×, NAA ↓ 50–70 %, tCr ↓ 20–40 % (Howe et al., MRM 49:223–232,
# 2003, quantitative 1H MRS of high-grade gliomas); Gln and Gly ↑ and Ins ↑ in 7T glioma MRSI (Hangel et al.,
# NeuroImage: Clinical 2020, 7T-CRT-FID-MRSI of high-grade gliomas; Hangel et al., Cancers 2022, Gln and Gly
# vs amino-acid PET). Edema: mild NAA decrease, small tCho/Ins rise. Necrotic core: every metabolite low.
# Ranges are approximate, chosen to span the reported direction and size of the changes.
RIM_FACTORS: dict[str, tuple[float, float]] = {
    "tCr": (0.6, 0.8),
    "tCho": (1.5, 3.0),
    "NAA": (0.3, 0.5),
    "Glu": (0.6, 0.9),
    "Ins": (1.1, 1.8),
    "Gln": (1.5, 3.0),
    "Gly": (2.0, 4.0),
}
EDEMA_FACTORS: dict[str, tuple[float, float]] = {
    "tCr": (0.9, 1.0),
    "tCho": (1.0, 1.2),
    "NAA": (0.75, 0.92),
    "Glu": (0.85, 1.0),
    "Ins": (1.0, 1.2),
    "Gln": (1.0, 1.3),
    "Gly": (1.0, 1.3),
}
CORE_FACTOR = (0.05, 0.25)  # common necrosis factor, jittered ×U(0.8, 1.2) per metabolite

#: Lesion label values on the map grid (lesion.nii.gz).
LESION_LABELS = {"normal": 0, "core": 1, "rim": 2, "edema": 3}

# Regions where B0 inhomogeneity spoils spectra (MNI mm): frontal sinus / orbitofrontal, temporal lobes.
B0_REGIONS_MNI = {
    "frontal_sinus": (0.0, 48.0, -12.0),
    "left_temporal": (-46.0, -8.0, -24.0),
    "right_temporal": (46.0, -8.0, -24.0),
}


@dataclass
class Patient:
    """One subject: HR metabolite maps (mM) on the map grid, T1/FLAIR on their own grid, masks, labels."""

    patient_id: str
    maps: dict[str, np.ndarray]  # metabolite → (X, Y, Z) float32, mM; 0 outside the brain
    affine: np.ndarray  # 4×4 voxel → RAS (mm) of the map grid (nibabel convention)
    t1: np.ndarray  # T1 on its own grid (mri_affine)
    flair: np.ndarray  # FLAIR on the same grid as t1
    mri_affine: np.ndarray  # 4×4 voxel → RAS of the T1/FLAIR grid
    quality_mask: np.ndarray  # (X, Y, Z) bool, voxels whose spectra pass quality filtering
    brain_mask: np.ndarray  # (X, Y, Z) bool on the map grid
    lesion: np.ndarray | None = None  # (X, Y, Z) uint8, see LESION_LABELS
    tissue: dict[str, np.ndarray] = field(default_factory=dict)  # gm / wm / csf fractions on the map grid
    info: dict[str, Any] = field(default_factory=dict)  # drawn parameters (JSON-serialisable)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.maps.values())).shape)

    @property
    def metabolites(self) -> tuple[str, ...]:
        return tuple(self.maps)


# ----------------------------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class Templates:
    """MNI152 2009 T1, GM, WM and brain mask on one grid, plus candidate lesion centres (MNI mm)."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    lesion_centres: np.ndarray  # (K, 3) MNI mm, deep WM of the supratentorial slab region


@functools.lru_cache(maxsize=2)
def load_templates(resolution: int = 1) -> Templates:
    """Load (once per process) nilearn's MNI152 T1 / GM / WM / brain mask at 1 or 2 mm; ships offline."""
    if resolution not in (1, 2):
        raise ValueError(f"template resolution must be 1 or 2 mm, got {resolution}")
    from nilearn import datasets  # heavy import, only when a phantom is made

    def get(loader):
        return np.asarray(loader(resolution=resolution).get_fdata(dtype=np.float32))

    img = datasets.load_mni152_template(resolution=resolution)
    t1 = np.clip(np.asarray(img.get_fdata(dtype=np.float32)), 0.0, None)
    gm = np.clip(get(datasets.load_mni152_gm_template), 0.0, 1.0)
    wm = np.clip(get(datasets.load_mni152_wm_template), 0.0, 1.0)
    brain = (get(datasets.load_mni152_brain_mask) > 0.5).astype(np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    return Templates(t1, gm * brain, wm * brain, brain, affine, _lesion_centre_candidates(wm, affine))


def _lesion_centre_candidates(wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Deep-WM points (WM prob > 0.9) away from the midline, at heights a 7T MRSI slab usually covers."""
    idx = np.argwhere(wm[::2, ::2, ::2] > 0.9) * 2
    xyz = apply_affine(affine, idx)
    keep = (np.abs(xyz[:, 0]) > 14) & (np.abs(xyz[:, 0]) < 45) & (xyz[:, 1] > -65) & (xyz[:, 1] < 40)
    keep &= (xyz[:, 2] > 0) & (xyz[:, 2] < 40)
    return xyz[keep]


def _sample(volumes: dict[str, np.ndarray], affine: np.ndarray, points_mm: np.ndarray,
            outside: float = 0.0) -> dict[str, np.ndarray]:
    """Trilinear samples of several same-grid volumes at world points (…, 3); `outside` beyond the grid."""
    ijk = ((points_mm.reshape(-1, 3) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).T.astype(np.float32)
    return {name: ndimage.map_coordinates(vol, ijk, order=1, mode="constant", cval=outside, prefilter=False)
            .reshape(points_mm.shape[:-1]) for name, vol in volumes.items()}


# ------------------------------------------------------------------------------------------- random fields
@dataclass(frozen=True)
class SmoothField:
    """Random smooth scalar field f(x) = Σ a_k cos(ω_k·x + φ_k) with unit mean-square (random Fourier features)."""

    freqs: np.ndarray  # (K, 3) rad/mm
    phases: np.ndarray  # (K,)
    amps: np.ndarray  # (K,)

    @classmethod
    def draw(cls, rng: np.random.Generator, wavelength_mm: tuple[float, float], components: int = 10) -> "SmoothField":
        """Draw K plane waves with random directions and wavelengths in the given range (mm)."""
        directions = rng.normal(size=(components, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=components)
        amps = rng.uniform(0.5, 1.0, size=components)
        amps *= np.sqrt(2.0 / np.sum(amps**2))  # E[f²] = Σ a²/2 = 1
        phases = rng.uniform(0.0, 2 * np.pi, size=components)
        return cls(directions * (2 * np.pi / wavelengths)[:, None], phases, amps)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        flat = points_mm.reshape(-1, 3).astype(np.float32)  # float32 cos is ~8× faster; phases stay < 1e-4 rad exact
        arg = flat @ self.freqs.T.astype(np.float32) + self.phases.astype(np.float32)
        out = np.cos(arg) @ self.amps.astype(np.float32)
        return out.reshape(points_mm.shape[:-1]).astype(np.float64)


def _random_rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> tuple[np.ndarray, list[float]]:
    """Rotation R = Rz·Ry·Rx with angles drawn in ±max_deg about x (pitch), y (roll), z (yaw)."""
    angles = [float(rng.uniform(-m, m)) for m in max_deg]
    ax, ay, az = np.deg2rad(angles)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx, angles


@dataclass(frozen=True)
class HeadPose:
    """Patient (scanner) space ↔ MNI: p = R·diag(s)·(q − c0) + t, plus a smooth elastic displacement in MNI."""

    rotation: np.ndarray
    scale: np.ndarray
    translation: np.ndarray
    elastic: tuple[SmoothField, SmoothField, SmoothField]
    elastic_mm: float

    def to_mni(self, points_mm: np.ndarray) -> np.ndarray:
        """MNI coordinates (…, 3) of scanner-space points: inverse affine, then the elastic warp."""
        q = ((points_mm - self.translation) @ self.rotation) / self.scale + HEAD_CENTRE_MNI
        warp = np.stack([f(q) for f in self.elastic], axis=-1)
        return q + self.elastic_mm * warp

    def to_patient(self, mni_mm: np.ndarray) -> np.ndarray:
        """Scanner-space position of MNI points under the affine part only (the warp is a few mm)."""
        return ((mni_mm - HEAD_CENTRE_MNI) * self.scale) @ self.rotation.T + self.translation


def _draw_pose(rng: np.random.Generator) -> tuple[HeadPose, dict]:
    rotation, angles = _random_rotation(rng, (10.0, 5.0, 6.0))
    scale = rng.uniform(0.92, 1.08, size=3)
    translation = np.array([rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-4, 4)])
    elastic = tuple(SmoothField.draw(rng, (60.0, 150.0), components=6) for _ in range(3))
    elastic_mm = float(rng.uniform(1.5, 3.5))  # RMS displacement per axis
    pose = HeadPose(rotation, scale, translation, elastic, elastic_mm)
    info = {"rotation_deg_xyz": angles, "scale_xyz": scale.tolist(), "translation_mm": translation.tolist(),
            "elastic_rms_mm": elastic_mm}
    return pose, info


# ------------------------------------------------------------------------------------------------- lesion
@dataclass(frozen=True)
class Lesion:
    """Irregular lesion in MNI space: tumour = r·(1 + a·f₁) < 1, core inside it, edema reaching further into WM."""

    centre: np.ndarray
    axes: np.ndarray  # (3, 3) rows = ellipsoid axes
    radii: np.ndarray  # (3,) mm
    core_fraction: float
    edema_extent: float
    irregularity: float
    tumour_field: SmoothField
    core_field: SmoothField
    edema_field: SmoothField

    def labels(self, mni_mm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """Label (0 normal, 1 core, 2 rim, 3 edema) on a grid of MNI points (X, Y, Z, 3); edema prefers WM."""
        r = np.linalg.norm(((mni_mm - self.centre) @ self.axes.T) / self.radii, axis=-1)
        near = r < (self.edema_extent + 0.4) / 0.7  # fields are bounded, so nothing beyond this can be lesion
        q, rn, wmn = mni_mm[near], r[near], wm[near]
        warp = lambda f, a: 1 + a * np.tanh(f(q))  # noqa: E731 - bounded distortion in [1 − a, 1 + a]
        tumour = rn * warp(self.tumour_field, self.irregularity) < 1.0
        core = tumour & (rn * warp(self.core_field, self.irregularity) < self.core_fraction)
        # vasogenic edema spreads along white matter and largely spares the cortex
        edema = (rn * warp(self.edema_field, 0.3) - 0.8 * (wmn - 0.5) < self.edema_extent) & (wmn > 0.3)
        out = np.zeros(r.shape, dtype=np.uint8)
        out[near] = np.where(core, 1, np.where(tumour, 2, np.where(edema, 3, 0)))
        out[brain < 0.5] = 0
        return _connected_lesion(out)


def _connected_lesion(labels: np.ndarray) -> np.ndarray:
    """Keep one solid tumour (largest component) and only the edema connected to it: no scattered islands."""
    tumour = largest_component(np.isin(labels, (1, 2)))
    if not tumour.any():
        return np.zeros_like(labels)
    labelled, _ = ndimage.label(tumour | (labels == 3))
    region = np.isin(labelled, np.unique(labelled[tumour]))
    out = np.where(region, labels, 0).astype(np.uint8)
    out[np.isin(out, (1, 2)) & ~tumour] = 3  # detached tumour bits inside the edema count as edema
    return out


def _draw_lesion(rng: np.random.Generator, templates: Templates) -> tuple[Lesion, dict]:
    hemisphere = "left" if rng.random() < 0.5 else "right"
    sign = -1.0 if hemisphere == "left" else 1.0  # RAS: x < 0 is the subject's left
    candidates = templates.lesion_centres[np.sign(templates.lesion_centres[:, 0]) == sign]
    centre = candidates[rng.integers(len(candidates))] + rng.uniform(-1, 1, size=3)
    axes, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # random orientation
    radius = float(rng.uniform(9.0, 20.0))
    radii = radius * rng.uniform(0.8, 1.25, size=3)
    lesion = Lesion(
        centre=centre, axes=axes.T, radii=radii,
        core_fraction=float(rng.uniform(0.3, 0.65)), edema_extent=float(rng.uniform(1.3, 1.9)),
        irregularity=float(rng.uniform(0.15, 0.35)),
        tumour_field=SmoothField.draw(rng, (12.0, 40.0)), core_field=SmoothField.draw(rng, (8.0, 25.0)),
        edema_field=SmoothField.draw(rng, (15.0, 50.0)),
    )
    info = {"hemisphere": hemisphere, "centre_mni_mm": centre.tolist(), "radius_mm": radius,
            "radii_mm": radii.tolist(), "core_fraction": lesion.core_fraction,
            "edema_extent": lesion.edema_extent, "irregularity": lesion.irregularity}
    return lesion, info


# -------------------------------------------------------------------------------------------------- grids
def _supersampled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of a grid with `factor` sub-voxels per voxel and axis, sub-voxel centres inside each voxel."""
    sub = np.eye(4)
    sub[:3, :3] /= factor
    sub[:3, 3] = -0.5 + 0.5 / factor
    return affine @ sub


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    x, y, z = (n // factor for n in a.shape)
    return a.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def _map_affine(slices: int, z_centre: float) -> np.ndarray:
    """Axial 3.4 mm map grid; in-plane voxel 32 at x = y = 0 (the FFT centre), slab centred at z_centre."""
    affine = np.diag([MAP_VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = [-32 * MAP_VOXEL_MM, -32 * MAP_VOXEL_MM, z_centre - (slices - 1) / 2 * MAP_VOXEL_MM]
    return affine


def _mri_affine(rng: np.random.Generator, slices: int, z_centre: float) -> tuple[np.ndarray, int]:
    """1.7 mm T1/FLAIR grid stored left-right flipped, sub-voxel shifted and one map slice thicker each side."""
    depth = 2 * slices + 4
    shift = rng.uniform(-0.5, 0.5, size=3) * MRI_VOXEL_MM
    affine = np.diag([-MRI_VOXEL_MM, MRI_VOXEL_MM, MRI_VOXEL_MM, 1.0])
    half = (MRI_SIZE - 1) / 2 * MRI_VOXEL_MM
    affine[:3, 3] = [half + shift[0], -half + shift[1], z_centre - (depth - 1) / 2 * MRI_VOXEL_MM + shift[2]]
    return affine, depth


# ------------------------------------------------------------------------------------------- the patient
def _draw_concentrations(rng: np.random.Generator) -> tuple[dict, dict]:
    """Per-patient normal GM/WM concentrations (mM), one u ∈ U(0, 1) per metabolite for both tissues."""
    gm, wm = {}, {}
    for name in METABOLITES:
        u = rng.random()
        lo, hi = NORMAL_CONCENTRATIONS_MM[name]["gm"]
        gm[name] = lo + u * (hi - lo)
        lo, hi = NORMAL_CONCENTRATIONS_MM[name]["wm"]
        wm[name] = lo + u * (hi - lo)
    return gm, wm


def _draw_lesion_factors(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Per-patient metabolite factors for core, rim and edema relative to the local normal tissue."""
    core = rng.uniform(*CORE_FACTOR)
    return {
        "core": {m: float(core * rng.uniform(0.8, 1.2)) for m in METABOLITES},
        "rim": {m: float(rng.uniform(*RIM_FACTORS[m])) for m in METABOLITES},
        "edema": {m: float(rng.uniform(*EDEMA_FACTORS[m])) for m in METABOLITES},
    }


def _quality_mask(rng, brain, map_mni, map_affine) -> tuple[np.ndarray, dict]:
    """Brain minus a lipid-contaminated rim near the skull, 1–2 B0 regions and isolated low-SNR voxels."""
    rim_mm = float(rng.uniform(MAP_VOXEL_MM, 2 * MAP_VOXEL_MM))
    spacing = np.abs(np.diag(map_affine)[:2])
    keep = brain.copy()
    for z in range(brain.shape[2]):  # lipid bleed comes from the in-plane PSF of the scalp signal
        dist = ndimage.distance_transform_edt(brain[:, :, z], sampling=spacing)
        keep[:, :, z] &= dist > rim_mm
    names = list(B0_REGIONS_MNI)
    chosen = rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)
    regions = []
    for i in sorted(chosen):
        centre = np.array(B0_REGIONS_MNI[names[i]]) + rng.uniform(-6, 6, size=3)
        radius = float(rng.uniform(18.0, 30.0))
        shape = SmoothField.draw(rng, (15.0, 40.0))
        r = np.linalg.norm(map_mni - centre, axis=-1) * (1 + 0.25 * np.clip(shape(map_mni), -2, 2))
        keep &= r > radius
        regions.append({"name": names[i], "centre_mni_mm": centre.tolist(), "radius_mm": radius})
    low_snr = float(rng.uniform(0.01, 0.04))
    keep &= rng.random(brain.shape) >= low_snr
    return keep, {"lipid_rim_mm": rim_mm, "b0_regions": regions, "low_snr_fraction": low_snr}


def _mri_contrasts(rng, anatomy: dict, labels: np.ndarray,
                   points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """T1 from the template with lesion contrast; FLAIR synthesised from tissue fractions and lesion labels."""
    t1_f = {"core": rng.uniform(0.45, 0.6), "rim": rng.uniform(1.1, 1.3), "edema": rng.uniform(0.85, 0.93)}
    fl_tissue = {"gm": rng.uniform(0.72, 0.80), "wm": rng.uniform(0.50, 0.58), "csf": rng.uniform(0.03, 0.08)}
    fl_lesion = {"core": rng.uniform(0.55, 0.70), "rim": rng.uniform(0.85, 0.95), "edema": rng.uniform(0.95, 1.05)}
    gm, wm, brain = anatomy["gm"], anatomy["wm"], anatomy["brain"]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)  # nilearn ships no CSF map: brain × (1 − GM − WM)
    t1 = anatomy["t1"].copy()
    flair = gm * fl_tissue["gm"] + wm * fl_tissue["wm"] + csf * fl_tissue["csf"]
    heterogeneity = 1 + 0.06 * np.tanh(SmoothField.draw(rng, (6.0, 20.0))(points_mm))  # lesions are not flat
    t1_gain, fl_weight, fl_value = np.ones_like(t1), np.zeros_like(t1), np.zeros_like(t1)
    for name, value in LESION_LABELS.items():
        if value:  # soft (σ ≈ 1 mm) memberships: lesion borders blur like the real ones
            w = ndimage.gaussian_filter((labels == value).astype(np.float64), sigma=0.6)
            t1_gain += w * (t1_f[name] * heterogeneity - 1)
            fl_weight += 0.85 * w
            fl_value += 0.85 * w * fl_lesion[name] * heterogeneity
    t1 *= t1_gain
    flair = flair * (1 - fl_weight) + fl_value
    for img in (t1, flair):  # smooth receive-coil bias (±5 %) and thermal noise
        img *= 1 + 0.05 * np.tanh(SmoothField.draw(rng, (150.0, 300.0), 4)(points_mm))
        img += rng.normal(0.0, 0.01, size=img.shape)
    inside = brain >= 0.5
    t1 = np.where(inside, np.clip(t1, 1e-3, None), 0.0).astype(np.float32)  # skull-stripped: T1 > 0 ⇔ brain
    flair = np.where(inside, np.clip(flair, 1e-3, None), 0.0).astype(np.float32)
    info = {"t1_lesion_factors": t1_f, "flair_tissue": fl_tissue, "flair_lesion": fl_lesion}
    return t1, flair, {k: {n: float(v) for n, v in d.items()} for k, d in info.items()}


def make_patient(seed: int | np.random.SeedSequence, *, slices: int | None = None, patient_id: str | None = None,
                 resolution: int = 1) -> Patient:
    """One synthetic glioma patient, a deterministic function of `seed` (int or SeedSequence)."""
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    rng = np.random.default_rng(seq)
    if slices is None:
        slices = int(rng.integers(SLICE_RANGE[0], SLICE_RANGE[1] + 1))
    elif not 1 <= int(slices) <= 64:
        raise ValueError(f"slices must be between 1 and 64, got {slices}")
    slices = int(slices)
    templ = load_templates(resolution)
    pose, pose_info = _draw_pose(rng)
    lesion, lesion_info = _draw_lesion(rng, templ)
    lesion_z = pose.to_patient(lesion.centre)[2]
    z_centre = float(lesion_z + rng.uniform(-0.3, 0.3) * slices * MAP_VOXEL_MM / 2)
    map_affine = _map_affine(slices, z_centre)
    shape = (MAP_SIZE, MAP_SIZE, slices)

    def anatomy_at(points):
        q = pose.to_mni(points)
        out = _sample({k: getattr(templ, k) for k in ("t1", "gm", "wm", "brain")}, templ.affine, q)
        out["mni"] = q
        out["labels"] = lesion.labels(q, out["wm"], out["brain"])
        return out

    # Map grid: 2×2×2 sub-voxels averaged, so tissue fractions and lesion borders have partial volume.
    fine_affine = _supersampled_affine(map_affine, SUPERSAMPLE)
    fine = anatomy_at(grid_centres(fine_affine, tuple(n * SUPERSAMPLE for n in shape)))
    gm_c, wm_c = _draw_concentrations(rng)
    factors = _draw_lesion_factors(rng)
    brain_frac = _block_mean(fine["brain"], SUPERSAMPLE)
    brain = brain_frac >= 0.5
    tissue = {"gm": _block_mean(fine["gm"], SUPERSAMPLE), "wm": _block_mean(fine["wm"], SUPERSAMPLE)}
    tissue["csf"] = np.clip(brain_frac - tissue["gm"] - tissue["wm"], 0.0, 1.0)
    label_fracs = np.stack([_block_mean((fine["labels"] == v).astype(np.float32), SUPERSAMPLE) for v in range(4)])
    lesion_map = np.where(brain, np.argmax(label_fracs, axis=0), 0).astype(np.uint8)

    map_points = grid_centres(map_affine, shape)
    noise_fraction = float(rng.uniform(0.02, 0.05))
    maps = {}
    for name in METABOLITES:
        conc = fine["gm"] * gm_c[name] + fine["wm"] * wm_c[name]  # CSF holds ~no metabolites
        per_label = np.array([1.0, factors["core"][name], factors["rim"][name], factors["edema"][name]])
        hr = _block_mean(conc * per_label[fine["labels"]], SUPERSAMPLE)
        texture = SmoothField.draw(rng, (40.0, 120.0), 8)(map_points)
        hr *= 1 + 0.1 * texture / max(np.abs(texture).max(), 1e-6)  # low-frequency ±10 % variation
        hr += rng.normal(0.0, noise_fraction * wm_c[name], size=shape)  # measurement noise
        maps[name] = np.where(brain, np.clip(hr, 0.0, None), 0.0).astype(np.float32)

    quality, quality_info = _quality_mask(rng, brain, pose.to_mni(map_points), map_affine)

    mri_affine, depth = _mri_affine(rng, slices, z_centre)
    mri_points = grid_centres(mri_affine, (MRI_SIZE, MRI_SIZE, depth))
    mri = anatomy_at(mri_points)
    t1, flair, contrast_info = _mri_contrasts(rng, mri, mri["labels"], mri_points)

    info = {
        "generator": "ftddm_core.phantom", "seed": _seed_info(seq), "slices": slices, "template_mm": resolution,
        "slab_centre_z_mm": z_centre, "pose": pose_info, "lesion": lesion_info,
        "concentrations_gm_mM": gm_c, "concentrations_wm_mM": wm_c, "lesion_factors": factors,
        "noise_fraction_of_wm": noise_fraction, "quality": quality_info, "mri": contrast_info,
    }
    return Patient(
        patient_id=patient_id or f"phantom-{_seed_info(seq)['entropy']}",
        maps=maps, affine=map_affine, t1=t1, flair=flair, mri_affine=mri_affine,
        quality_mask=quality, brain_mask=brain, lesion=lesion_map,
        tissue={k: v.astype(np.float32) for k, v in tissue.items()}, info=info,
    )


def _seed_info(seq: np.random.SeedSequence) -> dict:
    return {"entropy": int(seq.entropy), "spawn_key": [int(k) for k in seq.spawn_key]}


def patient_seed(seed: int, index: int) -> np.random.SeedSequence:
    """Seed of patient `index` of a cohort: SeedSequence(seed).spawn(n)[index], independent of n."""
    return np.random.SeedSequence(int(seed), spawn_key=(int(index),))


def make_patients(n: int, seed: int = 0, *, slices: int | None = None, resolution: int = 1) -> list[Patient]:
    """A cohort of n patients sub-001 … with independent per-patient generators spawned from `seed`."""
    if n < 1:
        raise ValueError(f"number of patients must be ≥ 1, got {n}")
    return [make_patient(patient_seed(seed, i), slices=slices, patient_id=f"sub-{i + 1:03d}", resolution=resolution)
            for i in range(n)]


# ----------------------------------------------------------------------------------------------- figure
def _ras_slice(volume: np.ndarray, affine: np.ndarray, z_mm: float) -> tuple[np.ndarray, list[float]]:
    """Axial slice of a volume nearest to world z, reoriented to RAS, with its in-plane extent in mm."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(volume, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    k = int(round((z_mm - ras_affine[2, 3]) / ras_affine[2, 2]))
    k = min(max(k, 0), data.shape[2] - 1)
    dx, dy = ras_affine[0, 0], ras_affine[1, 1]
    x0, y0 = ras_affine[0, 3], ras_affine[1, 3]
    extent = [x0 - dx / 2, x0 + dx * (data.shape[0] - 0.5), y0 - dy / 2, y0 + dy * (data.shape[1] - 0.5)]
    return data[:, :, k].T, extent


def plot_patients(patients: list[Patient], path: str | Path, max_patients: int = 4) -> Path:
    """Save a PNG: one row per patient (FLAIR, T1, NAA, tCho, quality mask) at the slice with most tumour, each
    panel with a colour bar in its units (MRI a.u., maps in mM, the mask's classes named)."""
    from . import figures as F

    plt = F._pyplot()
    rows = patients[:max_patients]
    if not rows:
        raise ValueError("plot_patients needs at least one patient")
    fig, axes = plt.subplots(len(rows), 5, figsize=(14, 2.8 * len(rows)), squeeze=False)
    for r, p in enumerate(rows):
        tumour = np.isin(p.lesion, (1, 2)) if p.lesion is not None else p.brain_mask
        z = int(np.argmax(tumour.sum(axis=(0, 1))))
        z_mm = float((p.affine @ [0, 0, z, 1])[2])
        panels = [("FLAIR", p.flair, p.mri_affine, F.ANATOMY_CMAP, "FLAIR (a.u.)"),
                  ("T1", p.t1, p.mri_affine, F.ANATOMY_CMAP, "T1 (a.u.)"),
                  ("NAA", p.maps.get("NAA"), p.affine, F.MAP_CMAP, "NAA (mM)"),
                  ("tCho", p.maps.get("tCho"), p.affine, F.MAP_CMAP, "tCho (mM)"),
                  ("quality mask", p.quality_mask.astype(np.float32) + 0.3 * p.brain_mask, p.affine, "cividis", "")]
        for c, (title, vol, aff, cmap, label) in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_facecolor("black")
            if vol is None:
                continue
            img, extent = _ras_slice(vol, aff, z_mm)
            im = ax.imshow(img, origin="lower", cmap=cmap, extent=extent, interpolation="nearest")
            bar = F.colour_bar(fig, im, ax, label or "voxel class")
            if not label:  # 0 outside the brain, 0.3 brain, 1.3 brain and quality mask
                bar.set_ticks([0.0, 0.3, 1.3], labels=["outside", "brain", "quality"])
            ax.set_title(f"{p.patient_id} · {title}, z {z_mm:+.1f} mm" if c == 0 else title, fontsize=9)
            ax.set_xlim(-90, 90), ax.set_ylim(-110, 90)
    fig.suptitle("Synthetic glioma patients (MNI152 anatomy; neurological view, R on the right)", fontsize=10)
    return F._save(fig, Path(path), dpi=110)
