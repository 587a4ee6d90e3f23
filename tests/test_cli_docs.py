"""docs/architecture.md's stage table against the CLI: every command it shows exists with the
flags it shows, and every subcommand and required flag of the CLI is shown."""

import argparse
import re
from pathlib import Path

import pytest

from regioncl.cli import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def documented_commands() -> dict[tuple[str, ...], list[str]]:
    """(subcommand words) -> flags, from the CLI column of the stage table."""
    text = DOC.read_text()
    table = text.split("## Stage contracts", 1)[1].split("\n\n", 2)[1]
    commands = {}
    for line in table.splitlines()[2:]:
        cells = re.split(r"(?<!\\)\|", line)
        words = re.fullmatch(r"\s*`(.*)`\s*", cells[2]).group(1).replace("\\|", "|").split()
        assert words[0] == "regioncl", line
        first_flag = next((i for i, word in enumerate(words) if word.startswith("-")), len(words))
        commands[tuple(words[1:first_flag])] = [word for word in words if word.startswith("--")]
    return commands


def subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf subcommand of ``parser`` by its words."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return {prefix: parser}
    found = {}
    for name, sub in actions[0].choices.items():
        found |= subparsers(sub, (*prefix, name))
    return found


def flags(parser: argparse.ArgumentParser, required_only: bool = False) -> set[str]:
    return {
        option
        for action in parser._actions
        if not required_only or action.required
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


COMMANDS = documented_commands()
PARSERS = subparsers(build_parser())


def test_the_table_is_read():
    assert ("pretrain",) in COMMANDS and ("proposals", "run") in COMMANDS
    assert "--settings" in COMMANDS[("pretrain",)]


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=" ".join)
def test_every_documented_command_exists_with_the_flags_it_shows(command):
    assert command in PARSERS, f"docs/architecture.md shows `regioncl {' '.join(command)}`, which the CLI lacks"
    unknown = sorted(set(COMMANDS[command]) - flags(PARSERS[command]))
    assert not unknown, f"`regioncl {' '.join(command)}` has no {unknown}; it has {sorted(flags(PARSERS[command]))}"


@pytest.mark.parametrize("command", sorted(PARSERS), ids=" ".join)
def test_every_cli_command_is_documented_with_its_required_flags(command):
    assert command in COMMANDS, f"`regioncl {' '.join(command)}` is missing from docs/architecture.md's stage table"
    missing = sorted(flags(PARSERS[command], required_only=True) - set(COMMANDS[command]))
    assert not missing, f"docs/architecture.md shows `regioncl {' '.join(command)}` without its required {missing}"
