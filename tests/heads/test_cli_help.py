"""Every option of every ``heads`` command says what it does, and progress is silenced one way."""
from __future__ import annotations

import argparse

import pytest

from heads.cli import _parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subcommands(_parser())))
def test_every_option_has_help(command):
    sub = _subcommands(_parser())[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and action.help.strip(), f"heads {command}: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command", ["train", "predict", "classify"])
def test_quiet_json_and_the_hidden_no_progress_alias(command):
    sub = _subcommands(_parser())[command]
    flags = {s: a for a in sub._actions for s in a.option_strings}
    assert flags["-q"] is flags["--quiet"] and flags["--no-progress"].dest == "quiet" and "--json" in flags
    assert flags["--no-progress"].help == argparse.SUPPRESS
