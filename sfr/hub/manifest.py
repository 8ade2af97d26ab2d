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
`converted` is the checkpoint a published file was converted into. The file is rewritten
atomically after every installed artefact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sfr.errors import DataError
from sfr.files import atomic_write_text, sha256_file

MANIFEST_NAME = ".sfr-manifest.json"
MANIFEST_FORMAT = "sfr-download-manifest"


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


class Manifest(BaseModel):
    """Every artefact installed in one folder, by name."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["sfr-download-manifest"] = MANIFEST_FORMAT
    version: Literal[1] = 1
    artefacts: dict[str, ManifestEntry] = Field(default_factory=dict)

    def owner_of(self, relative: str) -> ManifestEntry | None:
        """The entry that installed the file `relative` (a path relative to the folder)."""
        for entry in self.artefacts.values():
            if relative in entry.files:
                return entry
        return None


def manifest_path(folder: Path) -> Path:
    """Where a folder's manifest lives."""
    return folder / MANIFEST_NAME


def load_manifest(folder: Path) -> Manifest:
    """A folder's manifest; an empty one if it has none."""
    path = manifest_path(folder)
    if not path.exists():
        return Manifest()
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, ValueError) as error:
        first = str(error).splitlines()[0]
        raise DataError(
            f"The download manifest {path} is damaged ({first}).",
            hint="Delete it: installed files are then no longer known to `sfr download`, which "
            "refuses to overwrite them without --force, and `sfr download verify` skips them.",
        ) from None


def save_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write a folder's manifest atomically (temporary file, then rename)."""
    path = manifest_path(folder)
    payload = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    atomic_write_text(path, payload)
    return path


def record(folder: Path, entry: ManifestEntry, *, replaces: tuple[str, ...] = ()) -> None:
    """Add (or replace) an entry in a folder's manifest; drop the entries named in `replaces`."""
    manifest = load_manifest(folder)
    for name in replaces:
        manifest.artefacts.pop(name, None)
    manifest.artefacts[entry.name] = entry
    save_manifest(folder, manifest)


def is_intact(folder: Path, entry: ManifestEntry) -> bool:
    """Whether every file of an entry is present with its recorded size (a cheap check)."""
    for relative, installed in entry.files.items():
        path = folder / relative
        if not path.is_file() or path.stat().st_size != installed.size:
            return False
    return True


Status = Literal["ok", "missing", "size mismatch", "sha256 mismatch"]


@dataclass(frozen=True)
class FileCheck:
    """The outcome of verifying one installed file against the manifest."""

    folder: Path
    artefact: str
    path: Path
    status: Status

    @property
    def ok(self) -> bool:
        """Whether the file matches its manifest entry."""
        return self.status == "ok"


def verify_folder(folder: Path, on_bytes: Callable[[int], None] | None = None) -> list[FileCheck]:
    """Recompute the sha256 of every file the folder's manifest lists and compare (offline).

    A converted checkpoint is checked for presence only (its digest is in its own metadata).
    """
    checks: list[FileCheck] = []
    for entry in load_manifest(folder).artefacts.values():
        for relative, installed in entry.files.items():
            path = folder / relative
            status: Status
            if not path.is_file():
                status = "missing"
            elif path.stat().st_size != installed.size:
                status = "size mismatch"
            elif sha256_file(path, on_bytes) != installed.sha256:
                status = "sha256 mismatch"
            else:
                status = "ok"
            checks.append(FileCheck(folder, entry.name, path, status))
        if entry.converted is not None:
            converted = folder / entry.converted
            status = "ok" if converted.is_file() else "missing"
            checks.append(FileCheck(folder, entry.name, converted, status))
    return checks


def total_bytes(folder: Path) -> int:
    """Bytes `verify_folder` reads: the sizes of the present files the manifest lists."""
    total = 0
    for entry in load_manifest(folder).artefacts.values():
        for relative, installed in entry.files.items():
            if (folder / relative).is_file():
                total += installed.size
    return total
