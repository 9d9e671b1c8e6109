"""The reader-study part of the module GUI: score panel, Start / Save and next / Stop, one trial after another.

The module widget owns the .ui; this panel drives its "Reader study" section and calls onReadingChanged so
the module can lock everything else (inputs, sampling, display, Super-resolve) while a reading is shown.
"""
import pathlib

import qt
import slicer
from slicer.i18n import tr as _

from . import readerstudy

DEFAULT_STUDY_FOLDER_NAME = "MRSIReaderStudy"


def defaultStudyFolder():
    """<Slicer's default scene folder>/MRSIReaderStudy: what the folder button shows before the user picks one."""
    return pathlib.Path(slicer.app.defaultScenePath) / DEFAULT_STUDY_FOLDER_NAME


def isUnsetFolder(path):
    """pathlib.Path() (the parameter's default) is "." — the working directory, never a chosen folder."""
    return str(path) in ("", ".")


class ReaderStudyPanel:
    """Blinded scoring of LR/SR pairs; the display itself is done by the logic's ReaderStudyDisplay."""

    def __init__(self, ui, logic, parameterNode, onReadingChanged):
        self.ui = ui
        self.logic = logic
        self.parameterNode = parameterNode  # callable: the module's current parameter node
        self.onReadingChanged = onReadingChanged
        self.session = None
        self.trial = None
        self._scoreCombos = {}
        self._itemLabels = {}

    @property
    def reading(self):
        return self.session is not None

    def setup(self):
        self._buildScorePanel()
        self.ui.startReadingButton.connect("clicked(bool)", self.onStartReading)
        self.ui.saveScoresButton.connect("clicked(bool)", self.onSaveScores)
        self.ui.stopReadingButton.connect("clicked(bool)", self.onStopReading)

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

    def onStartReading(self, *_clicked):
        p = self.parameterNode()
        with slicer.util.tryWithErrorDisplay(_("Could not start the reading."), waitCursor=True):
            if isUnsetFolder(p.studyFolder):
                p.studyFolder = defaultStudyFolder()
            sources = self.logic.readerSources(p.slicesPerMap, p.studySeed)
            self.session = readerstudy.ReaderSession.start(p.studyFolder, p.readerName, sources,
                                                           study_seed=p.studySeed)
            self._showNextTrial()

    def _showNextTrial(self):
        done, total = self.session.progress()
        self.trial = self.session.next_trial()
        if self.trial is None:
            self.ui.readingProgressLabel.text = _("Reading complete: {total} pairs scored.").format(total=total)
            self.onStopReading()
            return
        for combo in self._scoreCombos.values():
            combo.currentIndex = 0
        for item, text in zip(readerstudy.ITEMS, self.logic.reading.itemLabels(self.trial)):
            self._itemLabels[item].text = text
        self.logic.showTrial(self.trial)
        self.ui.readingProgressLabel.text = _("Case {case}: pair {n} of {total}").format(
            case=self.trial.case_id, n=done + 1, total=total)
        self._setReading(True)

    def _setReading(self, reading):
        self.ui.scoreGridWidget.enabled = reading
        self.ui.saveScoresButton.enabled = reading
        self.ui.stopReadingButton.enabled = reading
        self.ui.startReadingButton.enabled = not reading
        self.onReadingChanged()

    def onSaveScores(self):
        with slicer.util.tryWithErrorDisplay(_("Scores not saved."), waitCursor=True):
            scores = {side: {item: self._scoreValue(self._scoreCombos[(side, item)]) for item in readerstudy.ITEMS}
                      for side in readerstudy.SIDES}
            self.session.record(self.trial.case_id, scores)
            self._showNextTrial()

    @staticmethod
    def _scoreValue(combo):
        """The score stored with the chosen item ("" while nothing is chosen)."""
        return combo.itemData(combo.currentIndex) or ""

    def onStopReading(self):
        if self.session is None:
            return
        self.session = None
        self.trial = None
        self._setReading(False)
        self.logic.endReading()
