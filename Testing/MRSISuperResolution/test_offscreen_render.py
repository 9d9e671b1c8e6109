"""The module's views rendered by Slicer's real slice logic and displayable managers (slicer-core, offscreen
EGL/OSMesa), and Slicer's real interactor style driven by mouse events.

Checked against independent geometry: a pixel's RAS comes from Slicer's own XYToRAS matrix of the view, its
voxel from the numpy affine the map was stored with.
"""
import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLSliceViewInteractorStyle"):
    pytest.skip("the installed 'slicer' package is not slicer-core with displayable managers",
                allow_module_level=True)

RESOURCES = Path(__file__).resolve().parents[2] / "MRSISuperResolution" / "Resources"
sys.path.insert(0, str(RESOURCES))
offscreenviews = importlib.import_module("offscreenviews")
sys.path.remove(str(RESOURCES))
from MRSISuperResolutionLib import mrml, readerstudy, sampledata  # noqa: E402

REPO = RESOURCES.parents[1]
_problem = offscreenviews.offscreen_rendering_problem()
needs_offscreen = pytest.mark.skipif(bool(_problem), reason=_problem or "")


def test_every_screenshot_url_names_a_committed_png():
    text = (REPO / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', text).group(1).split()
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "https://github.com/([^"]+)"\)', text).group(1)
    assert {"overlay.png", "compare_layout.png"} <= {u.rsplit("/", 1)[1] for u in urls}
    for url in urls:
        prefix = f"https://raw.githubusercontent.com/{homepage}/main/"
        assert url.startswith(prefix), url  # the same repository placeholder as EXTENSION_HOMEPAGE
        png = REPO / url[len(prefix):]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.fixture
def app():
    had_app = hasattr(slicer, "app")
    scene = slicer.vtkMRMLScene()
    application = offscreenviews.install_application(scene)
    for name in ("readerstudylogic", "resultviews"):  # bind to this application's slicer.app
        sys.modules.pop("MRSISuperResolutionLib." + name, None)
    yield application
    application.close()
    for name in ("readerstudylogic", "resultviews"):
        sys.modules.pop("MRSISuperResolutionLib." + name, None)
    if not had_app:
        del slicer.app


def add_volume(data_ijk, affine, name):
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(np.transpose(data_ijk, (2, 1, 0)), np.float32),
                                          affine, name=name)


def quadrant_map():
    """A map on the model grid of the sample patient: 0.6 in the quadrant i, j < 32 of every slice, else 0."""
    lr_affine = sampledata.mrsi_affine()
    hr_affine = lr_affine.copy()
    hr_affine[:3, :2] /= sampledata.MODEL_MATRIX / sampledata.MRSI_MATRIX
    data = np.zeros((64, 64, sampledata.MRSI_SLICES), np.float32)
    data[:32, :32] = 0.6
    data[60:, 60:] = 1.0  # sets the window top: the quadrant shows mid-table colours, not the top (near white)
    return data, hr_affine, lr_affine


@pytest.fixture
def patient_with_outputs(app):
    """The sample patient in the scene and one map's outputs stored the way the logic stores them."""
    patient = sampledata.synthetic_patient()
    nodes = {key: add_volume(data, affine, "Synthetic_" + key) for key, (data, affine) in patient.items()}
    sr, hr_affine, _ = quadrant_map()
    maps = {"sr": (sr, hr_affine), "zerofilled": (0.8 * sr, hr_affine), "uncertainty": (0.1 * sr, hr_affine)}
    outputs = mrml.store_outputs(slicer.mrmlScene, nodes["NAA"], maps, "{}")
    return nodes, outputs, sr, hr_affine


def pixel_ijk(view, shape, affine):
    """Continuous (i, j, k) under each pixel centre: the view's own XYToRAS, then the map's inverse affine."""
    xy_to_ras = slicer.util.arrayFromVTKMatrix(view.sliceNode.GetXYToRAS())
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width]
    xy = np.stack([xs.ravel() + 0.5, (height - 1 - ys).ravel() + 0.5, np.zeros(xs.size), np.ones(xs.size)])
    return (np.linalg.inv(affine) @ xy_to_ras @ xy)[:3].T.reshape(height, width, 3)


@needs_offscreen
def test_overlay_view_colours_exactly_where_the_sr_map_has_signal(patient_with_outputs):
    from MRSISuperResolutionLib import resultviews

    nodes, outputs, sr, hr_affine = patient_with_outputs
    resultviews.show_overlay(outputs["sr"], nodes["T1"])  # the module's own overlay code path
    view = slicer.app.layoutManager().sliceWidget("Red")
    image = view.render().astype(int)
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # a real picture, not blank

    ijk = pixel_ijk(view, image.shape[:2], hr_affine)
    i, j, k = ijk[..., 0], ijk[..., 1], ijk[..., 2]
    in_slab = (k > -0.4) & (k < sr.shape[2] - 0.6)
    assert in_slab.mean() > 0.99  # rotated to the slab: the view plane is an SR slice
    coloured = (np.abs(image[..., 0] - image[..., 1]) + np.abs(image[..., 1] - image[..., 2])) > 30
    inside = in_slab & (i > 1) & (i < 30) & (j > 1) & (j < 30)  # the quadrant, a voxel away from its edge
    outside = in_slab & ((i > 34) | (j > 34)) & ~((i > 57) & (j > 57))  # zero voxels, away from any signal
    assert inside.sum() > 1000 and outside.sum() > 1000
    assert coloured[inside].mean() > 0.98
    assert coloured[outside].mean() < 0.01  # below the threshold the SR is transparent: T1 grey only


def window_level(node):
    d = node.GetDisplayNode()
    return d.GetWindowLevelMin(), d.GetWindowLevelMax()


@needs_offscreen
def test_left_drag_adjusts_window_level_but_not_during_the_reader_study(patient_with_outputs):
    from MRSISuperResolutionLib import readerstudylogic

    nodes, outputs, _sr, _affine = patient_with_outputs
    lm = slicer.app.layoutManager()
    interaction = slicer.app.applicationLogic().GetInteractionNode()
    interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.AdjustWindowLevel)  # Slicer's W/L mouse mode
    slicer.util.setSliceViewerLayers(background=nodes["T1"], foreground=None, fit=True)
    red = lm.sliceWidget("Red")
    red.render()
    before = nodes["T1"].GetDisplayNode().GetWindow()
    red.left_drag((200, 200), (300, 200))  # rightwards: wider window (vtkMRMLWindowLevelWidget)
    assert nodes["T1"].GetDisplayNode().GetWindow() > before + 1.0

    reading = readerstudylogic.ReaderStudyDisplay()
    sources = reading.readerSources(slicesPerMap=1, seed=0)
    trial = readerstudy.plan_trials(sources, study_seed=0, reader_seed=0)[0]
    reading.showTrial(trial)
    assert lm.sliceViewNames() == ["ReaderA", "ReaderB"]
    viewA = lm.sliceWidget("ReaderA")
    shownA = slicer.mrmlScene.GetNodeByID(viewA.mrmlSliceCompositeNode().GetBackgroundVolumeID())
    assert shownA.GetID() == trial.ref("A")
    shared = window_level(shownA)
    viewA.render()
    untouched = shownA.GetDisplayNode().GetMTime()
    viewA.left_drag((200, 200), (320, 120))
    assert window_level(shownA) == pytest.approx(shared)
    assert shownA.GetDisplayNode().GetMTime() == untouched  # the mouse mode stops the drag itself
    # a reader who picks the W/L mouse mode during the reading: the drag acts, the shared window comes back
    interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.AdjustWindowLevel)
    viewA.left_drag((200, 200), (320, 120))
    assert shownA.GetDisplayNode().GetMTime() > untouched  # the widget did act ...
    assert window_level(shownA) == pytest.approx(shared)  # ... and the reading's observer put the window back

    interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.ViewTransform)
    reading.endReading()  # the mouse mode the user had before the reading comes back
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.AdjustWindowLevel
    assert set(lm.sliceViewNames()) == {"Red", "Green", "Yellow"}
    red.render()
    before = nodes["T1"].GetDisplayNode().GetWindow()
    red.left_drag((200, 200), (300, 200))
    assert nodes["T1"].GetDisplayNode().GetWindow() > before + 1.0  # the user's W/L dragging is back
