"""Pure-Python helpers of the MRSISuperResolution Slicer module.

Everything here except ``mrml`` imports neither ``slicer`` nor Qt nor torch, so it runs under plain pytest;
``mrml`` needs only Slicer's MRML libraries (the Slicer application or the ``slicer-core`` wheel).

The engine, ftddm_core, is shipped inside the extension (never installed): importing this package puts its
folder on sys.path, so ``options`` and ``geometry`` can use its torch-free modules (ftddm_core.options,
ftddm_core.lr_grid) before torch and the engine's other packages are installed.
"""
import os
import sys

_MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engine_directory():
    """Folder that contains the embedded ftddm_core package, or None: beside the module once installed, the
    repository root when the module is loaded from a source checkout."""
    for candidate in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        if os.path.isfile(os.path.join(candidate, "ftddm_core", "__init__.py")):
            return candidate
    return None


def _make_engine_importable():
    folder = engine_directory()
    if folder is not None and folder not in sys.path:
        sys.path.append(folder)


_make_engine_importable()
