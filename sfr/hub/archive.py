"""Safe extraction of downloaded zip archives.

The whole extraction is planned before anything is written, and any of these refuses the whole
archive: absolute paths, drive letters, `..` components, symbolic links, two members with the
same path, two paths that differ only in case or Unicode normalisation (one would overwrite the
other on macOS and Windows), a member that is a file where another needs a folder, more
uncompressed bytes than the disk has free, and an uncompressed size above `MAX_RATIO` times the
compressed one (a zip bomb; the published archives compress far less). Members are extracted
into a staging folder next to the destination, each no longer than its header says and never
through a link, and only then renamed into place, so an interrupted or refused extraction
leaves the destination as it was; disk errors become messages. When every member lies under one
top-level folder, that folder is stripped (`egtea/rgb/data.mdb` lands at `DEST/rgb/data.mdb`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sfr.errors import DataError
from sfr.hub.manifest import MANIFEST_NAME, STAGING_DIR
from sfr.hub.safefiles import check_regular, open_regular

_CHUNK_BYTES = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_RATIO = 100
"""Largest accepted uncompressed/compressed size ratio of a whole archive."""


@dataclass(frozen=True)
class ExtractedFile:
    """One file written by an extraction: its path relative to the destination, size, sha256."""

    relative: PurePosixPath
    size: int
    sha256: str


def member_parts(archive: Path, name: str, mode: int) -> tuple[str, ...]:
    """The path components of a member, or an error if extracting it could escape the folder."""
    unsafe = None
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        unsafe = "an absolute path"
    elif stat.S_ISLNK(mode):
        unsafe = "a symbolic link"
    parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    if unsafe is None and ".." in parts:
        unsafe = "a '..' component"
    if unsafe is not None:
        raise DataError(
            f"Refusing to extract {archive}: member {name!r} is {unsafe}, which could write "
            "outside the destination folder. Nothing was extracted.",
            hint="The archive is corrupt or not the published one; delete it and download again.",
        )
    return parts


def _refuse(archive: Path, why: str) -> DataError:
    """The error for an archive that cannot be extracted safely."""
    return DataError(
        f"Refusing to extract {archive}: {why}. Nothing was extracted.",
        hint="The archive is corrupt or not the published one; delete it and download again.",
    )


def _plan(
    archive: Path, members: list[zipfile.ZipInfo]
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """File members with their target components, a shared top-level folder stripped; refuses
    duplicates and clashing paths."""
    files = []
    folders: set[tuple[str, ...]] = set()
    for info in members:
        parts = member_parts(archive, info.filename, info.external_attr >> 16)
        if info.is_dir():
            folders.add(parts)
        elif parts:
            files.append((info, parts))
    if not files:
        raise DataError(f"{archive} holds no files.")
    seen: dict[tuple[str, ...], str] = {}
    for info, parts in files:
        key = tuple(unicodedata.normalize("NFC", p).casefold() for p in parts)
        if key in seen:
            same = seen[key] == info.filename
            raise _refuse(
                archive,
                f"member {info.filename!r} appears twice"
                if same
                else f"members {seen[key]!r} and {info.filename!r} name the same file on "
                "case-insensitive disks",
            )
        seen[key] = info.filename
    for info, parts in files:
        for depth in range(1, len(parts)):
            key = tuple(unicodedata.normalize("NFC", p).casefold() for p in parts[:depth])
            if key in seen:
                raise _refuse(
                    archive,
                    f"member {seen[key]!r} is a file where {info.filename!r} needs a folder",
                )
    for folder in folders:
        key = tuple(unicodedata.normalize("NFC", p).casefold() for p in folder)
        if key in seen:
            raise _refuse(archive, f"{seen[key]!r} is both a file and a folder")
    tops = {parts[0] for _, parts in files}
    if len(tops) == 1 and all(len(parts) > 1 for _, parts in files):
        files = [(info, parts[1:]) for info, parts in files]
    for info, parts in files:
        first = unicodedata.normalize("NFC", parts[0]).casefold()
        if first == STAGING_DIR.casefold() or MANIFEST_NAME.casefold() in first:
            raise _refuse(
                archive,
                f"member {info.filename!r} would land on sfr's own bookkeeping "
                f"({MANIFEST_NAME} or {STAGING_DIR}/), which no published archive holds",
            )
    return files


def _check_sizes(
    archive: Path, files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]], staging: Path
) -> None:
    """Refuse an archive that would fill the disk or expands implausibly (a zip bomb)."""
    unpacked = sum(info.file_size for info, _ in files)
    packed = sum(info.compress_size for info, _ in files)
    if unpacked > MAX_RATIO * max(packed, 1) and unpacked > 1 << 20:
        raise _refuse(
            archive,
            f"its members expand to {unpacked:,} bytes from {packed:,} (more than "
            f"{MAX_RATIO} times), which no published archive does",
        )
    free = shutil.disk_usage(_existing_parent(staging)).free
    if unpacked > free:
        raise DataError(
            f"Not enough disk space to extract {archive}: {unpacked:,} bytes needed in "
            f"{staging.parent}, {free:,} free. Nothing was extracted.",
            hint="Free some space (or pass another folder with --data), then run the command "
            "again; the downloaded archive is kept and not fetched again.",
        )


def _existing_parent(path: Path) -> Path:
    """The nearest folder of `path` that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _same_file(path: Path, extracted: ExtractedFile) -> bool:
    """Whether `path` already holds exactly the extracted bytes (a link never does)."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size != extracted.size:
        return False
    digest = hashlib.sha256()
    with open_regular(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest() == extracted.sha256


def extract_zip(
    archive: Path,
    dest: Path,
    staging: Path,
    *,
    overwrite: bool = False,
    before_move: Callable[[list[ExtractedFile]], None] = lambda extracted: None,
) -> list[ExtractedFile]:
    """Extract `archive` into `dest` through the empty folder `staging` (same file system).

    A member whose target already exists with other content is an error unless `overwrite`;
    identical files are left alone; a target that is a link or a folder is always an error.
    `before_move` is called with every extracted file (sizes, digests) before the first is moved
    into place. Raises DataError (refused archive, disk error); nothing half-written stays.
    """
    try:
        return _extract(archive, dest, staging, overwrite, before_move)
    except OSError as error:
        raise DataError(
            f"Extracting {archive} into {dest} failed: {error.strerror or error}"
            f"{f' ({error.filename})' if error.filename else ''}.",
            hint="Check the folder is writable and the disk has room, then run the command "
            "again; the downloaded archive is kept and not fetched again.",
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(
    archive: Path,
    dest: Path,
    staging: Path,
    overwrite: bool,
    before_move: Callable[[list[ExtractedFile]], None],
) -> list[ExtractedFile]:
    """`extract_zip` without the translation of disk errors."""
    if staging.is_symlink():
        raise DataError(
            f"The staging folder {staging} is a symbolic link; sfr does not extract through it.",
            hint=f"Remove {staging} and run the command again.",
        )
    try:
        with zipfile.ZipFile(archive) as bundle:
            files = _plan(archive, bundle.infolist())
            shutil.rmtree(staging, ignore_errors=True)
            _check_sizes(archive, files, staging)
            extracted = [_extract_member(bundle, info, parts, staging) for info, parts in files]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise DataError(
            f"{archive} is not a readable zip archive: {error}.",
            hint="Delete it and download again.",
        ) from None
    targets = [(item, dest.joinpath(*item.relative.parts)) for item in extracted]
    for _, target in targets:
        if target.is_symlink() or target.is_dir():
            kind = "a symbolic link" if target.is_symlink() else "a folder"
            raise DataError(
                f"Cannot extract {archive}: {target} is {kind}; nothing was extracted.",
                hint="Move it away and run the command again.",
            )
    clashes = [
        str(target) for item, target in targets if target.exists() and not _same_file(target, item)
    ]
    if clashes and not overwrite:
        shown = ", ".join(clashes[:5]) + (
            f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        )
        raise DataError(
            f"Extracting {archive} would replace files that differ from it: {shown}.",
            hint="Move them away, or pass --force to replace them.",
        )
    before_move(extracted)
    for item, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging.joinpath(*item.relative.parts), target)
    return extracted


def _extract_member(
    bundle: zipfile.ZipFile, info: zipfile.ZipInfo, parts: tuple[str, ...], staging: Path
) -> ExtractedFile:
    """Write one member under `staging` (never through a link, never more than its header
    says), hashing it on the way."""
    target = staging.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    if check_regular(target):
        raise DataError(f"Refusing to extract {bundle.filename}: {info.filename!r} appears twice.")
    digest = hashlib.sha256()
    size = 0
    with bundle.open(info) as source, open_regular(target, "wb") as sink:
        while chunk := source.read(_CHUNK_BYTES):
            size += len(chunk)
            if size > info.file_size:
                raise DataError(
                    f"Refusing to extract {bundle.filename}: member {info.filename!r} is longer "
                    "than its header says.",
                    hint="The archive is corrupt; delete it and download again.",
                )
            sink.write(chunk)
            digest.update(chunk)
    return ExtractedFile(PurePosixPath(*parts), size, digest.hexdigest())
