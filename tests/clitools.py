"""Assertions shared by the CLI tests."""

from __future__ import annotations

from sfr.cli.common import USER_ERROR_EXIT


def assert_user_error(code: int, output: str, error: BaseException | None, *needles: str) -> None:
    """Exit code 2, an `Error:` line, no traceback, and every needle in the message."""
    assert code == USER_ERROR_EXIT, output
    assert isinstance(error, SystemExit), repr(error)
    assert "Traceback" not in output
    assert "Error:" in output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
