"""Layout XML, shared display window, dependency checks and the shipped sample patient."""
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from MRSISuperResolutionLib import dependencies, display, layouts, niftiio, sampledata

MODULE_DIR = Path(__file__).resolve().parents[2] / "MRSISuperResolution"


# --- layouts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, names, group", [
    (layouts.compare_layout_xml, ["MRSIZeroFilled", "MRSISR", "MRSIUncertainty", "MRSIFLAIR"],
     layouts.COMPARE_VIEW_GROUP),
    (layouts.reader_layout_xml, ["ReaderA", "ReaderB"], layouts.READER_VIEW_GROUP)])
def test_layouts_are_one_row_of_linked_slice_views(make, names, group):
    xml = make("Coronal")
    root = ET.fromstring(xml)
    assert root.tag == "layout" and root.get("type") == "horizontal"
    assert [item[0].tag for item in root] == ["view"] * len(names)
    views = layouts.layout_views(xml)
    assert [v["name"] for v in views] == names
    assert {v["class"] for v in views} == {"vtkMRMLSliceNode"}
    assert {v["orientation"] for v in views} == {"Coronal"}
    assert {v["viewgroup"] for v in views} == {str(group)}  # one group: links reach these views only
    for view in root.iter("view"):  # only properties vtkMRMLLayoutLogic applies
        assert {p.get("name") for p in view} <= set(layouts.VIEW_PROPERTIES)


def test_reader_views_are_neutral():
    views = layouts.layout_views(layouts.reader_layout_xml())
    assert [v["viewlabel"] for v in views] == ["A", "B"]
    assert len({v["viewcolor"] for v in views}) == 1
    assert layouts.COMPARE_LAYOUT_ID >= 100 and layouts.READER_LAYOUT_ID >= 100
    assert layouts.COMPARE_VIEW_GROUP != layouts.READER_VIEW_GROUP
    with pytest.raises(ValueError, match="orientation"):
        layouts.compare_layout_xml("Oblique")


# --- display --------------------------------------------------------------------------------------------
def test_shared_window_pools_all_maps_and_ignores_hot_voxels():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 10, 1000), rng.uniform(0, 5, 1000)
    a[0] = 1e6  # one hot voxel
    lo, hi = display.shared_window([a, b], upper_percentile=99.0)
    assert lo == 0.0
    assert hi == pytest.approx(np.percentile(np.concatenate([a, b]), 99.0))
    assert hi < 20
    assert display.shared_window([np.array([-2.0, 1.0])])[0] == -2.0
    assert display.shared_window([np.zeros(5)]) == (0.0, 1.0)
    assert display.shared_window([np.full(3, np.nan)]) == (0.0, 1.0)
    with pytest.raises(ValueError):
        display.shared_window([])


def test_first_existing_colour_falls_back_to_the_builtin_table():
    assert display.first_existing(display.METABOLITE_COLORS, lambda i: True) == display.METABOLITE_COLORS[0]
    assert display.first_existing(display.METABOLITE_COLORS, lambda i: False) == "vtkMRMLColorTableNodeIron"


# --- dependencies -----------------------------------------------------------------------------------------
def test_requirements_file_parses_and_never_lists_torch():
    reqs = dependencies.load_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {dist.lower() for dist, _, _ in reqs}
    assert {"nibabel", "safetensors", "scipy", "scikit-image"} <= names
    assert "torch" not in names  # torch comes from the PyTorch extension (right CUDA build)
    assert ("scikit-image", "skimage", "scikit-image>=0.21") in reqs


def test_missing_requirements_uses_import_names():
    reqs = dependencies.parse_requirements("numpy>=1\nscikit-image>=0.2  # comment\n\nnot-a-real-pkg-xyz>=1\n")
    assert dependencies.missing_requirements(reqs) == ["not-a-real-pkg-xyz>=1"]
    seen = []
    dependencies.missing_requirements(reqs, find_spec=lambda name: seen.append(name) or object())
    assert seen == ["numpy", "skimage", "not_a_real_pkg_xyz"]
    with pytest.raises(ValueError, match="requirement"):
        dependencies.parse_requirements(">=1.0")


# --- sample patient ---------------------------------------------------------------------------------------
def test_shipped_sample_files_match_their_checksums_and_the_generator(sample_patient):
    folder = MODULE_DIR / "Resources" / "SampleData"
    names = sampledata.sample_file_names()
    assert set(names.values()) == set(sampledata.SAMPLE_FILES)
    total = 0
    for key, (data, affine) in sample_patient.items():
        path = folder / names[key]
        assert sampledata.sha256(path) == sampledata.SAMPLE_FILES[names[key]][1]
        shipped, shipped_affine = niftiio.read_nifti(path)
        np.testing.assert_allclose(shipped, data, atol=1e-5)
        np.testing.assert_allclose(shipped_affine, affine, atol=1e-4)
        total += path.stat().st_size
    assert total < 3_000_000  # a few MB at most


def test_sample_patient_is_a_plausible_lr_exam(sample_patient):
    naa, naa_affine = sample_patient["NAA"]
    assert naa.shape == (16, 16, 6) and naa.dtype == np.float32
    t1, t1_affine = sample_patient["T1"]
    # the lesion (NAA ≈ 3 vs ≈ 10 in white matter) is visible in the LR NAA map at the lesion centre
    lesion_ras = np.array([28.0, -20.0, 25.0])
    ijk = np.linalg.solve(naa_affine, np.append(lesion_ras, 1))[:3]
    i, j, k = np.round(ijk).astype(int)
    assert naa[i, j, k] < 0.6 * np.percentile(naa[naa > 0], 90)
    # tCho is raised there; FLAIR is bright there
    tcho = sample_patient["tCho"][0]
    assert tcho[i, j, k] > np.percentile(tcho[tcho > 0], 75)
    fl, fl_affine = sample_patient["FLAIR"]
    fi, fj, fk = np.round(np.linalg.solve(fl_affine, np.append(lesion_ras + [8, 0, 0], 1))[:3]).astype(int)
    assert fl[fi, fj, fk] > 140
    assert t1_affine[0, 0] < 0  # LAS: exercises the axis flips


def test_sample_lr_maps_use_the_engines_kspace_truncation():
    # the LR maps are made like the engine's training data: k-space truncation of the 64×64 map (ftddm_core)
    kspace = pytest.importorskip("ftddm_core.kspace")
    hr = np.random.default_rng(4).random((64, 64, 3))
    ours = sampledata._truncate_kspace(hr, 16)
    engine = np.real(kspace.downsample(np.moveaxis(hr, -1, 0), 16))
    np.testing.assert_allclose(np.moveaxis(ours, -1, 0), engine, atol=1e-10)
