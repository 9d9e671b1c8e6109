"""A background process whose output is read on a thread and collected by polling from the GUI thread.

Slicer ≤ 5.10 has no non-blocking ``launchConsoleProcess``, and Qt/MRML must only be touched from the main
thread, so: a reader thread puts lines into a queue, the module drains it from a ``qt.QTimer`` (or blocks in
:meth:`BackgroundProcess.wait` for console scripting). Cancel ends the whole process tree — the PythonSlicer
launcher *and* the python-real it starts — by running the command in its own process group / session.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

# taskkill is a console program: without this flag every Cancel flashes a console window on Windows
_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)
_PROGRESS = re.compile(r"^PROGRESS\s+(\d+)/(\d+)(?:\s+(.*))?$")
_ERROR = re.compile(r"^ftddm [\w-]+: error: (.*)$")


@dataclass(frozen=True)
class Progress:
    """One `PROGRESS done/total message` line of the ftddm CLI (--progress-lines)."""

    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """done / total clipped to [0, 1] (0 when total is 0)."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 0.0


def parse_progress_line(line: str) -> Progress | None:
    """Progress of a `PROGRESS <done>/<total> <message>` line, None for any other line."""
    match = _PROGRESS.match(line.strip())
    if not match:
        return None
    return Progress(int(match.group(1)), int(match.group(2)), (match.group(3) or "").strip())


def parse_error_line(line: str) -> str | None:
    """The message of an `ftddm <command>: error: <message>` line (a user error, exit code 2), else None."""
    match = _ERROR.match(line.strip())
    return match.group(1) if match else None


def kill_process_tree(pid: int, *, grace_s: float = 3.0) -> None:
    """End process `pid` and all its descendants: polite first, forced after grace_s (blocks up to grace_s)."""
    descendants = _descendants(pid)
    terminate_process_tree(pid)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _any_alive([pid, *descendants]):
        time.sleep(0.05)
    force_kill_process_tree(pid, descendants)


def terminate_process_tree(pid: int) -> None:
    """Ask process group `pid` to end (SIGTERM); on Windows end the tree at once (taskkill /T). Never blocks."""
    if sys.platform == "win32":
        # taskkill /T walks the tree; CREATE_NEW_PROCESS_GROUP keeps Slicer itself out of it.
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False,
                       creationflags=_NO_WINDOW)
    else:
        _signal_group(pid, signal.SIGTERM)


def force_kill_process_tree(pid: int, descendants: Sequence[int]) -> None:
    """SIGKILL the group, then each of `descendants` (children that left the group with setsid)."""
    if sys.platform != "win32":
        _signal_group(pid, signal.SIGKILL)
    for child in descendants:
        _kill_pid(child)


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)  # the process was started as a session leader: its pgid is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _kill_pid(pid: int) -> None:
    try:
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/PID", str(pid)], capture_output=True, check=False,
                           creationflags=_NO_WINDOW)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _any_alive(pids: Sequence[int]) -> bool:
    return any(pid_alive(p) for p in pids)


def pid_alive(pid: int) -> bool:
    """True while a process exists and is not a zombie (POSIX) / has not exited (Windows, via psutil)."""
    try:
        import psutil  # optional: Slicer bundles it on some platforms

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    except ImportError:
        pass
    if sys.platform == "win32":  # pragma: no cover - without psutil, assume the kill worked
        return False
    stat = f"/proc/{pid}/stat"
    if os.path.exists(stat):
        try:
            with open(stat) as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _descendants(pid: int) -> list[int]:
    """All descendant pids of pid (psutil when available, else /proc on Linux, else none)."""
    try:
        import psutil

        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    except ImportError:
        pass
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


class BackgroundProcess:
    """A command run in its own process group, stdout+stderr merged into lines read on a thread."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None):
        if not args or not all(isinstance(a, str) for a in args):
            raise ValueError(f"args must be a non-empty sequence of strings, got {args!r}")
        self.args = list(args)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.cancelled = False
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._kill_at: float | None = None  # after a non-blocking cancel: when to force the kill
        self._tree: list[int] = []  # descendants seen when cancel was asked

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "BackgroundProcess":
        """Start the process (once); its output is read on a daemon thread."""
        if self._proc is not None:
            raise RuntimeError("process already started")
        env = dict(self.env if self.env is not None else os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # progress lines arrive as they are printed
        # the child's stdout is read as UTF-8; Windows' default code page would garble (or fail on) "τ", "→"
        env.setdefault("PYTHONUTF8", "1")
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                      cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1)
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | _NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches every descendant
        self._proc = subprocess.Popen(self.args, **kwargs)
        self._reader = threading.Thread(target=self._read, name="ftddm-output", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._proc.stdout.close()
        self._lines.put(None)  # end of output

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def finished(self) -> bool:
        """True once the process has exited and all its output has been read."""
        return (self._proc is not None and self._proc.poll() is not None and self._reader is not None
                and not self._reader.is_alive() and self._lines.empty())

    # --- output ------------------------------------------------------------------------------------------
    def read_lines(self) -> list[str]:
        """Lines printed since the last call (never blocks)."""
        out = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append(line)

    def wait(self, timeout: float | None = None, on_line: Callable[[str], None] | None = None,
             idle: Callable[[], None] | None = None, poll_s: float = 0.1) -> int:
        """Block until exit, handing each line to on_line and calling idle() between polls; return the exit code.

        TimeoutError after `timeout` seconds (the process keeps running; call cancel()).
        """
        if self._proc is None:
            raise RuntimeError("process not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for line in self.read_lines():
                if on_line:
                    on_line(line)
            if self.finished():
                for line in self.read_lines():
                    if on_line:
                        on_line(line)
                return self._proc.returncode
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"process {self.pid} still running after {timeout} s")
            if idle:
                idle()
            time.sleep(poll_s)

    def cancel(self, grace_s: float = 3.0, *, wait: bool = True) -> None:
        """Kill the process and all its descendants; safe to call twice or after exit.

        wait=False (the GUI thread) only asks the tree to end and returns at once; call reap() from a timer
        until finished(): it forces the kill after grace_s.
        """
        if self._proc is None:
            return
        if not self.cancelled:
            self.cancelled = True
            self._tree = _descendants(self._proc.pid)
            if self._proc.poll() is None or self._tree:
                terminate_process_tree(self._proc.pid)
            self._kill_at = time.monotonic() + grace_s
        if not wait:
            return
        while not self.reap():
            time.sleep(0.05)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def reap(self) -> bool:
        """After cancel(): force the kill once the grace time is over; True when the process has ended."""
        if self._proc is None:
            return True
        ended = self._proc.poll() is not None and not _any_alive(self._tree)
        if not ended and self._kill_at is not None and time.monotonic() >= self._kill_at:
            force_kill_process_tree(self._proc.pid, self._tree)
            self._kill_at = None  # once
        return ended
