"""The module's parameter node with Slicer 5.10's real parameterNodeWrapper, ScriptedLoadableModule and i18n.

slicer-core ships MRML and slicer.util but not those pure-Python packages; the project keeps unmodified copies
in ../shared/reference/slicer_python/v5.10.0, which are added to the `slicer` package here. Only Qt and CTK
(widget classes the wrapper names but the parameter node never uses) and the application object are stubbed.
"""
import contextlib
import dataclasses
import importlib
import logging
import pathlib
import sys
import types

import pytest

from conftest import MODULE_DIR, shared_folder

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
SHARED = shared_folder()
REAL_SLICER = SHARED / "reference" / "slicer_python" / "v5.10.0" / "Base" / "Python" / "slicer" if SHARED else None
if REAL_SLICER is None or not (REAL_SLICER / "parameterNodeWrapper" / "wrapper.py").is_file():
    pytest.skip("Slicer's real Python sources are absent (../shared/reference/slicer_python/v5.10.0 beside the "
                "repository); these tests need them", allow_module_level=True)

from ftddm_core.options import SAMPLERS, option  # noqa: E402

try:  # imported before the fixture puts Qt stand-ins in sys.modules (torch's import inspects every module)
    from ftddm_core import volume as engine_volume
except ModuleNotFoundError:  # no torch: the comparisons with the engine's target grid are skipped
    engine_volume = None
from MRSISuperResolutionLib.options import SuperResolveOptions, node_parameters, options_from_node  # noqa: E402

REAL_MODULES = ("slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule")
# module helpers that import qt/slicer at load time: imported afresh here, and dropped again afterwards, so
# neither these stand-ins nor another test's stubs leak between test files
SLICER_BOUND = tuple(f"MRSISuperResolutionLib.{n}" for n in ("readerstudylogic", "readerstudywidget", "resultviews",
                                                               "runhandle"))
# Qt widget classes of Slicer's qMRMLWidgets that the wrapper's GUI connectors name (absent from slicer-core)
QMRML_WIDGETS = ("qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLScreenShotDialog", "qMRMLSliderWidget",
                 "qMRMLSpinBox", "qMRMLUtils", "qMRMLWidget", "qSlicerWidget")


class _Anything(type):
    """Metaclass of the Qt/CTK stand-ins: any attribute is another stand-in class (qt.Qt.Checked, …)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(name)


def _stand_in(name):
    return _Anything(name, (), {"__init__": lambda self, *args, **kwargs: None})


def _widget_toolkit(name):
    module = types.ModuleType(name)
    module.__getattr__ = _stand_in
    return module


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Import MRSISuperResolution.py with the real wrapper; collect every warning logged meanwhile; undo after."""
    saved = {n: sys.modules.get(n) for n in ("qt", "ctk", "MRSISuperResolution")}
    for name in ("qt", "ctk"):
        sys.modules[name] = _widget_toolkit(name)
    had_app, had_self_tests = hasattr(slicer, "app"), hasattr(slicer, "selfTests")
    temp = tmp_path_factory.mktemp("slicer-app")
    slicer.app = types.SimpleNamespace(translate=lambda context, text: text, connect=lambda *a: None,
                                       temporaryPath=str(temp), defaultScenePath=str(temp / "SlicerData"),
                                       processEvents=lambda *a: None)
    widgets = [n for n in QMRML_WIDGETS if not hasattr(slicer, n)]
    for name in widgets:
        setattr(slicer, name, _stand_in(name))
    slicer.__path__.append(str(REAL_SLICER))
    for name in ("MRSISuperResolution", *SLICER_BOUND):
        sys.modules.pop(name, None)
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        loaded = {name: importlib.import_module(name) for name in REAL_MODULES}
        module = importlib.import_module("MRSISuperResolution")
        yield types.SimpleNamespace(module=module, wrapper=loaded["slicer.parameterNodeWrapper"],
                                    sources=loaded, warnings=warnings)
    finally:
        logging.getLogger().removeHandler(warnings)
        slicer.__path__.remove(str(REAL_SLICER))
        for name in [n for n in sys.modules if n.startswith(REAL_MODULES)]:
            del sys.modules[name]
        for attr in ("i18n", "parameterNodeWrapper", "ScriptedLoadableModule", *widgets):
            if hasattr(slicer, attr):
                delattr(slicer, attr)
        for name in SLICER_BOUND:
            sys.modules.pop(name, None)
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        if not had_app:
            del slicer.app
        if not had_self_tests and hasattr(slicer, "selfTests"):
            del slicer.selfTests


@pytest.fixture
def scene(real):
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    yield s
    s.Clear(1)


@pytest.fixture
def node(real, scene):
    return real.module.MRSISuperResolutionLogic().getParameterNode()


@contextlib.contextmanager
def saved_and_loaded(real, scene, folder):
    """The module's parameter node of `scene` after a real save (Commit) and load (Import) of the scene file."""
    path = folder / "scene.mrml"
    scene.SetURL(str(path))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(path))
    assert loaded.Import()
    slicer.mrmlScene = loaded
    try:
        yield real.module.MRSISuperResolutionLogic().getParameterNode()
    finally:
        loaded.Clear(1)


def test_the_real_slicer_sources_are_used_and_log_no_warning(real):
    for name, source in real.sources.items():
        assert pathlib.Path(source.__file__).resolve().is_relative_to(REAL_SLICER.resolve()), name
    assert real.module.MRSISuperResolutionParameterNode.__module__ == "MRSISuperResolution"
    assert real.warnings.messages == []
    # the capture sees what the wrapper logs: a GUI-only hint on a parameter is reported at decoration time
    from typing import Annotated

    real.wrapper.parameterNodeWrapper(type("Probe", (), {"__annotations__": {"x": Annotated[float,
                                                                                        real.wrapper.Decimals(2)]}}))
    assert any("Unused annotations" in m for m in real.warnings.messages)
    real.warnings.messages.clear()


def test_defaults_match_the_engine_options_and_are_written_to_the_node(real, node):
    assert real.module.MRSISuperResolutionLogic.parametersFromNode(node) == SuperResolveOptions()
    for parameter in node_parameters():
        for name in filter(None, (parameter.name, parameter.automatic_name)):
            assert node.parameterNode.HasParameter(name), name  # the wrapper stored it in the MRML node
    assert node.autoScale and node.autoFactor and node.autoSliceAxis  # automatic by default, as the engine
    assert node.mrsiVolume is None and node.srVolume is None and node.useDefaultModel
    assert node.studyFolder == pathlib.Path()  # "unset": the widget replaces it by a real folder on entry
    assert node.lastRunTauD == -1.0
    assert node.parameterNode.GetAttribute("ModuleName") == "MRSISuperResolution"


def test_every_option_field_is_a_node_parameter(real):
    """The node's parameters are generated from the dataclass: each field has one (plus auto<Name> for a field
    with an automatic value), so a field added to SuperResolveOptions appears in the node."""
    parameters = node_parameters()
    assert [p.field for p in parameters] == [f.name for f in dataclasses.fields(SuperResolveOptions)]
    generated = {n for p in parameters for n in (p.name, p.automatic_name) if n}
    assert generated <= set(real.module.MRSISuperResolutionParameterNode.allParameters)
    assert {p.field for p in parameters if p.automatic_name} == {"factor", "scale", "slice_axis", "max_batch",
                                                                 "t_trunc"}
    assert {"tauD", "dataConsistency", "sliceAxis", "maxBatch", "autoScale"} <= generated


def test_a_field_added_to_the_dataclass_reaches_a_node_with_no_other_edit(real, scene):
    extended = dataclasses.make_dataclass(
        "Extended", [("guidance_gain", float, option(0.5, "a made-up option", bounds=(0.0, 1.0)))],
        bases=(SuperResolveOptions,))
    probe = type("Probe", (), {"__annotations__": {"mrsiVolume": slicer.vtkMRMLScalarVolumeNode}})
    wrapped = real.wrapper.parameterNodeWrapper(real.module.withSuperResolveOptions(probe, extended))
    node = wrapped(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    assert node.guidanceGain == 0.5 and node.parameterNode.HasParameter("guidanceGain")
    with pytest.raises(ValueError):
        node.guidanceGain = 1.5  # WithinRange from the field's bounds
    node.guidanceGain, node.tauD = 0.25, 1.5
    assert options_from_node(node, extended) == extended(guidance_gain=0.25, tau_d=1.5)
    assert real.warnings.messages == []


def _non_default(f):
    """A valid value ≠ the default for every field, from its metadata alone (a new field is covered too)."""
    meta = f.metadata
    if isinstance(f.default, bool):
        return not f.default
    if meta["choices"] is not None:
        return next(c for c in reversed(meta["choices"]) if c != f.default)
    return type(f.default)((meta["trained"] or meta["bounds"])[1])


# start="flow" (its non-default) refuses a t_trunc (the flow draws at the model's own Ttrunc), so the test below
# keeps the default start and the next one round-trips the flow start
COUPLED_DEFAULTS = ("start",)


def test_the_flow_start_round_trips_with_an_automatic_t_trunc(real, scene, node, tmp_path):
    node.start, node.autoTTrunc = "flow", True
    with saved_and_loaded(real, scene, tmp_path) as again:
        back = real.module.MRSISuperResolutionLogic.parametersFromNode(again)
        assert (back.start, back.t_trunc) == ("flow", 0)


def test_every_option_round_trips_through_the_node_a_saved_scene_and_parametersFromNode(real, scene, node, tmp_path):
    expected = SuperResolveOptions(**{f.name: _non_default(f) for f in dataclasses.fields(SuperResolveOptions)
                                      if f.name not in COUPLED_DEFAULTS})
    assert all(getattr(expected, f.name) != f.default for f in dataclasses.fields(SuperResolveOptions)
               if f.name not in COUPLED_DEFAULTS)
    for parameter in node_parameters():
        if parameter.automatic_name:
            setattr(node, parameter.automatic_name, False)
        setattr(node, parameter.name, getattr(expected, parameter.field))
    with saved_and_loaded(real, scene, tmp_path) as again:
        assert again.parameterNode is not node.parameterNode  # read back from the file, not the same object
        assert real.module.MRSISuperResolutionLogic.parametersFromNode(again) == expected
        again.autoScale = again.autoFactor = again.autoSliceAxis = True  # back to automatic: the engine's 0 / −1
        back = real.module.MRSISuperResolutionLogic.parametersFromNode(again)
        assert (back.scale, back.factor, back.slice_axis) == (0.0, 0.0, -1)


def _accepts_node(node, name, value):
    try:
        setattr(node, name, value)
        return True
    except ValueError:
        return False


def _accepts_engine(field, value):
    try:
        SuperResolveOptions(**{field: value})
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("name, field, values", [
    ("tauD", "tau_d", [-0.01, 0.0, 0.9, 2.0, 2.01]),
    ("tauF", "tau_f", [-0.01, 0.0, 2.0, 2.01]),
    ("steps", "steps", [0, 1, 1000, 1001]),
    ("samples", "samples", [0, 1, 64, 65]),
    ("dataConsistency", "data_consistency", [-0.01, 0.0, 1.0, 1.01]),
    ("seed", "seed", [-1, 0, 2**31 - 1, 2**31]),
    # 0 / −1 (automatic) are autoMaxBatch, autoFactor, autoScale and autoSliceAxis in the node
    ("maxBatch", "max_batch", [-1, 1, 4096, 4097]),
    ("factor", "factor", [-1.0, 1.5, 1.99, 2.0, 5.5, 8.0, 8.01]),
    ("scale", "scale", [0.5, 1.99, 2.0, 8.0, 8.01]),
    ("sliceAxis", "slice_axis", [-2, 0, 2, 3]),
    ("sampler", "sampler", [*SAMPLERS, "euler", ""]),
    ("spacing", "spacing", ["uniform", "logsnr", "linear"]),
    ("device", "device", ["auto", "cpu", "cuda", "mps", "tpu"]),
])
def test_the_node_refuses_what_the_engine_would_refuse(node, name, field, values):
    """Validators of the real wrapper: the node accepts exactly what the run accepts (no late failure)."""
    verdicts = {v: (_accepts_node(node, name, v), _accepts_engine(field, v)) for v in values}
    assert any(not node_ok for node_ok, _engine in verdicts.values()), f"{name}: nothing refused"
    assert all(node_ok == engine for node_ok, engine in verdicts.values()), verdicts


def test_values_and_node_references_survive_a_scene_save_and_load(real, scene, node, tmp_path):
    import numpy as np

    volumes = {key: slicer.util.addVolumeFromArray(np.ones((2, 3, 4), np.float32), name=f"Vol_{key}")
               for key in ("mrsi", "t1", "flair")}
    node.mrsiVolume, node.t1Volume, node.flairVolume = volumes["mrsi"], volumes["t1"], volumes["flair"]
    node.tauD, node.sampler, node.steps, node.factor, node.bf16 = 0.35, "respaced", 25, 3.5, True
    node.studyFolder = tmp_path / "study"
    node.readerName = "Dr Ä"
    node.modelPath = tmp_path / "model.safetensors"
    with saved_and_loaded(real, scene, tmp_path) as again:
        assert again.parameterNode is not node.parameterNode  # read back from the file, not the same object
        assert (again.tauD, again.sampler, again.steps, again.factor, again.bf16) == (0.35, "respaced", 25, 3.5, True)
        assert again.studyFolder == tmp_path / "study" and again.modelPath == tmp_path / "model.safetensors"
        assert again.readerName == "Dr Ä"
        assert [again.mrsiVolume.GetName(), again.t1Volume.GetName(), again.flairVolume.GetName()] == \
            ["Vol_mrsi", "Vol_t1", "Vol_flair"]
        assert again.maskVolume is None
        assert again.tauF == SuperResolveOptions().tau_f  # untouched values keep their defaults
    assert real.warnings.messages == []


def test_module_descriptor_builds_with_the_real_base_class(real):
    """The real ScriptedLoadableModule.__init__ runs (icon, self-test registration) and our help keeps the notice."""
    parent = types.SimpleNamespace(path=str(MODULE_DIR / "MRSISuperResolution.py"))
    slicer.app.moduleDocumentationUrl = lambda name: f"https://example.invalid/{name}"
    real.module.MRSISuperResolution(parent)
    assert parent.title == "MRSI Super-Resolution" and parent.categories == ["Quantification"]
    assert "Research use only" in parent.helpText and "synthetic" in parent.helpText
    assert "https://example.invalid/MRSISuperResolution" in parent.helpText  # the base class's link, appended
    assert slicer.selfTests["MRSISuperResolution"]  # registered by the real base class for Reload and Test


# --- output grid (autoFactor / factor): label, the widget's controls and the run's command line ------------------
def _mrsi_node(shape, spacing, name="MRSI"):
    """A scalar volume of (i, j, k) shape `shape` with voxel size `spacing` (mm), as Slicer loads an MRSI map."""
    import numpy as np

    data = np.random.default_rng(sum(shape)).random(shape[::-1]).astype(np.float32)  # Slicer arrays are [k, j, i]
    return slicer.util.addVolumeFromArray(data, np.diag([*spacing, 1.0]), name=name)


def _engine_grid(node, factor):
    """The engine's own target grid (ftddm_core.volume.target_grid) of the node's array and geometry."""
    if engine_volume is None:
        pytest.skip("needs the engine's packages (torch)")
    from MRSISuperResolutionLib import geometry, mrml

    data, affine = mrml.volume_arrays(node)
    lr = engine_volume.Volume(data, affine)
    return engine_volume.target_grid(lr, geometry.detect_slice_axis(data.shape, affine), 64, factor=factor)


class _Shown:
    """What a Qt widget shows: any attribute can be set; setVisible is recorded."""

    def setVisible(self, visible):
        self.visible = visible


class _Ui:
    def __getattr__(self, name):
        widget = _Shown()
        setattr(self, name, widget)
        return widget


def _widget_showing(real, node):
    """The module's widget with a recording stand-in for its .ui, after one real _updateGui(node)."""
    widget = real.module.MRSISuperResolutionWidget.__new__(real.module.MRSISuperResolutionWidget)
    widget.ui, widget.logic, widget._run, widget.readerPanel = _Ui(), real.module.MRSISuperResolutionLogic(), None, None
    widget._updateGui(node)
    return widget


def test_output_grid_label_and_controls_follow_the_engine_for_square_and_rectangular_maps(real, node):
    import math

    node.mrsiVolume = _mrsi_node((16, 16, 6), (10.0, 10.0, 20.0))
    widget = _widget_showing(real, node)
    assert widget.ui.outputGridLabel.text == "LR 16×16 → 64×64 in-plane, s = 4.00"
    assert widget.ui.factorSpinBox.enabled is False and widget.ui.scaleSpinBox.enabled is False
    assert node.scale == _engine_grid(node.mrsiVolume, 0.0).factor == 4.0  # automatic s follows the grid

    node.mrsiVolume = _mrsi_node((24, 20, 4), (10.0, 10.0, 20.0), "rect")  # a real rectangular scan at 10 mm
    node.autoFactor, node.factor = False, 3.0
    widget = _widget_showing(real, node)
    engine = _engine_grid(node.mrsiVolume, 3.0)
    assert (engine.lr_inplane, engine.inplane, engine.factor) == ((24, 20), (72, 60), 3.0)
    assert widget.ui.outputGridLabel.text == "LR 24×20 → 72×60 in-plane, s = 3.00"
    assert widget.ui.factorSpinBox.enabled is True and node.scale == 3.0
    assert "s = 3.00" in widget.ui.autoScaleCheckBox.text

    node.mrsiVolume, node.factor = _mrsi_node((21, 15, 4), (6.0, 8.0, 15.0), "odd"), 2.5  # round(F·m) is inexact
    text, grid = real.module.MRSISuperResolutionLogic().outputGridSummary(node)
    engine = _engine_grid(node.mrsiVolume, 2.5)
    assert grid.inplane == engine.inplane == (53, 38) and text.startswith("LR 21×15 → 53×38 in-plane")
    assert grid.scale == pytest.approx(math.sqrt(53 / 21 * 38 / 15)) and grid.scale == engine.factor
    _widget_showing(real, node)
    assert node.scale == grid.scale  # the run would condition on the same s (pipeline: opts.scale or grid.factor)


def test_a_non_square_map_with_automatic_on_says_to_set_the_factor(real, node):
    node.mrsiVolume = _mrsi_node((24, 20, 4), (10.0, 10.0, 20.0))
    with pytest.raises(ValueError, match="not square"):
        _engine_grid(node.mrsiVolume, 0.0)  # the engine refuses it too
    scale_before = node.scale
    widget = _widget_showing(real, node)
    text = widget.ui.outputGridLabel.text
    assert "LR 24×20" in text and "Untick “Automatic” under Output grid" in text and "factor F (2 … 8)" in text
    assert "F = 2 gives 48×40" in text and "--factor" not in text  # the GUI's control, not the CLI flag
    assert widget.ui.factorSpinBox.enabled is False and node.scale == scale_before
    node.autoFactor = False
    assert _widget_showing(real, node).ui.outputGridLabel.text == "LR 24×20 → 48×40 in-plane, s = 2.00"


def test_the_run_passes_factor_exactly_when_automatic_is_off(real, node, tmp_path):
    """The command the module's run builds (runner.SuperResolveJob.prepare from parametersFromNode), parsed by
    the real `ftddm super-resolve` parser."""
    cli = pytest.importorskip("ftddm_core.cli")
    from MRSISuperResolutionLib import mrml, runner

    mrsi = _mrsi_node((24, 20, 4), (10.0, 10.0, 20.0))
    pair = mrml.volume_arrays(mrsi)

    def command():
        job = runner.SuperResolveJob(["python"], "/engine", temp_parent=str(tmp_path))
        options = real.module.MRSISuperResolutionLogic.parametersFromNode(node)  # what onApplyButton passes
        try:
            argv = job.prepare([pair], pair, pair, parameters=options)
        finally:
            job.cleanup()
        return argv[argv.index("super-resolve"):]

    node.autoFactor, node.factor = False, 3.0
    argv = command()
    assert argv[argv.index("--factor") + 1] == "3.0" and argv.count("--factor") == 1
    assert cli.build_parser().parse_args(argv).factor == 3.0
    node.autoFactor = True
    argv = command()
    assert "--factor" not in argv and cli.build_parser().parse_args(argv).factor == 0.0  # the engine's automatic


def test_the_flow_temperature_is_enabled_only_for_the_flow_start(real, node):
    node.mrsiVolume = _mrsi_node((16, 16, 6), (10.0, 10.0, 20.0))
    assert node.start == "renoised" and _widget_showing(real, node).ui.tauFSlider.enabled is False
    node.start = "flow"
    assert _widget_showing(real, node).ui.tauFSlider.enabled is True
