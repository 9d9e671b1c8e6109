"""One `ftddm super-resolve` run on temporary files: write inputs, run in the background, read outputs, clean up.

No Slicer here: the module converts volume nodes to (array (i, j, k), affine) pairs and back; this class owns
the temporary folder, the process and the parsing of its output, so it is tested with plain pytest.
"""
from __future__ import annotations

import collections
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import niftiio
from .options import SuperResolveOptions, super_resolve_command
from .process import BackgroundProcess, Progress, parse_error_line, parse_progress_line

OUTPUT_KINDS = ("sr", "zerofilled", "uncertainty")  # file suffixes written by the CLI
LOG_LINES = 2000  # lines kept for the log window (older ones are dropped)

PREPARED, RUNNING, COMPLETED, FAILED, CANCELLED = "prepared", "running", "completed", "failed", "cancelled"


class SuperResolveJob:
    """Temporary folder → input NIfTIs → background `ftddm super-resolve` → output arrays; always cleaned up."""

    def __init__(self, python: Sequence[str], engine_dir, *, env: Mapping[str, str] | None = None,
                 temp_parent: str | None = None, keep_files: bool = False):
        self.python = list(python)
        self.engine_dir = str(engine_dir)
        self.env = env
        self.keep_files = keep_files
        self.folder = Path(tempfile.mkdtemp(prefix="mrsisr-", dir=temp_parent))
        self.state = PREPARED
        self.command: list[str] = []
        self.progress: Progress | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.error_message: str | None = None
        self.returncode: int | None = None
        self._process: BackgroundProcess | None = None
        self._stems: list[str] = []

    # --- inputs ------------------------------------------------------------------------------------------
    def prepare(self, lr_maps: Sequence[tuple[np.ndarray, np.ndarray]], t1, flair, mask=None, *, model=None,
                parameters: SuperResolveOptions | None = None) -> list[str]:
        """Write the inputs ((array (i, j, k), affine) pairs) as NIfTI and build the command; returns it."""
        if self.state != PREPARED or self.command:
            raise RuntimeError("a job is prepared once")
        if not lr_maps:
            raise ValueError("expected at least one LR metabolite map")
        inputs = self.folder / "in"
        self._stems = [f"map{i}" for i in range(len(lr_maps))]
        lr_paths = [self._write(inputs / f"{stem}.nii", pair, np.float32) for stem, pair in zip(self._stems, lr_maps)]
        t1_path = self._write(inputs / "t1.nii", t1, np.float32)
        flair_path = self._write(inputs / "flair.nii", flair, np.float32)
        mask_path = None
        if mask is not None:
            data, affine = mask
            mask_path = self._write(inputs / "mask.nii", ((np.asarray(data) != 0).astype(np.uint8), affine), np.uint8)
        self.command = super_resolve_command(self.python, self.engine_dir, lr_paths, t1_path, flair_path,
                                             self.folder / "out", mask=mask_path, model=model,
                                             parameters=parameters)
        return self.command

    @staticmethod
    def _write(path: Path, pair, dtype) -> Path:
        data, affine = pair
        data = np.asarray(data)
        if data.ndim != 3:
            raise ValueError(f"{path.stem}: expected a 3D (i, j, k) array, got shape {data.shape}")
        return niftiio.write_nifti(path, data.astype(dtype, copy=False), affine)

    # --- running -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the CLI in the background (after prepare)."""
        if not self.command:
            raise RuntimeError("call prepare() before start()")
        if self.state != PREPARED:
            raise RuntimeError(f"cannot start a job that is {self.state}")
        self._process = BackgroundProcess(self.command, env=self.env, cwd=str(self.folder)).start()
        self.state = RUNNING

    def poll(self) -> list[str]:
        """New output lines (progress and errors parsed); updates state when the process has ended."""
        if self._process is None:
            return []
        lines = self._process.read_lines()
        for line in lines:
            self._take(line)
        if self._process.cancelled:
            self._process.reap()  # forces the kill once the grace time of a non-blocking cancel is over
        if self.state == RUNNING and self._process.finished():
            lines += self._finish()
        return lines

    def _take(self, line: str) -> None:
        progress = parse_progress_line(line)
        if progress is not None:
            self.progress = progress
            return  # progress lines drive the bar, they would flood the log
        self.log.append(line)
        message = parse_error_line(line)
        if message:
            self.error_message = message

    def _finish(self) -> list[str]:
        rest = self._process.read_lines()
        for line in rest:
            self._take(line)
        self.returncode = self._process.returncode
        if self._process.cancelled:
            self.state = CANCELLED
        elif self.returncode == 0 and all(p.exists() for p in self._output_paths()):
            self.state = COMPLETED
        else:
            self.state = FAILED
            if not self.error_message:
                missing = [p.name for p in self._output_paths() if not p.exists()]
                tail = "\n".join(list(self.log)[-15:])
                why = f"exit code {self.returncode}" if self.returncode else f"outputs missing: {missing}"
                self.error_message = f"ftddm super-resolve failed ({why})\n{tail}".rstrip()
        return rest

    def wait(self, timeout: float | None = None, idle: Callable[[], None] | None = None,
             on_line: Callable[[str], None] | None = None) -> str:
        """Block until the run ends (idle() between polls, e.g. to process GUI events); returns the state."""
        if self.state == PREPARED:
            self.start()
        if self.state != RUNNING:
            return self.state
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == RUNNING:
            for line in self.poll():
                if on_line:
                    on_line(line)
            if self.state != RUNNING:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"ftddm super-resolve still running after {timeout} s")
            if idle:
                idle()
            time.sleep(0.1)
        return self.state

    def cancel(self, *, wait: bool = True) -> None:
        """Kill the whole process tree; the job ends CANCELLED (outputs are never read).

        wait=False returns at once (GUI thread): the job stays RUNNING until poll() sees the process gone.
        """
        if self._process is not None and self.state == RUNNING:
            self._process.cancel(wait=wait)
            if not wait:
                return
            self.poll()
        if self.state in (PREPARED, RUNNING):
            self.state = CANCELLED

    @property
    def cancelling(self) -> bool:
        """A cancel was asked and the process has not ended yet."""
        return self.state == RUNNING and self._process is not None and self._process.cancelled

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # --- outputs -----------------------------------------------------------------------------------------
    def _output_paths(self) -> list[Path]:
        out = self.folder / "out"
        return [out / f"{stem}_{kind}.nii.gz" for stem in self._stems for kind in OUTPUT_KINDS]

    def outputs(self) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Per LR map (input order): {"sr"|"zerofilled"|"uncertainty": (float32 array (i, j, k), affine)}."""
        if self.state != COMPLETED:
            raise RuntimeError(f"no outputs: the run is {self.state}"
                               + (f": {self.error_message}" if self.error_message else ""))
        out = self.folder / "out"
        result = []
        for stem in self._stems:
            maps = {}
            for kind in OUTPUT_KINDS:
                data, affine = niftiio.read_nifti(out / f"{stem}_{kind}.nii.gz")
                maps[kind] = (np.asarray(data, dtype=np.float32), affine)
            result.append(maps)
        return result

    def run_report(self) -> dict:
        """The CLI's <stem>_run.json (options used, detected factor, timings) of the first map, or {}."""
        path = self.folder / "out" / f"{self._stems[0]}_run.json" if self._stems else None
        if path is None or not path.exists():
            return {}
        return json.loads(path.read_text())

    def cleanup(self) -> None:
        """Kill the process if still running and delete the temporary folder (unless keep_files)."""
        if self.state == RUNNING:
            self.cancel(wait=True)
        if not self.keep_files:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "SuperResolveJob":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
