"""In-Slicer tests of the module logic: sample data, process() end to end, Cancel, and a reading that gives the
user's views back. A tiny random-weights model and the synthetic patient: no network, no GPU.

Runs with `ctest -R py_MRSISuperResolutionLogicTest`, or from the module's Reload and Test (source checkout).
"""
import os
import time
import unittest

import numpy as np

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from MRSISuperResolution import MRSISuperResolutionLogic, OutputNodes, engineDirectory, registerSampleData
from MRSISuperResolutionLib import geometry, layouts, mrml, runner, sampledata
from MRSISuperResolutionLib.process import pid_alive


class MRSISuperResolutionLogicTest(ScriptedLoadableModuleTest):
    """End-to-end tests on a tiny synthetic patient with a tiny random-weights model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_sample_data, self.test_process_end_to_end, self.test_cancel_leaves_scene_unchanged,
                     self.test_reading_restores_the_users_views):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    # helpers
    def _patientNodes(self):
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
        missing = logic.missingDependencies()
        if missing:
            raise unittest.SkipTest("engine dependencies not installed: " + ", ".join(missing))

    # tests
    def test_sample_data(self):
        """The synthetic patient loads through Sample Data with the geometry it was generated with."""
        import SampleData

        registerSampleData()
        nodes = SampleData.downloadSamples(sampledata.SAMPLE_NAME)
        self.assertEqual(len(nodes), 4)
        naa = slicer.util.getNode("Synthetic_NAA")
        self.assertEqual(naa.GetImageData().GetDimensions(), (16, 16, 6))
        expected = sampledata.mrsi_affine()
        got = mrml.node_world_affine(naa)
        self.assertTrue(abs(got - expected).max() < 1e-3, f"NAA geometry {got} != {expected}")
        grid = MRSISuperResolutionLogic.detectedGrid(naa)
        self.assertEqual((grid.axis, grid.lr_inplane, grid.inplane, grid.scale), (2, (16, 16), (64, 64), 4.0))
        self.delayDisplay("Sample data OK")

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
        expected = mrml.node_world_affine(nodes["NAA"]).copy()
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
        """Cancel during sampling returns at once; then the process tree ends, no output node, folder removed."""
        logic = MRSISuperResolutionLogic()
        self._requireEngine(logic)
        model = self._tinyModel(logic)
        nodes = self._patientNodes()
        count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        finished = []
        handle = logic.process(nodes["NAA"], nodes["T1"], nodes["FLAIR"], modelPath=model, sampler="respaced",
                               steps=100, samples=32, device="cpu", waitForCompletion=False,
                               onFinished=finished.append)
        deadline = time.monotonic() + 120
        while handle.job.progress is None and handle.state == runner.RUNNING and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        pid = handle.job.pid
        asked = time.monotonic()
        handle.cancel()
        self.assertLess(time.monotonic() - asked, 0.5)  # the GUI thread is not held
        while handle.active and time.monotonic() < deadline:
            slicer.app.processEvents()  # the module's QTimer polls the cancelled job
            time.sleep(0.05)
        self.assertEqual(handle.state, runner.CANCELLED)
        self.assertEqual(finished, [handle])
        self.assertFalse(pid_alive(pid))
        self.assertFalse(os.path.exists(handle.job.folder))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), count)
        self.delayDisplay("Cancel OK")

    def test_reading_restores_the_users_views(self):
        """A reading hides names and changes display; endReading puts back what the user had, not defaults."""
        logic = MRSISuperResolutionLogic()
        nodes = self._patientNodes()
        maps = {kind: (np.abs(sampledata.synthetic_patient()["NAA"][0]).repeat(4, 0).repeat(4, 1),
                       mrml.node_world_affine(nodes["NAA"]) @ np.diag([0.25, 0.25, 1, 1]))
                for kind in ("sr", "zerofilled", "uncertainty")}
        out = mrml.store_outputs(slicer.mrmlScene, nodes["NAA"], maps)
        srDisplay = out["sr"].GetDisplayNode()
        before = mrml.display_state(srDisplay)
        lm = slicer.app.layoutManager()
        lm.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        slicer.util.setViewControllersVisible(False)  # the user's own choice
        from MRSISuperResolutionLib import readerstudy

        source = logic.readerSources(slicesPerMap=1, seed=0)[0]
        logic.showTrial(readerstudy.Trial("c1", source, "A"))
        self.assertEqual(lm.layout, layouts.READER_LAYOUT_ID)
        self.assertFalse(srDisplay.GetApplyThreshold())
        logic.endReading()
        self.assertEqual(lm.layout, slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        self.assertEqual(mrml.display_state(srDisplay), before)
        self.assertFalse(any(lm.sliceWidget(n).sliceController().visible for n in lm.sliceViewNames()))
        self.delayDisplay("Reading restore OK")
