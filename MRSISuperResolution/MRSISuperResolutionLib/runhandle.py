"""A running `ftddm super-resolve` seen from Slicer: polled on the main thread, outputs turned into nodes.

Qt/MRML may only be touched from the main thread, so a QTimer (GUI) or a blocking loop (console) polls the
job; Cancel only asks the process tree to end and the same polling notices when it has.
"""
import logging
import time

import qt
import slicer

from . import runner

CANCELLING = "cancelling"  # Cancel was asked; the process tree has not ended yet


class RunHandle:
    """One run: state, progress and log callbacks, outputs (OutputNodes per input) once completed; the
    temporary folder is removed in every case."""

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

    @property
    def active(self):
        """Running or cancelling: the process may still be alive."""
        return self.state in (runner.RUNNING, CANCELLING)

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
        while self.active:
            self._poll()
            slicer.app.processEvents()
            time.sleep(self.POLL_MS / 1000)

    def _poll(self):
        if not self.active:
            return  # a timeout queued before the timer stopped
        try:
            lines = self.job.poll()
        except Exception as error:  # a reader failure must not leave the GUI in "running" for ever
            self.job.cancel(wait=True)
            self._finish(error=str(error))
            return
        for line in lines:
            if self.onLog and not line.startswith("PROGRESS"):
                self.onLog(line)
        if self.state == runner.RUNNING and self.job.progress is not None and self.job.progress != self._lastProgress:
            self._lastProgress = self.job.progress
            if self.onProgress:
                self.onProgress(self.job.progress)
        if self.job.state != runner.RUNNING:
            self._finish()

    def cancel(self, wait=False):
        """Stop the run; no node is created or changed. Returns at once (the GUI stays responsive): the state
        is "cancelling" until the polling sees the process tree gone. wait=True blocks until then."""
        if self.state != runner.RUNNING:
            return
        self.state = CANCELLING
        self.job.cancel(wait=wait)
        if wait or self._timer is None:
            self._poll()

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
