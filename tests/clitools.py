"""Assertions shared by the CLI tests."""

from __future__ import annotations

from typing import Any

from sfr.cli.common import USER_ERROR_EXIT


def assert_user_error(code: int, output: str, error: BaseException | None, *needles: str) -> None:
    """Exit code 2, an `Error:` line, no traceback, and every needle in the message."""
    assert code == USER_ERROR_EXIT, output
    assert isinstance(error, SystemExit), repr(error)
    assert "Traceback" not in output
    assert "Error:" in output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"


def registered_commands() -> list[tuple[list[str], Any]]:
    """Every command and group of `sfr` as Typer builds them, with its words (`["export",
    "model"]`): found by walking the command tree, so a new command is checked too."""
    import typer.main

    from sfr.cli.app import app

    def walk(command: Any, prefix: list[str]) -> list[tuple[list[str], Any]]:
        found = [(prefix, command)]
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, [*prefix, name])
        return found

    return walk(typer.main.get_command(app), [])
