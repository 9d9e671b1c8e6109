"""Progress-line parsing and the background process: output lines, exit codes, cancel of a process tree."""
import sys
import textwrap
import time

import pytest

from MRSISuperResolutionLib.process import (BackgroundProcess, Progress, parse_error_line, parse_progress_line,
                                            pid_alive)


@pytest.mark.parametrize("line, expected", [
    ("PROGRESS 3/10 sample 1/8", Progress(3, 10, "sample 1/8")),
    ("PROGRESS 0/0", Progress(0, 0, "")),
    ("  PROGRESS 12/12 done  \n", Progress(12, 12, "done")),
    ("progress 1/2", None), ("PROGRESS a/2", None), ("INFO PROGRESS 1/2", None), ("", None)])
def test_progress_lines(line, expected):
    assert parse_progress_line(line) == expected


def test_progress_fraction_is_clipped():
    assert Progress(3, 12).fraction == 0.25
    assert Progress(15, 12).fraction == 1.0
    assert Progress(1, 0).fraction == 0.0


def test_error_lines():
    assert parse_error_line("ftddm super-resolve: error: T1 is empty") == "T1 is empty"
    assert parse_error_line("ftddm phantom: error: x: y") == "x: y"
    assert parse_error_line("Traceback (most recent call last):") is None


def python(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_lines_from_stdout_and_stderr_arrive_in_order_with_the_exit_code():
    proc = BackgroundProcess(python("""
        import sys
        print("PROGRESS 1/2 a", file=sys.stderr, flush=True)
        print("hello", flush=True)
        print("PROGRESS 2/2 b", file=sys.stderr, flush=True)
        sys.exit(4)
    """)).start()
    lines = []
    assert proc.wait(timeout=30, on_line=lines.append) == 4
    assert lines == ["PROGRESS 1/2 a", "hello", "PROGRESS 2/2 b"]
    assert not proc.running and proc.finished()


def test_read_lines_never_blocks():
    proc = BackgroundProcess(python("import time; print('x', flush=True); time.sleep(30)")).start()
    try:
        t = time.monotonic()
        proc.read_lines()
        assert time.monotonic() - t < 0.5
    finally:
        proc.cancel()
    assert proc.cancelled and not proc.running


def test_cancel_kills_the_whole_process_tree():
    # launcher → child → grandchild, like PythonSlicer → python-real (→ workers)
    proc = BackgroundProcess(python("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time\\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\\n"
            "print('GRANDCHILD', g.pid, flush=True)\\n"
            "time.sleep(60)"])
        print("CHILD", child.pid, flush=True)
        time.sleep(60)
    """)).start()
    pids = {}
    deadline = time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        for line in proc.read_lines():
            name, pid = line.split()
            pids[name] = int(pid)
        time.sleep(0.05)
    assert set(pids) == {"CHILD", "GRANDCHILD"}
    everyone = [proc.pid, *pids.values()]
    assert all(pid_alive(p) for p in everyone)
    proc.cancel(grace_s=1.0)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in everyone) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in everyone)
    assert proc.returncode is not None and proc.returncode != 0
    proc.cancel()  # a second cancel is harmless


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        BackgroundProcess([])
    proc = BackgroundProcess(python("pass"))
    with pytest.raises(RuntimeError, match="not started"):
        proc.wait()
    proc.start()
    with pytest.raises(RuntimeError, match="already started"):
        proc.start()
    assert proc.wait(timeout=30) == 0
