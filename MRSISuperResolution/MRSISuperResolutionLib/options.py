"""The module's super-resolution options and the `ftddm super-resolve` command line built from them.

The options are ftddm_core.options.SuperResolveOptions, the engine's one definition (torch-free, shipped in the
extension): GUI, console scripting and the CLI share its names and its validation. The parameter node gets
one parameter per field from :func:`node_parameters`, so adding a field to the dataclass adds it to the node.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ftddm_core.options import TRAINED_SCALES, SuperResolveOptions  # noqa: F401 (TRAINED_SCALES: for the GUI)


@dataclass(frozen=True)
class NodeParameter:
    """The parameter-node parameter(s) of one SuperResolveOptions field.

    A field with an "automatic" value (factor 0, scale 0, slice_axis −1) becomes two parameters: a bool
    `auto<Name>` (True = automatic) and the value itself, limited to the range a spin box can show.
    """

    field: str  # SuperResolveOptions field, e.g. tau_d
    name: str  # node parameter, e.g. tauD
    type: type  # bool, int, float or str
    default: object
    choices: tuple | None = None  # → Choice
    bounds: tuple | None = None  # → WithinRange (the trained range where the field has one)
    automatic_name: str | None = None  # e.g. autoScale
    automatic: object = None  # the field's "automatic" value


def camel_case(name: str) -> str:
    """tau_d → tauD, data_consistency → dataConsistency (the module's parameter-node names)."""
    first, *rest = name.split("_")
    return first + "".join(word[:1].upper() + word[1:] for word in rest)


def node_parameters(options_class=SuperResolveOptions) -> list[NodeParameter]:
    """One NodeParameter per field of the options dataclass, from its type, default and metadata."""
    out = []
    for f in dataclasses.fields(options_class):
        meta, kind = f.metadata, type(f.default)
        name = camel_case(f.name)
        bounds = meta.get("trained") or meta.get("bounds")
        automatic = meta.get("automatic")
        if automatic is None:
            out.append(NodeParameter(f.name, name, kind, f.default, meta.get("choices"), bounds))
        else:  # the value shown while automatic: the sentinel clipped into the spin box's range
            shown = kind(min(max(automatic, bounds[0]), bounds[1]))
            out.append(NodeParameter(f.name, name, kind, shown, None, bounds, "auto" + name[0].upper() + name[1:],
                                     automatic))
    return out


def options_from_node(node, options_class=SuperResolveOptions):
    """The options a parameter node holds (validated: ValueError names the option)."""
    values = {}
    for p in node_parameters(options_class):
        automatic = p.automatic_name is not None and getattr(node, p.automatic_name)
        values[p.field] = p.automatic if automatic else getattr(node, p.name)
    return options_class(**values)


def engine_bootstrap(engine_dir: str | Path) -> str:
    """`python -c` code that runs `python -m ftddm_core.cli` with ftddm_core imported from engine_dir.

    Passing the folder inside the command (not through PYTHONPATH) keeps it working behind Slicer's launcher,
    which rewrites the environment of PythonSlicer.
    """
    return ("import sys; sys.path.insert(0, %r); from ftddm_core.cli import main; "
            "sys.argv[0] = 'ftddm'; sys.exit(main())" % str(engine_dir))


def super_resolve_command(python: Sequence[str], engine_dir, lr_paths: Sequence, t1, flair, out_dir, *,
                          mask=None, model=None, parameters: SuperResolveOptions | None = None) -> list[str]:
    """argv running `ftddm super-resolve` with progress lines, for one or more LR maps (one file each)."""
    if not python or not all(isinstance(p, str) and p for p in python):
        raise ValueError(f"python must be a non-empty list of strings (the interpreter command), got {python!r}")
    if not lr_paths:
        raise ValueError("expected at least one LR metabolite map")
    if t1 is None or flair is None:
        raise ValueError("FTDDM is conditioned on the patient's T1 and FLAIR: both are required")
    params = (parameters or SuperResolveOptions()).validate()
    cmd = [*python, "-c", engine_bootstrap(engine_dir), "super-resolve"]
    for p in lr_paths:
        cmd += ["--lr", str(p)]
    cmd += ["--t1", str(t1), "--flair", str(flair), "--out", str(out_dir)]
    if mask is not None:
        cmd += ["--mask", str(mask)]
    if model is not None and str(model) not in ("", "."):
        cmd += ["--model", str(model)]
    return cmd + params.cli_arguments() + ["--overwrite", "--progress-lines"]
