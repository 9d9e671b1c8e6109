"""Atomic file writes with the permissions of a normally created file, and deferring interrupts.

Every writer of ftddm goes through :func:`atomic_write`: the content goes to a temporary file in the target's
folder, gets the mode ``open()`` would have given (0o666 minus the umask; ``mkstemp`` makes 0o600, which
colleagues, a PACS node or Slicer running as another user cannot read), then ``os.replace`` puts it in place.
A reader sees the old file or the complete new one, never half of one.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

#: Signals the CLI turns into KeyboardInterrupt (Slicer's Cancel and schedulers send SIGTERM).
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; guarded because the call is process-wide)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the umask's bits."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside `path`, give it the default mode, then move it in.

    The temporary keeps the target's suffixes (nibabel and matplotlib choose the format from them) and is
    removed on any exception, KeyboardInterrupt included. An existing `path` is refused unless overwrite.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (Python: overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def atomic_savefig(fig, path: str | Path, *, dpi: int) -> Path:
    """:func:`atomic_write` of a matplotlib figure as PNG, then close it (pyplot keeps every open figure)."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        import matplotlib.pyplot as plt  # already imported by whoever made the figure

        plt.close(fig)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then deliver them to the handlers that were installed.

    Used around the few renames that publish a run's outputs, so that an interrupt cannot leave half of them.
    Python runs signal handlers in the main thread only, so elsewhere this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    # getsignal is None for a handler installed from C: restore the default then.
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in INTERRUPT_SIGNALS}
    for s in INTERRUPT_SIGNALS:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)
