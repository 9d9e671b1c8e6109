"""MRSISuperResolutionLogic itself (the module file) on Slicer's real MRML libraries (slicer-core).

Only what slicer-core lacks is stubbed: the Qt application object (temporary folder, event processing, a
QTimer that the test drives by hand) and the scripted-module base classes. Nodes, geometry, subject hierarchy,
display and the background `ftddm super-resolve` process are real.
"""
import importlib
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
pytest.importorskip("torch")

MODULE_DIR = Path(__file__).resolve().parents[2] / "MRSISuperResolution"


class FakeTimer:
    """qt.QTimer stand-in: records the callback; the test calls it."""

    def __init__(self):
        self.callback, self.active = None, False

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, callback):
        self.callback = callback

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    """Import MRSISuperResolution.py against slicer-core plus minimal stubs; undo everything afterwards."""
    temp = tmp_path_factory.mktemp("slicer-temp")
    added = {}

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        added[name] = m
        sys.modules[name] = m
        return m

    def base(name):
        return type(name, (), {"__init__": lambda self, *a, **k: None})

    marker = lambda *a, **k: None  # noqa: E731
    stub("qt", QTimer=FakeTimer)
    stub("slicer.i18n", tr=lambda s: s, translate=lambda c, s: s)
    stub("slicer.parameterNodeWrapper", Choice=marker, Decimals=marker, SingleStep=marker, WithinRange=marker,
         Validator=object,
         parameterNodeWrapper=lambda cls: cls)
    stub("slicer.ScriptedLoadableModule", **{n: base(n) for n in (
        "ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
        "ScriptedLoadableModuleWidget")})
    app = types.SimpleNamespace(temporaryPath=str(temp), processEvents=lambda *a: None,
                                pauseRender=lambda: None, resumeRender=lambda: None, connect=lambda *a: None)
    had_app = hasattr(slicer, "app")
    slicer.app = app
    sys.path.insert(0, str(MODULE_DIR))
    for name in ("readerstudylogic", "readerstudywidget", "resultviews", "runhandle"):
        # helpers that bind qt/slicer at import: loaded again below, against these stubs
        sys.modules.pop("MRSISuperResolutionLib." + name, None)
    try:
        mod = importlib.import_module("MRSISuperResolution")
        yield mod
    finally:
        sys.modules.pop("MRSISuperResolution", None)
        for name in added:
            sys.modules.pop(name, None)
        if not had_app:
            del slicer.app


@pytest.fixture
def scene(module):
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    yield s
    s.Clear(1)


@pytest.fixture
def patient(scene, sample_patient):
    nodes = {}
    for key, (data, affine) in sample_patient.items():
        nodes[key] = slicer.util.addVolumeFromArray(np.transpose(data, (2, 1, 0)).astype(np.float32), affine,
                                                    name="Synthetic_" + key)
    return nodes


def test_process_blocking_returns_output_nodes_on_the_model_grid(module, scene, patient, tiny_model):
    logic = module.MRSISuperResolutionLogic()
    grid = logic.detectedGrid(patient["NAA"])
    assert (grid.axis, grid.lr_inplane, grid.inplane, grid.scale) == (2, (16, 16), (64, 64), 4.0)
    maps = logic.mrsiInputs(patient["NAA"], True, [patient["T1"], patient["FLAIR"]])
    assert [n.GetName() for n in maps] == ["Synthetic_NAA", "Synthetic_tCho"]
    outs = logic.process(maps, patient["T1"], patient["FLAIR"], modelPath=str(tiny_model), steps=1, samples=2,
                         device="cpu", seed=5)
    assert len(outs) == 2 and all(isinstance(o, module.OutputNodes) for o in outs)
    expected = module.mrml.node_world_affine(patient["NAA"])
    expected[:3, :2] /= 4.0
    for out, lr in zip(outs, maps):
        assert out.sr.GetName() == lr.GetName() + "_SR"
        for node in out:
            assert node.GetImageData().GetDimensions() == (64, 64, 6)
            np.testing.assert_allclose(module.mrml.node_world_affine(node), expected, atol=1e-4)
        assert out.sr.GetDisplayNode().GetWindowLevelMax() == pytest.approx(
            out.zeroFilled.GetDisplayNode().GetWindowLevelMax())
    settings = outs[0].sr.GetAttribute(module.mrml.SETTINGS_ATTRIBUTE)
    assert '"steps": 1' in settings and '"factor": 4.0' in settings
    assert list(Path(slicer.app.temporaryPath).iterdir()) == []  # temporary files removed
    # the reader study finds LR/SR pairs of both maps, on slices that carry signal
    sources = logic.readerSources(slicesPerMap=2, seed=1)
    assert {s.metabolite for s in sources} == {"Synthetic_NAA", "Synthetic_tCho"}
    assert all(0 <= s.slice_index < 6 for s in sources) and len(sources) == 4
    assert {s.sr_ref for s in sources} == {outs[0].sr.GetID(), outs[1].sr.GetID()}


def test_process_refuses_bad_requests_before_starting(module, scene, patient):
    logic = module.MRSISuperResolutionLogic()
    with pytest.raises(ValueError, match="T1 and FLAIR"):
        logic.process(patient["NAA"], None, patient["FLAIR"])
    with pytest.raises(ValueError, match="unknown"):
        logic.process(patient["NAA"], patient["T1"], patient["FLAIR"], tauD=0.5)
    with pytest.raises(ValueError, match="grid"):
        logic.process([patient["NAA"], patient["T1"]], patient["T1"], patient["FLAIR"])
    with pytest.raises(ValueError, match="steps"):
        logic.process(patient["NAA"], patient["T1"], patient["FLAIR"], steps=0)
    assert list(Path(slicer.app.temporaryPath).iterdir()) == []


def test_cancel_of_a_background_run_leaves_the_scene_unchanged(module, scene, patient, tiny_model):
    from MRSISuperResolutionLib.process import _descendants, pid_alive

    logic = module.MRSISuperResolutionLogic()
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    finished, progress = [], []
    handle = logic.process(patient["NAA"], patient["T1"], patient["FLAIR"], modelPath=str(tiny_model),
                           sampler="respaced", start="flow", steps=100, samples=32, device="cpu", waitForCompletion=False,
                           onProgress=progress.append, onFinished=finished.append)
    timer = handle._timer
    assert timer.active and timer.interval == module.RunHandle.POLL_MS
    deadline = time.monotonic() + 60
    while not progress and handle.state == "running" and time.monotonic() < deadline:
        timer.callback()  # what the QTimer does on the main thread
        time.sleep(0.05)
    assert progress and handle.state == "running"
    tree = [handle.job.pid, *_descendants(handle.job.pid)]
    asked = time.monotonic()
    handle.cancel()  # what the Cancel button does: ask, never wait in the GUI thread
    assert time.monotonic() - asked < 0.5
    assert handle.state == "cancelling" and finished == [] and timer.active
    deadline = time.monotonic() + 10
    while handle.active and time.monotonic() < deadline:
        timer.callback()  # the same timer notices when the process tree has ended
        time.sleep(0.05)
    assert handle.state == "cancelled" and finished == [handle] and not timer.active
    assert not any(pid_alive(p) for p in tree)
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes
    assert patient["NAA"].GetNodeReference("MRSISuperResolution.sr") is None
    assert not handle.job.folder.exists()
