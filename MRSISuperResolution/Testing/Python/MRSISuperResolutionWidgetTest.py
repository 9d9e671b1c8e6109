"""In-Slicer test of the module GUI: parameter node ↔ widgets binding, enable states, Cancel label."""
import unittest

import slicer


class MRSISuperResolutionWidgetTest(unittest.TestCase):
    """Runs with `ctest -R py_MRSISuperResolutionWidgetTest` in the extension build tree."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.widget = slicer.util.getModuleWidget("MRSISuperResolution")
        self.widget.initializeParameterNode()
        self.p = self.widget._parameterNode

    def test_parameters_reach_the_widgets_and_back(self):
        ui = self.widget.ui
        self.p.tauD = 0.55
        self.assertAlmostEqual(ui.tauDSlider.value, 0.55, places=2)
        self.p.sampler = "respaced"
        self.assertEqual(ui.samplerComboBox.currentText, "respaced")
        ui.stepsSpinBox.value = 7
        self.assertEqual(self.p.steps, 7)
        ui.samplesSpinBox.value = 3
        self.assertEqual(self.p.samples, 3)
        self.assertEqual((ui.tauDSlider.minimum, ui.tauDSlider.maximum), (0.0, 2.0))

    def test_apply_needs_inputs_and_factor_is_detected(self):
        import numpy as np

        ui = self.widget.ui
        self.assertFalse(ui.applyButton.enabled)
        volume = lambda name, shape: slicer.util.addVolumeFromArray(np.ones(shape, np.float32), name=name)
        self.p.mrsiVolume = volume("NAA", (6, 16, 16))
        self.p.t1Volume = volume("T1", (20, 40, 40))
        self.p.flairVolume = volume("FLAIR", (20, 40, 40))
        self.assertTrue(ui.applyButton.enabled)
        self.p.autoScale = True
        self.assertAlmostEqual(self.p.scale, 4.0)
        self.assertFalse(ui.scaleSpinBox.enabled)

    def test_output_factor_spin_box_binds_factor_and_the_label_shows_the_grid(self):
        import numpy as np

        ui = self.widget.ui
        self.assertEqual((ui.factorSpinBox.minimum, ui.factorSpinBox.maximum), (2.0, 8.0))
        self.p.mrsiVolume = slicer.util.addVolumeFromArray(np.ones((4, 20, 24), np.float32), name="rect")
        self.assertIn("Untick", ui.outputGridLabel.text)  # 24×20 has no automatic 64×64 grid
        self.assertFalse(ui.factorSpinBox.enabled)
        ui.autoFactorCheckBox.checked = False
        ui.factorSpinBox.value = 3.0
        self.assertEqual((self.p.autoFactor, self.p.factor), (False, 3.0))
        self.assertTrue(ui.factorSpinBox.enabled)
        self.assertEqual(ui.outputGridLabel.text, "LR 24×20 → 72×60 in-plane, s = 3.00")

    def test_moving_tau_d_after_a_run_offers_a_rerun(self):
        ui = self.widget.ui
        self.p.sampler = "respaced"
        self.p.lastRunTauD = 0.9
        self.p.tauD = 0.5
        self.assertFalse(ui.rerunButton.isHidden())
        self.assertIn("0.50", ui.rerunLabel.text)
        self.p.sampler = "dpmpp"  # τ_d has no effect there: explain instead of offering a useless re-run
        self.assertTrue(ui.rerunButton.isHidden())
        self.assertIn("ancestral", ui.rerunLabel.text)
