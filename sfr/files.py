"""Writing files so that a kill at any moment leaves the old file or the new one, never a torn one.

Torch-free, so that light modules (reports, downloads) can use it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sfr.errors import DataError, RunError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, then rename it over `path`.

    Raises RunError when `path` is a folder or the write fails (a full disk, no permission);
    the temp file is removed whatever happens.
    """
    path = Path(path)
    if path.is_dir():
        raise RunError(
            f"{path} is a folder, where a file is to be written.",
            "Give a file name (or a path that does not exist yet).",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, error) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, error: OSError) -> RunError:
    return RunError(
        f"{path} could not be written: {error.strerror or error}.",
        "Free some disk space or choose a folder you can write to, then run the command again.",
    )


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files `atomic_write` leaves when killed mid-write (`.NAME.*.tmp`).

    Only call it on folders sfr owns (a run folder) when no other process writes there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def json_text(value: object, what: str, **options: object) -> str:
    """`value` as strict JSON (no bare NaN or Infinity tokens); DataError naming `what` if not."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:
        raise DataError(
            f"{what} holds NaN or infinite numbers, which JSON cannot represent: nothing written.",
            "The model produced non-finite outputs: check its inputs and its training run.",
        ) from None


def finite_or_none(record: dict) -> dict:
    """A flat record with every non-finite float replaced by None (JSON null)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _umask() -> int:
    """The process umask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_folder_path(folder: Path, what: str) -> Path:
    """Refuse a `folder` that is a file or lies under one, without creating anything."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == folder else f"lies under the file {path}"
                raise RunError(
                    f"The {what} folder {folder} {where}.",
                    "Choose a folder (or a new path) instead.",
                )
            break
    return folder


def check_output_file(path: Path, what: str) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be written, up front."""
    path = Path(path)
    if path.is_dir():
        raise RunError(
            f"The {what} {path} is a folder.",
            f"Give a file name, e.g. {path / ('out' + (path.suffix or '.json'))}.",
        )
    check_writable_dir(path.parent, f"{what}'s")
    return path


def missing_reason(path: Path, want: str = "file") -> str:
    """Why `path` is not the file (or folder, `want="folder"`) expected: for a message.

    A path under a file (`--data` naming a file, so `DATA/actions.csv` cannot exist) says so.
    """
    path = Path(path)
    if want == "file" and path.is_dir():
        return "is a folder, not a file"
    if want == "folder" and path.exists():
        return "is a file, not a folder"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"does not exist ({parent} is a file, not a folder)"
            break
    return "does not exist"


def refuse_existing(path: Path, what: str, force: bool) -> None:
    """The one overwrite rule of sfr: an existing output is replaced only with `--force`.

    Raises RunError naming `path` when it exists and `force` is False.
    """
    if Path(path).exists() and not force:
        raise RunError(
            f"The {what} {path} already exists.",
            "Pass --force to replace it, or choose another path.",
        )


def check_writable_dir(folder: Path, what: str) -> Path:
    """Create `folder` if needed and prove a file can be written there, before long work."""
    folder = check_folder_path(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".sfr-write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise RunError(
            f"The {what} folder {folder} cannot be written: {error.strerror or error}.",
            "Choose a folder you can write to.",
        ) from None
    return folder


CHUNK_BYTES = 1 << 20


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in chunks (`on_bytes` is told each chunk's size)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()
