"""Command-line flags generated from dataclass fields: one --flag per field, its help in the field's metadata.

Metadata keys read here: ``help`` (the text), and for a field whose flag is text parsed into another value
(e.g. comma-separated lists) ``text`` (the flag's default as typed) and ``parse`` (text → value).
Standard library only: the Slicer module and `ftddm --help` import it without torch.
"""
from __future__ import annotations

import argparse
import dataclasses

_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float, "str": str, "str | None": str}


def cli_flag(name: str) -> str:
    """The command-line flag of a dataclass field: tau_d → --tau-d."""
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One --flag per field of `cls` (but `skip`), typed from its annotation or default, with its help."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, default = f.metadata, field_default(f)
        text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
        if isinstance(default, bool):
            parser.add_argument(cli_flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                help=f"{text} (default: {'on' if default else 'off'})".lstrip())
            continue
        if meta.get("parse"):
            kind, default = str, meta["text"]
        else:
            kind = _TYPES.get(f.type) if isinstance(f.type, str) else f.type
            kind = kind or type(default)
        shown = "" if "default:" in text else f" (default: {default})"  # some texts say what None means
        parser.add_argument(cli_flag(f.name), type=kind, default=default, help=f"{text}{shown}".lstrip())


def dataclass_from_args(cls, args: argparse.Namespace, skip=()):
    """`cls` from the parsed flags (text flags parsed here, so a bad value is one clear error)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = getattr(args, f.name)
        values[f.name] = f.metadata["parse"](value) if f.metadata.get("parse") else value
    return cls(**values)
