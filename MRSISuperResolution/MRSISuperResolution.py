"""MRSI super-resolution with FTDDM (Dong et al., Medical Image Analysis 2024) as a 3D Slicer module.

The module is thin: the engine (ftddm_core) runs as `ftddm super-resolve` in a background process on
temporary NIfTI files; MRSISuperResolutionLib holds every helper that can be tested without Slicer.
"""
import collections
import dataclasses
import importlib
import json
import os
import pathlib
import shutil
import sys
from typing import Annotated

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MRSISuperResolutionLib import dependencies, engine_directory, geometry, inputs, mrml, resultviews, runner
from MRSISuperResolutionLib.options import TRAINED_SCALES, SuperResolveOptions, node_parameters, options_from_node
from MRSISuperResolutionLib.readerstudylogic import ReaderStudyDisplay
from MRSISuperResolutionLib.readerstudywidget import ReaderStudyPanel, defaultStudyFolder, isUnsetFolder
from MRSISuperResolutionLib.runhandle import RunHandle

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
RESEARCH_USE_NOTICE = _(
    "<b>Research use only.</b> Not for diagnosis or treatment decisions. The shipped default model is trained "
    "on synthetic phantoms only (no patient data); its maps are not validated on real MRSI.")


def engineDirectory():
    """Folder that contains the embedded ftddm_core package (importing MRSISuperResolutionLib puts it on
    sys.path, so `import ftddm_core` works in Slicer's Python console without an install step)."""
    folder = engine_directory()
    if folder is None:
        raise RuntimeError(_("The ftddm_core engine was not found next to the module ({path}); "
                             "reinstall the MRSISuperResolution extension.").format(path=MODULE_DIR))
    return folder


#
# Module
#
class MRSISuperResolution(ScriptedLoadableModule):
    """Module descriptor."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MRSI Super-Resolution")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []  # PyTorch is checked on first use, with a message if it is missing
        self.parent.contributors = ["MRSISuperResolution developers"]
        self.parent.helpText = _(
            "Super-resolves low-resolution MR spectroscopic imaging (MRSI) metabolite maps with FTDDM, a "
            "flow-based truncated denoising diffusion model conditioned on the patient's T1 and FLAIR. "
            "Outputs: super-resolved (mean of the samples), zero-filled and uncertainty (calibrated standard "
            "deviation) maps. "
            "A Compare layout and a blinded reader study are included.<br><br>") + RESEARCH_USE_NOTICE
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _(
            "Method: X. Dong et al., \"A flow-based truncated denoising diffusion model for super-resolution "
            "magnetic resonance spectroscopic imaging\", Medical Image Analysis 2024.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A synthetic glioma patient (LR NAA and tCho maps, T1, FLAIR) shipped with the module: works offline."""
    import SampleData

    from MRSISuperResolutionLib import sampledata

    folder = os.path.join(MODULE_DIR, "Resources", "SampleData")
    names = sampledata.sample_file_names()
    files = [names[key] for key in ("NAA", "tCho", "T1", "FLAIR")]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MRSI super-resolution",
        sampleName=sampledata.SAMPLE_NAME,
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", sampledata.SAMPLE_NAME + ".png"),
        uris=[pathlib.Path(folder, f).as_uri() for f in files],
        fileNames=files,
        nodeNames=[sampledata.SAMPLE_FILES[f][0] for f in files],
        checksums=["SHA256:" + sampledata.SAMPLE_FILES[f][1] for f in files],
        loadFileTypes=["VolumeFile"] * len(files),
    )


#
# Parameter node
#
def nodeAnnotation(parameter):
    """The parameterNodeWrapper type of one options.NodeParameter: its type with Choice or WithinRange."""
    if parameter.choices is not None:
        return Annotated[parameter.type, Choice(list(parameter.choices))]
    if parameter.bounds is not None:
        return Annotated[parameter.type, WithinRange(*parameter.bounds)]
    return parameter.type


def withSuperResolveOptions(cls, optionsClass=SuperResolveOptions):
    """Add one parameter per SuperResolveOptions field (node_parameters) to a parameter-node class, so
    that a new engine option reaches the node, the saved scene and parametersFromNode with no edit here."""
    annotations = dict(cls.__annotations__)
    for parameter in node_parameters(optionsClass):
        if parameter.automatic_name is not None:
            annotations[parameter.automatic_name] = bool
            setattr(cls, parameter.automatic_name, True)
        annotations[parameter.name] = nodeAnnotation(parameter)
        setattr(cls, parameter.name, parameter.default)
    cls.__annotations__ = annotations
    return cls


@parameterNodeWrapper
@withSuperResolveOptions
class MRSISuperResolutionParameterNode:
    """Everything the GUI sets; saved with the scene, so a reading or a run can be reproduced. The sampling
    options (tauD, sampler, steps, autoScale + scale, …) are added from SuperResolveOptions."""

    mrsiVolume: vtkMRMLScalarVolumeNode
    allMetabolites: bool = False
    t1Volume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode
    useDefaultModel: bool = True
    modelPath: pathlib.Path = pathlib.Path()
    interpolate: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    # results of the last run (primary map) and the τ_d it used (−1: none yet)
    srVolume: vtkMRMLScalarVolumeNode
    zeroFilledVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    lastRunTauD: float = -1.0
    # reader study
    studyFolder: pathlib.Path = pathlib.Path()
    readerName: str = ""
    studySeed: Annotated[int, WithinRange(0, 1000000)] = 1
    slicesPerMap: Annotated[int, WithinRange(0, 1000)] = 0


OutputNodes = collections.namedtuple("OutputNodes", ["sr", "zeroFilled", "uncertainty"])


class MissingDependenciesError(RuntimeError):
    """The engine's Python packages (or torch) are not installed in Slicer yet."""


#
# Widget
#
class MRSISuperResolutionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: binds the parameter node to the .ui, starts/cancels runs, shows results, drives the reader study."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._updatingGui = False
        self.readerPanel = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MRSISuperResolution.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MRSISuperResolutionLogic()

        self.ui.progressBar.setVisible(False)
        self.ui.rerunLabel.setVisible(False)
        self.ui.rerunButton.setVisible(False)
        self.readerPanel = ReaderStudyPanel(self.ui, self.logic, lambda: self._parameterNode,
                                            self._onParameterNodeModified)
        self.readerPanel.setup()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.rerunButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showOverlayButton.connect("clicked(bool)", self.onShowOverlay)
        self.ui.compareLayoutButton.connect("clicked(bool)", self.onCompareLayout)
        self.initializeParameterNode()

    def cleanup(self):
        """Called when the application closes or the module is reloaded: stop any run (whole process tree).
        Also when setup() failed half-way: then there may be no logic yet."""
        if self._run is not None:
            self._run.cancel(wait=True)  # the timer that would finish a non-blocking cancel goes away with us
        if self.logic is not None:
            self.logic.endReading()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self._run is not None:
            self._run.cancel()  # its outputs would land in a closing scene
        if self.readerPanel is not None:
            self.readerPanel.onStopReading()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ----------------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.guessInputs(self._parameterNode)
        if isUnsetFolder(self._parameterNode.studyFolder):  # "." would show Slicer's working directory
            self._parameterNode.studyFolder = defaultStudyFolder()

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        if self._updatingGui or self._parameterNode is None:
            return
        self._updatingGui = True
        try:
            self._updateGui(self._parameterNode)
        finally:
            self._updatingGui = False

    def _updateGui(self, p):
        running = self._run is not None
        cancelling = running and not self._run.state == runner.RUNNING
        reading = self.readerPanel is not None and self.readerPanel.reading
        ready = bool(p.mrsiVolume and p.t1Volume and p.flairVolume)
        self.ui.applyButton.enabled = (running and not cancelling) or (ready and not reading)
        self.ui.applyButton.text = (_("Cancelling…") if cancelling else _("Cancel") if running else
                                    _("Super-resolve"))
        self.ui.applyButton.toolTip = (_("Stop the run; the scene is left as it was before.") if running else
                                       _("Stop the reading first.") if reading else
                                       _("Run FTDDM super-resolution in the background.") if ready else
                                       _("Select the MRSI map, T1 and FLAIR."))
        self.ui.modelPathLineEdit.enabled = not p.useDefaultModel
        self.ui.scaleSpinBox.enabled = not p.autoScale
        self.ui.factorSpinBox.enabled = not p.autoFactor
        self.ui.tauFSlider.enabled = p.start == "flow"  # a re-noised chain starts from the flow's mode: no τ_f
        maps = self.logic.mrsiInputs(p.mrsiVolume, p.allMetabolites, [p.t1Volume, p.flairVolume, p.maskVolume])
        self.ui.metabolitesListLabel.text = (_("Maps: {names}").format(names=", ".join(n.GetName() for n in maps))
                                             if maps else "")
        self._updateOutputGrid(p)
        self._updateRerunOffer(p)
        hasResult = p.srVolume is not None
        self.ui.showOverlayButton.enabled = hasResult and not reading
        self.ui.compareLayoutButton.enabled = hasResult and not reading
        for name in ("inputsCollapsibleButton", "samplingCollapsibleButton", "displayCollapsibleButton"):
            getattr(self.ui, name).enabled = not running and not reading
        self.ui.readerCollapsibleButton.enabled = not running

    def _updateOutputGrid(self, p):
        """Show the grid the run will produce (or what to change when there is none); an automatic s follows it."""
        hasMap = p.mrsiVolume is not None and p.mrsiVolume.GetImageData() is not None
        text, grid = self.logic.outputGridSummary(p) if hasMap else (_("Select the MRSI map to see its output grid."),
                                                                      None)
        self.ui.outputGridLabel.text = text
        self.ui.autoScaleCheckBox.text = (_("Condition on the output grid's factor (s = {s:.2f})").format(s=grid.scale)
                                          if grid else _("Condition on the output grid's factor"))
        if grid is not None and p.autoScale and abs(p.scale - grid.scale) > 1e-9:
            p.scale = grid.scale

    def _updateRerunOffer(self, p):
        changed = p.lastRunTauD >= 0 and abs(p.tauD - p.lastRunTauD) > 1e-9 and self._run is None
        params = SuperResolveOptions(sampler=p.sampler)
        self.ui.rerunLabel.setVisible(changed)
        self.ui.rerunButton.setVisible(changed and params.tau_d_has_effect())
        if changed:
            self.ui.rerunLabel.text = (
                _("τ_d changed from {old:.2f} to {new:.2f}. Re-run to see its effect.").format(
                    old=p.lastRunTauD, new=p.tauD) if params.tau_d_has_effect() else
                _("τ_d only affects the ancestral, respaced and dpmpp-sde samplers; choose one of them to use it."))

    # --- running ------------------------------------------------------------------------------------------
    def onApplyButton(self):
        """Super-resolve, or Cancel while a run is going on."""
        if self._run is not None:
            self._run.cancel()  # returns at once; the run's timer calls _onFinished when the tree has ended
            self.ui.statusLabel.text = _("Cancelling…")
            self._onParameterNodeModified()
            return
        if self.readerPanel.reading:
            return
        with slicer.util.tryWithErrorDisplay(_("Super-resolution could not start."), waitCursor=True):
            if not self._ensureDependencies():
                return
            p = self._parameterNode
            maps = self.logic.mrsiInputs(p.mrsiVolume, p.allMetabolites, [p.t1Volume, p.flairVolume, p.maskVolume])
            self.ui.logTextEdit.clear()
            self._run = self.logic.process(
                maps, p.t1Volume, p.flairVolume, p.maskVolume, parameters=self.logic.parametersFromNode(p),
                modelPath=self.logic.modelPathFromNode(p), waitForCompletion=False, interpolate=p.interpolate,
                onProgress=self._onProgress, onLog=self._onLog, onFinished=self._onFinished)
            self._setRunning(True)

    def _ensureDependencies(self):
        """Ask before installing torch (through the PyTorch extension) and the engine's packages."""
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        text = _("MRSI super-resolution needs these Python packages, which are not installed yet:\n\n{items}\n\n"
                 "Install them now? This can take several minutes; torch is installed by the PyTorch "
                 "extension, which picks the build that matches your GPU.").format(items="\n".join(missing))
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install dependencies")):
            return False
        self.ui.statusLabel.text = _("Installing dependencies…")
        slicer.app.processEvents()
        self.logic.installDependencies()
        self.ui.statusLabel.text = _("Dependencies installed.")
        return True

    def _setRunning(self, running):
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if running:
            self.ui.statusLabel.text = _("Starting the engine…")
        self._onParameterNodeModified()

    def _onProgress(self, progress):
        self.ui.progressBar.value = int(round(1000 * progress.fraction))
        self.ui.statusLabel.text = _("Sampling: step {done}/{total} {message}").format(
            done=progress.done, total=progress.total, message=progress.message)

    def _onLog(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def _onFinished(self, run):
        self._run = None
        self._setRunning(False)
        p = self._parameterNode
        if run.state == runner.COMPLETED:
            first = run.outputs[0]
            with slicer.util.NodeModify(p):
                p.srVolume, p.zeroFilledVolume, p.uncertaintyVolume = first.sr, first.zeroFilled, first.uncertainty
                p.lastRunTauD = p.tauD
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s: {n} map(s) super-resolved.").format(
                seconds=run.elapsed, n=len(run.outputs))
            self.logic.showOverlay(first.sr, p.t1Volume, p.overlayOpacity)
        elif run.state == runner.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled. The scene was not changed.")
        else:
            self.ui.statusLabel.text = _("Failed: {message}").format(message=(run.errorMessage or "").splitlines()[0]
                                                                       if run.errorMessage else "")
            slicer.util.errorDisplay(_("Super-resolution failed."), detailedText=run.errorMessage or "")

    # --- display ------------------------------------------------------------------------------------------
    def onShowOverlay(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not show the overlay."), waitCursor=True):
            self.logic.showOverlay(p.srVolume, p.t1Volume, p.overlayOpacity)

    def onCompareLayout(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not set up the Compare layout."), waitCursor=True):
            self.logic.showCompareLayout(OutputNodes(p.srVolume, p.zeroFilledVolume, p.uncertaintyVolume),
                                         p.flairVolume)


#
# Logic
#
class MRSISuperResolutionLogic(ScriptedLoadableModuleLogic):
    """Everything the module computes, usable from the Python console without the GUI:

        logic = slicer.util.getModuleLogic("MRSISuperResolution")  # or MRSISuperResolutionLogic()
        sr, zeroFilled, uncertainty = logic.process(naaNode, t1Node, flairNode, tau_d=0.7)
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.keepTemporaryFiles = False  # True: keep the NIfTI files of each run for debugging
        self.reading = ReaderStudyDisplay()
        self._activeRuns = set()

    def getParameterNode(self):
        return MRSISuperResolutionParameterNode(super().getParameterNode())

    # --- engine and dependencies ---------------------------------------------------------------------------
    @staticmethod
    def requirementsPath():
        return os.path.join(MODULE_DIR, "Resources", "requirements.txt")

    def missingDependencies(self):
        """Requirement lines not installed yet (torch first); never imports them."""
        missing = []
        torchProblem = self._torchProblem()
        if torchProblem:
            missing.append("torch" + dependencies.TORCH_REQUIREMENT + " (" + torchProblem + ", "
                           + _("through the PyTorch extension") + ")")
        missing += dependencies.missing_requirements(dependencies.load_requirements(self.requirementsPath()))
        return missing

    @staticmethod
    def _torchProblem():
        """"" when a torch satisfying TORCH_REQUIREMENT is installed, else why not (never imports torch)."""
        installed = dependencies.installed_version("torch")
        if installed is None:
            return _("not installed")
        if not dependencies.version_satisfies(installed, dependencies.TORCH_REQUIREMENT):
            return _("version {version} is installed").format(version=installed)
        return ""

    def installDependencies(self):
        """Install torch through the PyTorch extension, then the engine's packages with pip (call after asking)."""
        if self._torchProblem():
            try:
                import PyTorchUtils
            except ModuleNotFoundError as error:
                raise MissingDependenciesError(_(
                    "MRSI super-resolution needs the PyTorch extension. Install 'PyTorch' from the Extensions "
                    "Manager, restart Slicer, then click Super-resolve again.")) from error
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
            if torch is None:
                raise MissingDependenciesError(_("PyTorch was not installed; super-resolution cannot run."))
        missing = dependencies.missing_requirements(dependencies.load_requirements(self.requirementsPath()))
        if missing:
            slicer.util.pip_install(" ".join(missing))
        importlib.invalidate_caches()  # packages installed in this session are found without a restart
        still = self.missingDependencies()
        if still:
            raise MissingDependenciesError(_("Still missing after installation: {items}").format(items=", ".join(still)))

    @staticmethod
    def pythonCommand():
        """(argv prefix, environment) that runs Slicer's Python in a fresh process."""
        launcher = shutil.which("PythonSlicer")
        if launcher:
            return [launcher], slicer.util.startupEnvironment()  # the launcher sets Slicer's paths itself
        return [sys.executable], dict(os.environ)  # python-real inside an already set-up environment

    @staticmethod
    def defaultModelAvailable():
        weights = os.path.join(engineDirectory(), "ftddm_core", "weights")
        return os.path.isdir(weights) and any(f.endswith(".safetensors") for f in os.listdir(weights))

    # --- inputs and parameters -----------------------------------------------------------------------------
    def guessInputs(self, parameterNode):
        """Fill empty MRSI/T1/FLAIR selections from volume names (e.g. the sample patient)."""
        candidates = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                      if not n.IsA("vtkMRMLLabelMapVolumeNode") and not mrml.is_output_node(n)]
        roles = inputs.guess_input_roles([n.GetName() for n in candidates])
        with slicer.util.NodeModify(parameterNode):
            for role, attribute in (("mrsi", "mrsiVolume"), ("t1", "t1Volume"), ("flair", "flairVolume")):
                if getattr(parameterNode, attribute) is None and roles[role] is not None:
                    setattr(parameterNode, attribute, candidates[roles[role]])

    def mrsiInputs(self, mrsiNode, allOnGrid=False, exclude=()):
        """The MRSI node, plus every other scalar volume on exactly its grid when allOnGrid."""
        if mrsiNode is None:
            return []
        if not allOnGrid:
            return [mrsiNode]
        others = mrml.same_grid_volumes(slicer.mrmlScene, mrsiNode, exclude=[mrsiNode, *exclude])
        return [mrsiNode, *others]

    @staticmethod
    def detectedGrid(mrsiNode, parameters=None):
        """geometry.OutputGrid the engine will produce for this MRSI node with these SuperResolveOptions
        (factor, slice_axis, force); ValueError (the engine's message) where the engine would refuse it."""
        params = parameters or SuperResolveOptions()
        shape = mrsiNode.GetImageData().GetDimensions()
        return geometry.output_grid(shape, mrml.node_world_affine(mrsiNode), params.factor,
                                    slice_axis=params.slice_axis, force=params.force)

    def outputGridSummary(self, p):
        """(text for the Output grid label, geometry.OutputGrid or None) for the node's MRSI map and settings:
        "LR m1×m2 → n1×n2 in-plane, s = …", or what to change when the engine would refuse the grid."""
        params = self.parametersFromNode(p)
        try:
            grid = self.detectedGrid(p.mrsiVolume, params)
        except ValueError as error:
            if params.factor:
                return str(error), None
            low, high = TRAINED_SCALES
            example = self.detectedGrid(p.mrsiVolume, dataclasses.replace(params, factor=low))
            smallest, largest = geometry.AUTOMATIC_MATRICES
            return _("LR {m1}×{m2} has no automatic output grid: only a square matrix of {smallest}×{smallest} … "
                     "{largest}×{largest} goes onto {n}×{n}. Untick “Automatic” under Output grid and set the "
                     "output factor F ({low:g} … {high:g}); F = {low:g} gives {n1}×{n2}.").format(
                         m1=example.lr_inplane[0], m2=example.lr_inplane[1], smallest=smallest, largest=largest,
                         n=geometry.MODEL_SIZE, low=low, high=high, n1=example.inplane[0], n2=example.inplane[1]), None
        (m1, m2), (n1, n2) = grid.lr_inplane, grid.inplane
        return _("LR {m1}×{m2} → {n1}×{n2} in-plane, s = {s:.2f}").format(m1=m1, m2=m2, n1=n1, n2=n2,
                                                                           s=grid.scale), grid

    @staticmethod
    def parametersFromNode(p):
        """The SuperResolveOptions the node holds (every field; ValueError names a bad one)."""
        return options_from_node(p)

    @staticmethod
    def modelPathFromNode(p):
        return None if p.useDefaultModel or str(p.modelPath) in ("", ".") else str(p.modelPath)

    # --- super-resolution ------------------------------------------------------------------------------------
    def process(self, mrsiNodes, t1Node, flairNode, maskNode=None, *, parameters=None, modelPath=None,
                waitForCompletion=True, interpolate=True, onProgress=None, onLog=None, onFinished=None,
                **options):
        """Super-resolve one MRSI node (or a list on one grid) conditioned on T1 and FLAIR.

        options override fields of SuperResolveOptions (tau_d, tau_f, sampler, steps, samples,
        data_consistency, seed, device, scale, factor, slice_axis, max_batch, bf16, force).
        Blocking (default): returns OutputNodes(sr, zeroFilled, uncertainty), or a list of them for a list
        input; raises RuntimeError if the run fails. waitForCompletion=False: returns a RunHandle at once
        (cancel() stops it; onFinished(handle) is called on the main thread).
        """
        single = not isinstance(mrsiNodes, (list, tuple))
        nodes = [mrsiNodes] if single else list(mrsiNodes)
        if not nodes or any(n is None for n in nodes):
            raise ValueError(_("Select at least one MRSI volume."))
        if t1Node is None or flairNode is None:
            raise ValueError(_("FTDDM is conditioned on the patient's T1 and FLAIR: select both."))
        base = dataclasses.asdict(parameters or SuperResolveOptions())
        params = SuperResolveOptions.from_dict({**base, **options})  # ValueError names unknown options
        missing = self.missingDependencies()
        if missing:
            raise MissingDependenciesError(_("Missing Python packages: {items}. Install them with "
                                             "logic.installDependencies() or from the module GUI.").format(
                                                 items=", ".join(missing)))
        lrMaps = [mrml.volume_arrays(n) for n in nodes]
        for node, (data, affine) in zip(nodes[1:], lrMaps[1:]):
            if not geometry.same_grid(data.shape, affine, lrMaps[0][0].shape, lrMaps[0][1]):
                raise ValueError(_("{name} is not on the grid of {first}; maps super-resolved together must "
                                   "share one MRSI grid.").format(name=node.GetName(), first=nodes[0].GetName()))
        python, env = self.pythonCommand()
        job = runner.SuperResolveJob(python, engineDirectory(), env=env, temp_parent=slicer.app.temporaryPath,
                                     keep_files=self.keepTemporaryFiles)
        try:
            job.prepare(lrMaps, mrml.volume_arrays(t1Node), mrml.volume_arrays(flairNode),
                        mrml.volume_arrays(maskNode) if maskNode is not None else None,
                        model=modelPath, parameters=params)
        except Exception:
            job.cleanup()
            raise
        handle = RunHandle(self, job, nodes, params, interpolate, onProgress, onLog, onFinished)
        if not waitForCompletion:
            handle.start()
            return handle
        handle.runBlocking()
        if handle.state != runner.COMPLETED:
            raise RuntimeError(_("Super-resolution {state}: {message}").format(
                state=handle.state, message=handle.errorMessage or ""))
        return handle.outputs[0] if single else handle.outputs

    def storeResults(self, job, mrsiNodeIds, parameters, interpolate=True):
        """Outputs of a completed job → nodes beside each input (re-runs update the same nodes)."""
        scene = slicer.mrmlScene
        inputsNow = [scene.GetNodeByID(i) for i in mrsiNodeIds]
        if any(n is None for n in inputsNow):
            raise ValueError(_("An input volume was removed during the run; outputs were not added."))
        report = job.run_report()
        settings = json.dumps({**dataclasses.asdict(parameters), "grid": report.get("grid", {}),
                               "model": report.get("model", {}).get("path", "default")})
        results = []
        with slicer.util.RenderBlocker():
            for node, maps in zip(inputsNow, job.outputs()):
                out = mrml.store_outputs(scene, node, maps, settings, interpolate=interpolate)
                results.append(OutputNodes(out["sr"], out["zerofilled"], out["uncertainty"]))
        return results

    # --- display (MRSISuperResolutionLib.resultviews) -----------------------------------------------------------
    @staticmethod
    def showOverlay(srNode, backgroundNode, opacity=0.6):
        """SR over T1 (or FLAIR) in the standard views, rotated to the MRSI slab, linked."""
        resultviews.show_overlay(srNode, backgroundNode, opacity)

    @staticmethod
    def showCompareLayout(outputs, flairNode, orientation="Axial"):
        """Zero-filled | SR | uncertainty | FLAIR in one row, linked: one slice offset moves all four."""
        resultviews.show_compare_layout(outputs.zeroFilled, outputs.sr, outputs.uncertainty, flairNode, orientation)

    # --- reader study (ReaderStudyDisplay in MRSISuperResolutionLib) -------------------------------------------
    def readerSources(self, slicesPerMap=0, seed=0):
        """LR (zero-filled) / SR pairs of every super-resolved map in the scene, slices with signal."""
        return self.reading.readerSources(slicesPerMap, seed)

    def showTrial(self, trial, orientation="Axial"):
        """Show one pair blinded (views A and B, identical display, no names, no W/L dragging)."""
        self.reading.showTrial(trial, orientation)

    def endReading(self):
        """Give back the views, mouse mode, names and display the user had before the reading."""
        self.reading.endReading()


#
# Test (Reload and Test, or ctest -R py_MRSISuperResolution); the end-to-end tests are in Testing/Python
#
class MRSISuperResolutionTest(ScriptedLoadableModuleTest):
    """Runs Testing/Python/MRSISuperResolutionLogicTest where it is present (source or build tree)."""

    def runTest(self):
        import importlib.util
        import unittest

        path = os.path.join(MODULE_DIR, "Testing", "Python", "MRSISuperResolutionLogicTest.py")
        if not os.path.isfile(path):
            raise unittest.SkipTest(f"{path} is not installed with the extension; run it from a source checkout")
        spec = importlib.util.spec_from_file_location("MRSISuperResolutionLogicTest", path)
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
        tests.MRSISuperResolutionLogicTest().runTest()
