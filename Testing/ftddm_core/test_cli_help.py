"""Every flag of every `ftddm` subcommand has a help text that says more than its default."""
import argparse
import re

import pytest

from ftddm_core.cli import build_parser

COMMANDS = ("phantom", "train", "super-resolve", "bids", "demo", "evaluate")
ONLY_A_DEFAULT = re.compile(r"\s*(\(default: [^)]*\))?\s*")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options and positionals whose help is missing, empty or only "(default: …)"."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.help is None or action.help is argparse.SUPPRESS or ONLY_A_DEFAULT.fullmatch(action.help):
            out.append("/".join(action.option_strings) or action.dest)
    return out


@pytest.fixture(scope="module")
def parsers():
    return subcommands(build_parser())


def test_the_help_test_sees_a_missing_help():
    probe = argparse.ArgumentParser()
    probe.add_argument("--documented", help="what it does (default: 1)")
    probe.add_argument("--bare")
    probe.add_argument("--default-only", help="(default: 3)")
    assert undocumented(probe) == ["--bare", "--default-only"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_a_help_text(parsers, command):
    parser = parsers[command]
    assert undocumented(parser) == []
    parser.format_help()  # a help with a bare % would raise here, when a user asks for it


def test_the_commands_are_listed_with_one_line_each(parsers):
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    assert set(helps) == set(parsers) == {c if isinstance(c, str) else c.values[0] for c in COMMANDS}
    assert all(text and "\n" not in text for text in helps.values()), helps
    listing = parser.format_help()
    assert all(re.search(rf"^ +{re.escape(name)}\b", listing, re.M) for name in helps), listing


def test_the_sampler_help_explains_every_choice(parsers):
    from ftddm_core.options import SAMPLERS

    text = next(a.help for a in parsers["super-resolve"]._actions if "--sampler" in a.option_strings)
    assert all(f"{name}: " in text for name in SAMPLERS)
