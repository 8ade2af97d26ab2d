"""Writing files so that a kill at any moment leaves the old file or the new one, never a torn one.

Torch-free, so that light modules (reports, downloads) can use it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
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


# The temp-file names `atomic_write` gives: `.NAME.<random letters, digits, _>.tmp`.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temp_files(folder: Path, *targets: str) -> list[Path]:
    """Delete the temp files `atomic_write` leaves in `folder` when killed mid-write.

    Only regular files named as `atomic_write` names them (`.NAME.XXXXXXXX.tmp`) are deleted,
    and with `targets` only those of these file names; every other file stays. Call it when a
    command starts on its output (no other process writes that output then). Returns what it
    deleted.
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    stale = []
    for path in folder.glob(".*.tmp"):
        match = _TEMP_NAME.match(path.name)
        if match and (not targets or match["target"] in targets) and is_regular_file(path):
            path.unlink(missing_ok=True)
            stale.append(path)
    return stale


def is_regular_file(path: Path) -> bool:
    """Whether `path` is a regular file itself (not a link, folder or device)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


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


def check_output_file(path: Path, what: str, suffix: str) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be written, up front.

    `suffix` is the kind of file written (`.json`, `.safetensors`), for the example name.
    """
    path = Path(path)
    if path.is_dir():
        raise RunError(
            f"The {what} {path} is a folder.",
            f"Give a file name, e.g. {path / ('out' + suffix)}.",
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


FORCE_HINT = "Pass --force to replace it (sfr deletes only what it wrote), or choose another path."


def existing_output(
    path: Path, what: str, holds: str | None = None, hint: str = FORCE_HINT
) -> RunError:
    """The error of sfr's one overwrite rule: `The <what> <path> already exists` (or `already
    holds <holds>`), with the hint to pass --force (see `refuse_existing`)."""
    state = "exists" if holds is None else f"holds {holds}"
    return RunError(f"The {what} {path} already {state}.", hint)


def refuse_existing(path: Path, what: str, force: bool) -> None:
    """The one overwrite rule of sfr for an output file: an existing one is replaced only with
    `--force` (the user named that file). Stale temp files of earlier writes of it that were
    killed midway are deleted first.

    Raises RunError naming `path` when it exists and `force` is False.
    """
    path = Path(path)
    remove_stale_temp_files(path.parent, path.name)
    if (path.exists() or path.is_symlink()) and not force:
        raise existing_output(path, what)


def foreign_files(folder: Path, owned: Callable[[Path], bool]) -> list[Path]:
    """Files (and links) under `folder` that sfr did not write: those whose path relative to
    `folder` `owned` does not claim, other than sfr's temp files, and empty folders (sfr writes
    none, so a user made them). Folders are walked, links are not followed."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return [folder] if folder.exists() or folder.is_symlink() else []
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                found.append(path)
            continue
        ours = owned(path.relative_to(folder)) or _TEMP_NAME.match(path.name)
        if not (is_regular_file(path) and ours):
            found.append(path)
    return found


def refuse_foreign(folder: Path, what: str, foreign: list[Path]) -> None:
    """RunError naming the files sfr did not write in the output `folder`, if any: `--force`
    never deletes them."""
    if not foreign:
        return
    shown = ", ".join(str(path) for path in foreign[:3])
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    raise RunError(
        f"The {what} {folder} holds files or folders sfr did not write ({shown}{more}): --force deletes "
        "only what sfr wrote.",
        "Move them elsewhere, or choose another path.",
    )


def remove_owned(folder: Path, owned: Callable[[Path], bool]) -> None:
    """Delete the files under `folder` that `owned` claims (by relative path) and sfr's stale temp
    files, then the folders this empties (`folder` too); every other file and folder stays."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return
    emptied: set[Path] = set()
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            if remove_stale_temp_files(path):
                emptied.add(path)
            if path in emptied and not any(path.iterdir()):
                path.rmdir()
                emptied.add(path.parent)
        elif is_regular_file(path) and owned(path.relative_to(folder)):
            path.unlink()
            emptied.add(path.parent)
    if (remove_stale_temp_files(folder) or folder in emptied) and not any(folder.iterdir()):
        folder.rmdir()


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
