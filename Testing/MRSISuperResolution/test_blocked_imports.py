"""The module's engine path runs with only what a fresh Slicer has: its bundle, torch and requirements.txt.

The test environment has every dependency (training, figures, diffusers, …), so a missing line in the
module's requirements file would never show. Here the background `ftddm super-resolve` the module starts is
run with every other installed top-level package blocked: importing one raises ModuleNotFoundError, as it
would in Slicer. Allowed = the packages Slicer 5.10 bundles (../shared/reference/slicer_python/README.md),
torch, and the module's requirements — each with the dependencies its own metadata declares (what pip
would install with it).
"""
import importlib.metadata as metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from MRSISuperResolutionLib import dependencies, runner
from MRSISuperResolutionLib.options import SuperResolveOptions

pytest.importorskip("torch")
requirements_lib = pytest.importorskip("packaging.requirements")

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "MRSISuperResolution" / "Resources" / "requirements.txt"
# Slicer 5.10's SuperBuild Python packages (pip and setuptools come with its Python); SimpleITK is built in.
SLICER_BUNDLE = ("numpy", "scipy", "SimpleITK", "pydicom", "pillow", "requests", "packaging", "pyparsing", "six",
                 "GitPython", "dicomweb-client", "pip", "setuptools")
ENGINE_PACKAGE = "ftddm_core"  # shipped inside the extension, never installed


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(names) -> set[str]:
    """The distributions in names plus, recursively, the installed ones their metadata requires (no extras)."""
    seen, stack = set(), [_canonical(n) for n in names]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = requirements_lib.Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(_canonical(req.name))
    return seen


def blocked_top_level_names() -> list[str]:
    """Installed importable names whose distributions are all outside Slicer's bundle + torch + requirements."""
    allowed = _with_dependencies([*SLICER_BUNDLE, "torch",
                                  *(dist for dist, _module, _line in dependencies.load_requirements(REQUIREMENTS))])
    return sorted(name for name, dists in metadata.packages_distributions().items()
                  if name != ENGINE_PACKAGE and not name.startswith("_")
                  and not any(_canonical(d) in allowed for d in dists))


def write_blocker(folder: Path, names) -> dict:
    """A sitecustomize that makes `import <name>` (and its submodules) fail; returns the env that loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import sys

        BLOCKED = frozenset({sorted(names)!r})

        class BlockOutsideSlicer:
            \"\"\"Meta-path finder: packages a fresh Slicer does not have cannot be imported.\"\"\"

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not in Slicer's bundle, "
                                              "torch or requirements.txt)", name=name)
                return None

        sys.meta_path.insert(0, BlockOutsideSlicer())
        """))
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(folder)  # only the blocker: the engine comes from the command, as in Slicer
    env.pop("PYTHONSTARTUP", None)
    return env


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    names = blocked_top_level_names()
    return names, write_blocker(tmp_path_factory.mktemp("blocker"), names)


def test_the_blocker_blocks_training_and_figure_packages_but_not_the_engines(blocked_env):
    names, env = blocked_env
    # the packages the issue is about are installed here, so they must be blocked for the test to mean anything
    for name in ("pytorch_msssim", "matplotlib", "diffusers", "tqdm"):
        try:
            metadata.distribution({"pytorch_msssim": "pytorch-msssim"}.get(name, name))
        except metadata.PackageNotFoundError:
            continue
        assert name in names, f"{name} is installed but not blocked"
        done = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert done.returncode != 0 and "blocked" in done.stderr, name
    allowed = "import torch, numpy, scipy, SimpleITK, nibabel, safetensors, skimage.filters"
    done = subprocess.run([sys.executable, "-c", allowed], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_modules_super_resolve_command_runs_with_only_slicers_packages(blocked_env, tmp_path, sample_patient,
                                                                           tiny_model):
    """The exact command the module starts (engine bootstrap, progress lines, automatic mask) completes."""
    _names, env = blocked_env
    job = runner.SuperResolveJob([sys.executable], REPO, env=env, temp_parent=str(tmp_path))
    job.prepare([sample_patient["NAA"]], sample_patient["T1"], sample_patient["FLAIR"], model=str(tiny_model),
                parameters=SuperResolveOptions(device="cpu", steps=1, samples=2))
    with job:
        state = job.wait(timeout=120)
        assert state == runner.COMPLETED, job.error_message
        assert job.outputs()[0]["sr"][0].shape == (64, 64, 6)


def test_the_modules_options_and_geometry_need_no_engine_package(tmp_path):
    """The GUI's options and geometry come from the bundled engine's torch-free modules: they import with torch
    and every requirements.txt package blocked (a fresh Slicer before the first install), from any folder."""
    blocked = ["torch", *(module for _dist, module, _line in dependencies.load_requirements(REQUIREMENTS))]
    env = write_blocker(tmp_path / "blocker", blocked)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "MRSISuperResolution")!r})
        from MRSISuperResolutionLib import geometry, options
        import ftddm_core
        assert ftddm_core.__file__.startswith({str(REPO)!r}), ftddm_core.__file__  # the bundled engine
        print(geometry.detect_upscaling_factor((16, 16, 8), [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
        args = options.SuperResolveOptions(steps=5).cli_arguments()
        print(args[args.index("--steps") + 1])
        print(sorted(m for m in sys.modules if m.split(".")[0] in {sorted(blocked)!r}))
        """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(2, 16, 4.0)", "5", "[]"]
