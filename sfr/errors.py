"""User-facing errors: each carries a message that names the culprit and a hint saying what to do.

The CLI turns any `SfrError` into a one-paragraph message and exit code 2; core code raises
them instead of printing.
"""

from __future__ import annotations


class SfrError(Exception):
    """A problem the user can fix (bad input, missing file, wrong config)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\nHint: {self.hint}"

    @classmethod
    def from_text(cls, text: str) -> SfrError:
        """Rebuild an error from its `str()` (message, then an optional `Hint:` line)."""
        message, _, hint = text.partition("\nHint: ")
        return cls(message, hint or None)


class ConfigError(SfrError):
    """An invalid configuration value, file or override."""


class DataError(SfrError):
    """Missing or malformed data: annotation CSVs, feature stores, feature vectors."""


class RunError(SfrError):
    """A run directory in a state that forbids the requested work (finished, missing, foreign)."""


class TrainingError(SfrError):
    """Training cannot go on (for example the loss became NaN)."""


class DistributedError(SfrError):
    """A run lost one of its processes (another torchrun rank, a DataLoader worker) or could
    not start (torchrun, DDP)."""


def install_extra(extra: str) -> str:
    """The command that installs an optional dependency group, in the README's form.

    sfr is installed from its source folder (`pip install -e .`), so the bare `sfr[extra]`
    form only works where sfr is on a package index; this one works from the project folder.
    """
    return f'pip install -e ".[{extra}]" (run in the sfr project folder, in its venv)'


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and `noun` in the number it takes: `1 epoch`, `2 epochs`, `0 epochs` (`plural`
    where adding `s` is not the plural: `counted(2, "process", "processes")`). Thousands are
    grouped (`1,024 frames`)."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"
