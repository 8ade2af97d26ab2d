"""The download manifest: what `sfr download` installed in a folder, for offline verification.

One JSON file per root folder (a dataset folder or the runs folder), `FOLDER/.sfr-manifest.json`:

    {"format": "sfr-download-manifest", "version": 1,
     "artefacts": {"ek55-features-rgb": {"name": ..., "url": ..., "path": "rgb/data.mdb",
                   "size": ..., "sha256": ..., "variant": "sparse",
                   "downloaded_at": "2025-01-01T12:00:00+00:00",
                   "files": {"rgb/data.mdb": {"size": ..., "sha256": ...}},
                   "converted": null}}}

`size`/`sha256` describe the downloaded file (the archive, for zips); `files` lists what is
installed (the file itself, or every extracted member), with paths relative to the folder;
`converted` is the checkpoint a published file was converted into; `digest_from` says whether
the sha256 was checked against the registry or only learnt at the first download (then it
detects later changes of the installed file, not a wrong download).

Installing is one recoverable step: the entry is first recorded under `"pending"`, then the
file is renamed into place, then the entry moves to `"artefacts"`. A run killed in between
leaves a pending entry, and the next run adopts the installed file when its size and sha256
match it. The file is rewritten atomically (temporary file, then rename) under an exclusive lock
(`.sfr-downloads/locks/manifest.lock`), so processes sharing a folder never lose each other's
entries; temporary files left by killed runs are removed by the next one.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sfr.errors import DataError
from sfr.files import atomic_write_text, check_folder_path, sha256_file
from sfr.hub.safefiles import DestinationLock, check_regular, open_regular

MANIFEST_NAME = ".sfr-manifest.json"
MANIFEST_FORMAT = "sfr-download-manifest"
STAGING_DIR = ".sfr-downloads"
DigestSource = Literal["registry", "first download"]


class InstalledFile(BaseModel):
    """Size and sha256 of one installed file."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ManifestEntry(BaseModel):
    """One installed artefact: where it came from, what it weighed, what it installed."""

    model_config = ConfigDict(extra="forbid")

    name: str
    url: str
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    variant: str | None = None
    downloaded_at: str
    files: dict[str, InstalledFile]
    converted: str | None = None
    digest_from: DigestSource = "first download"


class Manifest(BaseModel):
    """Every artefact installed in one folder, by name."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["sfr-download-manifest"] = MANIFEST_FORMAT
    version: Literal[1] = 1
    artefacts: dict[str, ManifestEntry] = Field(default_factory=dict)
    pending: dict[str, ManifestEntry] = Field(default_factory=dict)

    def owner_of(self, relative: str) -> ManifestEntry | None:
        """The entry that installed the file `relative` (a path relative to the folder)."""
        for entry in self.artefacts.values():
            if relative in entry.files:
                return entry
        return None


def manifest_path(folder: Path) -> Path:
    """Where a folder's manifest lives."""
    return folder / MANIFEST_NAME


def lock_path(folder: Path, name: str) -> Path:
    """The lock file `name` of a folder (under `.sfr-downloads/locks/`)."""
    return folder / STAGING_DIR / "locks" / f"{name}.lock"


def manifest_lock(folder: Path) -> DestinationLock:
    """The lock held while a folder's manifest is read, changed and rewritten (waits)."""
    return DestinationLock(lock_path(folder, "manifest"), f"The manifest of {folder}", wait=True)


def load_manifest(folder: Path) -> Manifest:
    """A folder's manifest; an empty one if it has none (or the folder does not exist yet).

    DataError when `folder` is a file or lies under one (no folder can be installed into).
    """
    check_folder_path(folder, "download")
    path = manifest_path(folder)
    if not check_regular(path):
        return Manifest()
    try:
        with open_regular(path, "rb") as stream:
            text = stream.read().decode("utf-8")
        return Manifest.model_validate_json(text)
    except (ValidationError, ValueError) as error:
        first = str(error).splitlines()[0]
        raise DataError(
            f"The download manifest {path} is damaged ({first}).",
            hint="Delete it: installed files are then no longer known to `sfr download`, which "
            "refuses to overwrite them without --force, and `sfr download verify` skips them.",
        ) from None
    except OSError as error:
        raise DataError(
            f"The download manifest {path} cannot be read: {error.strerror or error}.",
            hint="Check its permissions.",
        ) from None


def save_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write a folder's manifest atomically (temporary file, then rename)."""
    path = manifest_path(folder)
    payload = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    atomic_write_text(path, payload)
    return path


def _update(folder: Path, change: Callable[[Manifest], None]) -> None:
    """Read, change and rewrite a folder's manifest under its lock."""
    try:
        with manifest_lock(folder):
            manifest = load_manifest(folder)
            change(manifest)
            save_manifest(folder, manifest)
    except OSError as error:
        raise DataError(
            f"Writing the download manifest {manifest_path(folder)} failed: "
            f"{error.strerror or error}.",
            hint="Check the folder is writable and the disk has room, then run the command "
            "again: an installed file whose entry is missing is adopted when it matches.",
        ) from None


def record(folder: Path, entry: ManifestEntry, *, replaces: tuple[str, ...] = ()) -> None:
    """Add (or replace) an entry in a folder's manifest, ending its pending state; drop the
    entries named in `replaces`."""

    def change(manifest: Manifest) -> None:
        for name in replaces:
            manifest.artefacts.pop(name, None)
        manifest.pending.pop(entry.name, None)
        manifest.artefacts[entry.name] = entry

    _update(folder, change)


def record_pending(folder: Path, entry: ManifestEntry) -> None:
    """Record that `entry`'s files are about to be put in place (before the rename)."""

    def change(manifest: Manifest) -> None:
        manifest.pending[entry.name] = entry

    _update(folder, change)


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove the manifest's temporary files left by killed runs (under the lock); the removed.

    Best effort: a folder without leftovers is not locked, one that cannot be written is left.
    """
    pattern = f".{MANIFEST_NAME}.*.tmp"
    if not folder.is_dir() or not any(folder.glob(pattern)):
        return []
    removed = []
    try:
        with manifest_lock(folder):
            for path in folder.glob(pattern):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    path.unlink(missing_ok=True)
                    removed.append(path)
    except OSError:
        return removed
    return removed


def _regular_size(path: Path) -> int | None:
    """The size of a regular file (links not followed); None if absent or not regular."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def is_intact(folder: Path, entry: ManifestEntry) -> bool:
    """Whether every file of an entry is present, a regular file, with its recorded size (a
    cheap check)."""
    return all(
        _regular_size(folder / relative) == installed.size
        for relative, installed in entry.files.items()
    )


def matches(folder: Path, entry: ManifestEntry) -> bool:
    """Whether every file of an entry has its recorded size and sha256 (reads them all)."""
    return is_intact(folder, entry) and all(
        sha256_file(folder / relative) == installed.sha256
        for relative, installed in entry.files.items()
    )


Status = Literal[
    "ok", "missing", "not a regular file", "size mismatch", "sha256 mismatch", "interrupted"
]


@dataclass(frozen=True)
class FileCheck:
    """The outcome of verifying one installed file against the manifest; `digest_from` says
    what a match proves (a registry digest: the published file; a digest learnt at the first
    download: only that the file did not change since)."""

    folder: Path
    artefact: str
    path: Path
    status: Status
    digest_from: DigestSource | None = None

    @property
    def ok(self) -> bool:
        """Whether the file matches its manifest entry."""
        return self.status == "ok"


def verify_folder(folder: Path, on_bytes: Callable[[int], None] | None = None) -> list[FileCheck]:
    """Recompute the sha256 of every file the folder's manifest lists and compare (offline).

    A converted checkpoint is checked for presence only (its digest is in its own metadata).
    An entry still pending (a run was killed while installing it) is reported as interrupted.
    """
    checks: list[FileCheck] = []
    manifest = load_manifest(folder)
    for entry in manifest.artefacts.values():
        for relative, installed in entry.files.items():
            path = folder / relative
            size = _regular_size(path)
            status: Status
            if size is None and not os.path.lexists(path):
                status = "missing"
            elif size is None:
                status = "not a regular file"
            elif size != installed.size:
                status = "size mismatch"
            elif sha256_file(path, on_bytes) != installed.sha256:
                status = "sha256 mismatch"
            else:
                status = "ok"
            checks.append(FileCheck(folder, entry.name, path, status, entry.digest_from))
        if entry.converted is not None:
            converted = folder / entry.converted
            status = "ok" if converted.is_file() else "missing"
            checks.append(FileCheck(folder, entry.name, converted, status))
    for entry in manifest.pending.values():
        checks.append(FileCheck(folder, entry.name, folder / entry.path, "interrupted"))
    return checks


def total_bytes(folder: Path) -> int:
    """Bytes `verify_folder` reads: the sizes of the present files the manifest lists."""
    total = 0
    for entry in load_manifest(folder).artefacts.values():
        for relative, installed in entry.files.items():
            if _regular_size(folder / relative) is not None:
                total += installed.size
    return total
