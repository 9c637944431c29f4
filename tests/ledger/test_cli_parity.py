"""The CLI does what the console does (issue 18 §9): every ledger operation the console calls has a
`yolo-tokens` command that calls it. Read from the code: a new console form without a command fails."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from ledger import cli
from ledger.core.api import LedgerApi

ROOT = Path(__file__).resolve().parents[2]
CALL = re.compile(r"\.([a-z_]+)\(")
# calls that are not operations a user runs
PLUMBING = {"public_keys": "the console verifies its sign-in credential with them"}


def operations() -> set[str]:
    transport = {"call", "acall"}  # what every operation goes through, not an operation
    return {n for n, _ in inspect.getmembers(LedgerApi, inspect.isfunction) if not n.startswith("_")} - transport


def console_operations() -> set[str]:
    source = "\n".join(p.read_text() for p in sorted((ROOT / "ui").glob("*.py")))
    return (set(CALL.findall(source)) & operations()) - set(PLUMBING)


def cli_operations() -> dict[str, set[str]]:
    """command -> the ledger operations its handler calls."""
    out: dict[str, set[str]] = {}
    parser = cli.build_parser()
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for group in action.choices.values():
            defaults = [group] + [
                sub
                for a in group._actions
                if hasattr(a, "choices") and isinstance(a.choices, dict)
                for sub in a.choices.values()
            ]
            for p in defaults:
                handler, command = p.get_default("handler"), p.get_default("command")
                if handler is not None:
                    out[command] = set(CALL.findall(inspect.getsource(handler))) & operations()
    return out


def test_given_the_console_and_the_cli_then_every_console_operation_has_a_command() -> None:
    console = console_operations()
    commands = cli_operations()
    by_cli = set().union(*commands.values())
    assert {"update_limits", "revoke", "reclaim", "top_up", "split", "create_package"} <= console, console
    assert console - by_cli == set(), f"the console can {sorted(console - by_cli)}, the CLI cannot"
    assert commands["token limits"] == {"update_limits"}
