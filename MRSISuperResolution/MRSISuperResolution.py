"""MRSI super-resolution with FTDDM (Dong et al., Medical Image Analysis 2024) as a 3D Slicer module.

The module is thin: the engine (ftddm_core) runs as `ftddm super-resolve` in a background process on
temporary NIfTI files; MRSISuperResolutionLib holds every helper that can be tested without Slicer.
"""
import collections
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MRSISuperResolutionLib import dependencies, display, geometry, inputs, layouts, mrml, readerstudy, runner
from MRSISuperResolutionLib.options import DEVICES, SAMPLERS, SuperResolveParameters

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def engineDirectory():
    """Folder that contains the embedded ftddm_core package: beside this file once installed, the repository
    root when the module is loaded from a source checkout."""
    for candidate in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(candidate, "ftddm_core", "__init__.py")):
            return candidate
    raise RuntimeError(_("The ftddm_core engine was not found next to the module ({path}); "
                         "reinstall the MRSISuperResolution extension.").format(path=MODULE_DIR))


def _makeEngineImportable():
    """`import ftddm_core` works in Slicer's Python console without an install step (importing it is cheap:
    torch is only imported by the parts that run models)."""
    try:
        folder = engineDirectory()
    except RuntimeError:
        return
    if folder not in sys.path:
        sys.path.append(folder)


_makeEngineImportable()


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
            "Outputs: super-resolved (mean of the samples), zero-filled and uncertainty (standard deviation) maps. "
            "A Compare layout and a blinded reader study are included.")
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
        loadFileType="VolumeFile",
    )


#
# Parameter node
#
@parameterNodeWrapper
class MRSISuperResolutionParameterNode:
    """Everything the GUI sets; saved with the scene, so a reading or a run can be reproduced."""

    mrsiVolume: vtkMRMLScalarVolumeNode
    allMetabolites: bool = False
    t1Volume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode
    useDefaultModel: bool = True
    modelPath: pathlib.Path = pathlib.Path()
    autoScale: bool = True
    scale: Annotated[float, WithinRange(2.0, 8.0), Decimals(2), SingleStep(0.1)] = 4.0
    tauD: Annotated[float, WithinRange(0.0, 2.0), Decimals(2), SingleStep(0.05)] = 0.9
    tauF: Annotated[float, WithinRange(0.0, 2.0), Decimals(2), SingleStep(0.05)] = 0.9
    sampler: Annotated[str, Choice(list(SAMPLERS))] = "dpmpp"
    steps: Annotated[int, WithinRange(1, 1000)] = 10
    samples: Annotated[int, WithinRange(1, 64)] = 8
    dataConsistency: Annotated[float, WithinRange(0.0, 1.0), Decimals(2), SingleStep(0.05)] = 0.0
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    seed: Annotated[int, WithinRange(0, 1000000)] = 0
    bf16: bool = False
    interpolate: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0), Decimals(2), SingleStep(0.05)] = 0.6
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
        self._session = None
        self._trial = None
        self._scoreCombos = {}
        self._itemLabels = {}

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
        self._buildScorePanel()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.rerunButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showOverlayButton.connect("clicked(bool)", self.onShowOverlay)
        self.ui.compareLayoutButton.connect("clicked(bool)", self.onCompareLayout)
        self.ui.startReadingButton.connect("clicked(bool)", self.onStartReading)
        self.ui.saveScoresButton.connect("clicked(bool)", self.onSaveScores)
        self.ui.stopReadingButton.connect("clicked(bool)", self.onStopReading)
        self.initializeParameterNode()

    def cleanup(self):
        """Called when the application closes or the module is reloaded: stop any run (whole process tree)."""
        if self._run is not None:
            self._run.cancel()
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
        self.onStopReading()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ----------------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.guessInputs(self._parameterNode)

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
        ready = bool(p.mrsiVolume and p.t1Volume and p.flairVolume)
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.text = _("Cancel") if running else _("Super-resolve")
        self.ui.applyButton.toolTip = (_("Stop the run; the scene is left as it was before.") if running else
                                       _("Run FTDDM super-resolution in the background.") if ready else
                                       _("Select the MRSI map, T1 and FLAIR."))
        self.ui.modelPathLineEdit.enabled = not p.useDefaultModel
        self.ui.scaleSpinBox.enabled = not p.autoScale
        maps = self.logic.mrsiInputs(p.mrsiVolume, p.allMetabolites, [p.t1Volume, p.flairVolume, p.maskVolume])
        self.ui.metabolitesListLabel.text = (_("Maps: {names}").format(names=", ".join(n.GetName() for n in maps))
                                             if maps else "")
        self._updateDetectedScale(p)
        self._updateRerunOffer(p)
        hasResult = p.srVolume is not None
        self.ui.showOverlayButton.enabled = hasResult
        self.ui.compareLayoutButton.enabled = hasResult

    def _updateDetectedScale(self, p):
        if not p.mrsiVolume or p.mrsiVolume.GetImageData() is None:
            return
        try:
            axis, matrix, factor = self.logic.detectedFactor(p.mrsiVolume)
        except ValueError as error:
            self.ui.statusLabel.text = str(error)
            return
        self.ui.autoScaleCheckBox.text = _("Detect the upscaling factor from the input ({matrix}² → 64², s = {s:.2f})"
                                           ).format(matrix=matrix, s=factor)
        if p.autoScale:
            shown = min(max(factor, 2.0), 8.0)
            if abs(p.scale - shown) > 1e-9:
                p.scale = shown

    def _updateRerunOffer(self, p):
        changed = p.lastRunTauD >= 0 and abs(p.tauD - p.lastRunTauD) > 1e-9 and self._run is None
        params = SuperResolveParameters(sampler=p.sampler)
        self.ui.rerunLabel.setVisible(changed)
        self.ui.rerunButton.setVisible(changed and params.tau_d_has_effect())
        if changed:
            self.ui.rerunLabel.text = (
                _("τ_d changed from {old:.2f} to {new:.2f}. Re-run to see its effect.").format(
                    old=p.lastRunTauD, new=p.tauD) if params.tau_d_has_effect() else
                _("τ_d only affects the ancestral and ddpm samplers; choose one of them to use it."))

    # --- running ------------------------------------------------------------------------------------------
    def onApplyButton(self):
        """Super-resolve, or Cancel while a run is going on."""
        if self._run is not None:
            self._run.cancel()
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
        for name in ("inputsCollapsibleButton", "samplingCollapsibleButton", "readerCollapsibleButton"):
            getattr(self.ui, name).enabled = not running
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

    # --- reader study ---------------------------------------------------------------------------------------
    def _buildScorePanel(self):
        grid = qt.QGridLayout(self.ui.scoreGridWidget)
        grid.setContentsMargins(0, 0, 0, 0)
        for column, side in enumerate(readerstudy.SIDES, start=1):
            header = qt.QLabel(side)
            header.alignment = qt.Qt.AlignCenter
            grid.addWidget(header, 0, column)
        for row, item in enumerate(readerstudy.ITEMS, start=1):
            label = qt.QLabel(readerstudy.ITEM_LABELS[item].format(metabolite=_("Metabolite")))
            self._itemLabels[item] = label
            grid.addWidget(label, row, 0)
            for column, side in enumerate(readerstudy.SIDES, start=1):
                combo = qt.QComboBox()
                combo.addItem("")
                for value in readerstudy.SCORE_CHOICES:
                    combo.addItem(f"{value} – {readerstudy.SCORE_LABELS[value]}", value)
                self._scoreCombos[(side, item)] = combo
                grid.addWidget(combo, row, column)

    def onStartReading(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not start the reading."), waitCursor=True):
            if str(p.studyFolder) in ("", "."):
                raise ValueError(_("Choose a study folder first."))
            sources = self.logic.readerSources(p.slicesPerMap, p.studySeed)
            self._session = readerstudy.ReaderSession.start(p.studyFolder, p.readerName, sources,
                                                             study_seed=p.studySeed)
            self._showNextTrial()

    def _showNextTrial(self):
        done, total = self._session.progress()
        self._trial = self._session.next_trial()
        if self._trial is None:
            self.ui.readingProgressLabel.text = _("Reading complete: {total} pairs scored.").format(total=total)
            self.onStopReading()
            return
        for combo in self._scoreCombos.values():
            combo.currentIndex = 0
        for item, text in zip(readerstudy.ITEMS, self._trial.item_labels()):
            self._itemLabels[item].text = text
        self.logic.showTrial(self._trial)
        self.ui.readingProgressLabel.text = _("Case {case}: pair {n} of {total}").format(
            case=self._trial.case_id, n=done + 1, total=total)
        self._setReading(True)

    def _setReading(self, reading):
        self.ui.scoreGridWidget.enabled = reading
        self.ui.saveScoresButton.enabled = reading
        self.ui.stopReadingButton.enabled = reading
        self.ui.startReadingButton.enabled = not reading
        for name in ("inputsCollapsibleButton", "samplingCollapsibleButton", "displayCollapsibleButton"):
            getattr(self.ui, name).enabled = not reading
        self.ui.applyButton.enabled = not reading and self.ui.applyButton.enabled

    def onSaveScores(self):
        with slicer.util.tryWithErrorDisplay(_("Scores not saved."), waitCursor=True):
            scores = {side: {item: self._scoreValue(self._scoreCombos[(side, item)]) for item in readerstudy.ITEMS}
                      for side in readerstudy.SIDES}
            self._session.record(self._trial.case_id, scores)
            self._showNextTrial()

    @staticmethod
    def _scoreValue(combo):
        """The score stored with the chosen item ("" while nothing is chosen)."""
        return combo.itemData(combo.currentIndex) or ""

    def onStopReading(self):
        if self._session is None:
            return
        self._session = None
        self._trial = None
        self._setReading(False)
        self.logic.endReading()
        self._onParameterNodeModified()


#
# Running one job without freezing the GUI
#
class RunHandle:
    """A running `ftddm super-resolve`: polled by a QTimer on the main thread (or a blocking loop), then the
    outputs become nodes; the temporary folder is removed in every case."""

    POLL_MS = 200

    def __init__(self, logic, job, mrsiNodes, parameters, interpolate, onProgress, onLog, onFinished):
        self.logic = logic
        self.job = job
        self.mrsiNodeIds = [n.GetID() for n in mrsiNodes]
        self.parameters = parameters
        self.interpolate = interpolate
        self.onProgress, self.onLog, self.onFinished = onProgress, onLog, onFinished
        self.state = runner.PREPARED
        self.errorMessage = None
        self.outputs = []
        self.started = None
        self.elapsed = 0.0
        self._lastProgress = None
        self._timer = None

    def start(self):
        self.started = time.monotonic()
        self.job.start()
        self.state = runner.RUNNING
        self.logic._activeRuns.add(self)  # keeps handle and timer alive even if the caller drops the handle
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()

    def runBlocking(self):
        """Console scripting: the same polling, in a loop that keeps the application responsive."""
        self.started = time.monotonic()
        self.job.start()
        self.state = runner.RUNNING
        while self.state == runner.RUNNING:
            self._poll()
            slicer.app.processEvents()
            time.sleep(self.POLL_MS / 1000)

    def _poll(self):
        if self.state != runner.RUNNING:
            return  # a timeout queued before the timer stopped
        try:
            lines = self.job.poll()
        except Exception as error:  # a reader failure must not leave the GUI in "running" for ever
            self.job.cancel()
            self._finish(error=str(error))
            return
        for line in lines:
            if self.onLog and not line.startswith("PROGRESS"):
                self.onLog(line)
        if self.job.progress is not None and self.job.progress != self._lastProgress:
            self._lastProgress = self.job.progress
            if self.onProgress:
                self.onProgress(self.job.progress)
        if self.job.state != runner.RUNNING:
            self._finish()

    def cancel(self):
        """Kill the whole process tree; no node is created or changed."""
        if self.state == runner.RUNNING:
            self.job.cancel()
            self._finish()

    def _finish(self, error=None):
        if self._timer is not None:
            self._timer.stop()
        self.elapsed = time.monotonic() - (self.started or time.monotonic())
        try:
            self.state = runner.FAILED if error else self.job.state
            self.errorMessage = error or self.job.error_message
            if self.state == runner.COMPLETED:
                self.outputs = self.logic.storeResults(self.job, self.mrsiNodeIds, self.parameters, self.interpolate)
        except Exception as storeError:
            logging.exception("MRSISuperResolution: storing the outputs failed")
            self.state, self.errorMessage = runner.FAILED, str(storeError)
        finally:
            self.job.cleanup()
            self.logic._activeRuns.discard(self)
        if self.onFinished:
            self.onFinished(self)


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
        self._readingState = None
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
        if not self._torchInstalled():
            missing.append("torch" + dependencies.TORCH_REQUIREMENT + " (" + _("through the PyTorch extension") + ")")
        missing += dependencies.missing_requirements(dependencies.load_requirements(self.requirementsPath()))
        return missing

    @staticmethod
    def _torchInstalled():
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def installDependencies(self):
        """Install torch through the PyTorch extension, then the engine's packages with pip (call after asking)."""
        if not self._torchInstalled():
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
    def detectedFactor(mrsiNode):
        """(slice axis, LR in-plane matrix, upscaling factor) the engine will use for this MRSI node."""
        shape = mrsiNode.GetImageData().GetDimensions()
        return geometry.detect_upscaling_factor(shape, mrml.node_world_affine(mrsiNode))

    @staticmethod
    def parametersFromNode(p):
        return SuperResolveParameters(
            tau_d=p.tauD, tau_f=p.tauF, sampler=p.sampler, steps=p.steps, samples=p.samples,
            data_consistency=p.dataConsistency, seed=p.seed, device=p.device,
            scale=0.0 if p.autoScale else p.scale, bf16=p.bf16).validate()

    @staticmethod
    def modelPathFromNode(p):
        return None if p.useDefaultModel or str(p.modelPath) in ("", ".") else str(p.modelPath)

    # --- super-resolution ------------------------------------------------------------------------------------
    def process(self, mrsiNodes, t1Node, flairNode, maskNode=None, *, parameters=None, modelPath=None,
                waitForCompletion=True, interpolate=True, onProgress=None, onLog=None, onFinished=None,
                **options):
        """Super-resolve one MRSI node (or a list on one grid) conditioned on T1 and FLAIR.

        options override fields of SuperResolveParameters (tau_d, tau_f, sampler, steps, samples,
        data_consistency, seed, device, scale, slice_axis, max_batch, bf16, force).
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
        base = dataclasses.asdict(parameters or SuperResolveParameters())
        params = SuperResolveParameters.from_dict({**base, **options})  # ValueError names unknown options
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

    # --- display -------------------------------------------------------------------------------------------
    @staticmethod
    def _alignViewsTo(volumeNode, viewNames):
        lm = slicer.app.layoutManager()
        for name in viewNames:
            widget = lm.sliceWidget(name)
            if widget is None:
                continue
            widget.mrmlSliceNode().RotateToVolumePlane(volumeNode)
            widget.fitSliceToBackground()

    def showOverlay(self, srNode, backgroundNode, opacity=0.6):
        """SR over T1 (or FLAIR) in the standard views, rotated to the MRSI slab, linked."""
        if srNode is None:
            raise ValueError(_("No super-resolved map yet: run Super-resolve first."))
        slicer.util.setSliceViewerLayers(background=backgroundNode, foreground=srNode, foregroundOpacity=opacity)
        lm = slicer.app.layoutManager()
        names = list(lm.sliceViewNames())
        self._alignViewsTo(srNode, names)
        mrml.link_views([lm.sliceWidget(n).mrmlSliceCompositeNode() for n in names])

    def showCompareLayout(self, outputs, flairNode, orientation="Axial"):
        """Zero-filled | SR | uncertainty | FLAIR in one row, linked: one slice offset moves all four."""
        if outputs.sr is None:
            raise ValueError(_("No super-resolved map yet: run Super-resolve first."))
        lm = slicer.app.layoutManager()
        mrml.register_layout(lm.layoutLogic().GetLayoutNode(), layouts.COMPARE_LAYOUT_ID,
                             layouts.compare_layout_xml(orientation))
        lm.setLayout(layouts.COMPARE_LAYOUT_ID)
        shown = (outputs.zeroFilled, outputs.sr, outputs.uncertainty, flairNode)
        names = [v.name for v in layouts.COMPARE_VIEWS]
        composites = []
        for name, node in zip(names, shown):
            widget = lm.sliceWidget(name)
            mrml.assign_layers(widget.mrmlSliceCompositeNode(), background=node)
            composites.append(widget.mrmlSliceCompositeNode())
        mrml.link_views(composites)
        self._alignViewsTo(outputs.sr, names)
        first = lm.sliceWidget(names[0]).sliceLogic()
        mrml.move_linked_offset(first, first.GetSliceOffset())  # start every view on the same slice

    # --- reader study ----------------------------------------------------------------------------------------
    def readerSources(self, slicesPerMap=0, seed=0):
        """LR (zero-filled) / SR pairs of every super-resolved map in the scene, slices with signal."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        sources = []
        for srNode in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if srNode.GetAttribute(mrml.ROLE_ATTRIBUTE) != "sr":
                continue
            lrNode = slicer.mrmlScene.GetNodeByID(srNode.GetAttribute(mrml.SOURCE_ATTRIBUTE) or "")
            zfNode = lrNode.GetNodeReference(mrml.reference_role("zerofilled")) if lrNode else None
            if zfNode is None:
                continue
            axis = geometry.detect_slice_axis(lrNode.GetImageData().GetDimensions(), mrml.node_world_affine(lrNode))
            data, _affine = mrml.volume_arrays(srNode)
            item = sh.GetItemByDataNode(lrNode)
            patientItem = sh.GetItemAncestorAtLevel(item, "Patient") if item else 0
            patient = sh.GetItemName(patientItem) if patientItem else "patient"
            chosen = readerstudy.choose_slices(readerstudy.slices_with_signal(data, axis), slicesPerMap,
                                               f"{seed}:{lrNode.GetName()}")
            sources += [readerstudy.PairSource(patient, lrNode.GetName(), k, zfNode.GetID(), srNode.GetID())
                        for k in chosen]
        if not sources:
            raise ValueError(_("No super-resolved maps in the scene: run Super-resolve first."))
        return sources

    def showTrial(self, trial, orientation="Axial"):
        """Show one pair blinded: views labelled A and B, identical display, names and W/L dragging disabled."""
        scene = slicer.mrmlScene
        nodes = {side: scene.GetNodeByID(trial.ref(side)) for side in readerstudy.SIDES}
        if any(n is None for n in nodes.values()):
            raise ValueError(_("The images of case {case} are not in the scene; load the scene the study was "
                               "started with.").format(case=trial.case_id))
        lm = slicer.app.layoutManager()
        if self._readingState is None:
            interaction = slicer.app.applicationLogic().GetInteractionNode()
            self._readingState = {"layout": lm.layout, "interaction": mrml.disable_window_level_dragging(interaction),
                                  "observers": []}
            slicer.util.setViewControllersVisible(False)  # the controllers would show node names
            slicer.util.setDataProbeVisible(False)
            self._setSliceAnnotations(False)
        mrml.register_layout(lm.layoutLogic().GetLayoutNode(), layouts.READER_LAYOUT_ID,
                             layouts.reader_layout_xml(orientation))
        lm.setLayout(layouts.READER_LAYOUT_ID)
        pair = [nodes[s] for s in readerstudy.SIDES]
        window = display.shared_window([slicer.util.arrayFromVolume(n) for n in pair])
        colorId = mrml.color_id(scene, display.METABOLITE_COLORS)
        for node in pair:
            mrml.show_map(node, window, colorId, interpolate=True)
        self._lockWindowLevel(pair, window)
        srNode = nodes[trial.sr_side]
        shape = srNode.GetImageData().GetDimensions()
        lrNode = scene.GetNodeByID(srNode.GetAttribute(mrml.SOURCE_ATTRIBUTE) or "")
        axis = geometry.detect_slice_axis(lrNode.GetImageData().GetDimensions(), mrml.node_world_affine(lrNode))
        centre = geometry.slice_centre_ras(shape, mrml.node_world_affine(srNode), axis, trial.source.slice_index)
        composites = []
        for view, node in zip(layouts.READER_VIEWS, pair):
            widget = lm.sliceWidget(view.name)
            mrml.assign_layers(widget.mrmlSliceCompositeNode(), background=node)
            composites.append(widget.mrmlSliceCompositeNode())
            widget.mrmlSliceNode().RotateToVolumePlane(srNode)
            widget.fitSliceToBackground()
            widget.mrmlSliceNode().JumpSliceByCentering(*centre)
        mrml.link_views(composites)

    def _lockWindowLevel(self, volumeNodes, window):
        """Put back the shared window if anything changes it during the reading."""
        state = self._readingState
        for displayNode, tag in state["observers"]:
            displayNode.RemoveObserver(tag)
        state["observers"] = []

        tolerance = 1e-6 * max(abs(window[0]), abs(window[1]), 1.0)

        def restore(displayNode, event):
            current = (displayNode.GetWindowLevelMin(), displayNode.GetWindowLevelMax())
            if max(abs(current[0] - window[0]), abs(current[1] - window[1])) > tolerance:
                displayNode.SetWindowLevelMinMax(*window)

        for node in volumeNodes:
            d = node.GetDisplayNode()
            state["observers"].append((d, d.AddObserver(vtk.vtkCommand.ModifiedEvent, restore)))

    @staticmethod
    def _setSliceAnnotations(enabled):
        """Corner annotations list volume names; switch them off while reading (DataProbe module)."""
        try:
            annotations = slicer.modules.DataProbeInstance.infoWidget.sliceAnnotations
        except AttributeError:
            return
        annotations.sliceViewAnnotationsEnabled = enabled
        annotations.updateSliceViewFromGUI()

    def endReading(self):
        """Restore what the reading changed: layout, mouse mode, view controllers, annotations, W/L lock."""
        state, self._readingState = self._readingState, None
        if state is None:
            return
        for displayNode, tag in state["observers"]:
            displayNode.RemoveObserver(tag)
        slicer.app.applicationLogic().GetInteractionNode().SetCurrentInteractionMode(state["interaction"])
        slicer.util.setViewControllersVisible(True)
        slicer.util.setDataProbeVisible(True)
        self._setSliceAnnotations(True)
        slicer.app.layoutManager().setLayout(state["layout"])


#
# Test (runs inside Slicer: Reload and Test, or ctest -R py_MRSISuperResolution)
#
class MRSISuperResolutionTest(ScriptedLoadableModuleTest):
    """End-to-end tests on a tiny synthetic patient with a tiny random-weights model (no network, no GPU)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        for test in (self.test_sample_data, self.test_process_end_to_end, self.test_cancel_leaves_scene_unchanged):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    # helpers
    def _patientNodes(self):
        from MRSISuperResolutionLib import sampledata

        nodes = {}
        for key, (data, affine) in sampledata.synthetic_patient().items():
            nodes[key] = slicer.util.addVolumeFromArray(geometry.ijk_to_kji(data).astype("float32"), affine,
                                                        name="Test_" + key)
        return nodes

    def _tinyModel(self, logic):
        """Write a random-weights 'tiny' FTDDM with Slicer's Python in a subprocess (torch stays out of Slicer)."""
        import subprocess

        path = os.path.join(slicer.app.temporaryPath, "MRSISuperResolution_tiny.safetensors")
        python, env = logic.pythonCommand()
        code = ("import sys; sys.path.insert(0, %r); from ftddm_core.model import FTDDM; "
                "from ftddm_core.config import preset; FTDDM(preset('tiny')).save(%r, overwrite=True)"
                % (engineDirectory(), path))
        subprocess.run([*python, "-c", code], env=env, check=True, capture_output=True, timeout=300)
        return path

    def _requireEngine(self, logic):
        import unittest

        missing = logic.missingDependencies()
        if missing:
            raise unittest.SkipTest("engine dependencies not installed: " + ", ".join(missing))

    # tests
    def test_sample_data(self):
        """The synthetic patient loads through Sample Data with the geometry it was generated with."""
        import SampleData

        from MRSISuperResolutionLib import sampledata

        registerSampleData()
        nodes = SampleData.downloadSamples(sampledata.SAMPLE_NAME)
        self.assertEqual(len(nodes), 4)
        naa = slicer.util.getNode("Synthetic_NAA")
        self.assertEqual(naa.GetImageData().GetDimensions(), (16, 16, 6))
        expected = sampledata.mrsi_affine()
        got = mrml.node_world_affine(naa)
        self.assertTrue(abs(got - expected).max() < 1e-3, f"NAA geometry {got} != {expected}")
        self.assertEqual(self.detected(naa), (2, 16, 4.0))
        self.delayDisplay("Sample data OK")

    def detected(self, node):
        return MRSISuperResolutionLogic.detectedFactor(node)

    def test_process_end_to_end(self):
        """logic.process on the tiny patient: nodes, geometry, hierarchy and display of the outputs."""
        logic = MRSISuperResolutionLogic()
        self._requireEngine(logic)
        model = self._tinyModel(logic)
        nodes = self._patientNodes()
        before = set(os.listdir(slicer.app.temporaryPath))
        out = logic.process(nodes["NAA"], nodes["T1"], nodes["FLAIR"], modelPath=model, steps=1, samples=2,
                            device="cpu")
        self.assertIsInstance(out, OutputNodes)
        lrAffine = mrml.node_world_affine(nodes["NAA"])
        expected = lrAffine.copy()
        expected[:3, :2] /= 4.0  # sample-aligned model grid: same origin, in-plane spacing / s
        for node in out:
            self.assertEqual(node.GetImageData().GetDimensions(), (64, 64, 6))
            self.assertTrue(abs(mrml.node_world_affine(node) - expected).max() < 1e-3)
        srDisplay, zfDisplay = out.sr.GetDisplayNode(), out.zeroFilled.GetDisplayNode()
        self.assertAlmostEqual(srDisplay.GetWindowLevelMax(), zfDisplay.GetWindowLevelMax(), places=5)
        self.assertEqual(srDisplay.GetColorNodeID(), zfDisplay.GetColorNodeID())
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = sh.GetItemParent(sh.GetItemByDataNode(nodes["NAA"]))
        self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(out.sr)), parent)
        self.assertEqual(set(os.listdir(slicer.app.temporaryPath)) - before, set())  # temporary files removed
        again = logic.process(nodes["NAA"], nodes["T1"], nodes["FLAIR"], modelPath=model, steps=1, samples=1,
                              device="cpu")
        self.assertEqual(again.sr.GetID(), out.sr.GetID())  # a re-run updates the same nodes
        logic.showCompareLayout(out, nodes["FLAIR"])
        self.assertEqual(slicer.app.layoutManager().layout, layouts.COMPARE_LAYOUT_ID)
        self.delayDisplay("process() OK")

    def test_cancel_leaves_scene_unchanged(self):
        """Cancel during sampling: process tree ended, no output node, temporary folder removed."""
        logic = MRSISuperResolutionLogic()
        self._requireEngine(logic)
        model = self._tinyModel(logic)
        nodes = self._patientNodes()
        count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        finished = []
        handle = logic.process(nodes["NAA"], nodes["T1"], nodes["FLAIR"], modelPath=model, sampler="ddpm",
                               steps=100, samples=32, device="cpu", waitForCompletion=False,
                               onFinished=finished.append)
        deadline = time.monotonic() + 120
        while handle.job.progress is None and handle.state == runner.RUNNING and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        pid = handle.job.pid
        handle.cancel()
        self.assertEqual(handle.state, runner.CANCELLED)
        self.assertEqual(finished, [handle])
        from MRSISuperResolutionLib.process import pid_alive

        self.assertFalse(pid_alive(pid))
        self.assertFalse(os.path.exists(handle.job.folder))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), count)
        self.delayDisplay("Cancel OK")
