"""Files that `sfr download` writes in a shared data folder: never through a link, one writer.

Every file sfr creates, appends to or truncates there (`.part`, its `.validator`, lock files,
extracted members) is opened with `O_NOFOLLOW` and checked to be a regular file, so a symbolic
link (or a FIFO, a device, a folder) placed at one of those names is refused instead of having
its target modified. Renames (`os.replace`) replace a link itself, never its target, and folders
above the file may be links (that is how a data folder lives on another disk).

`DestinationLock` is an exclusive advisory lock (`flock`, released by the kernel when the holder
dies, so a `kill -9` never leaves a stale lock) that one process holds while it downloads and
installs a destination; a second process is refused at once with the lock's path and holder.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from sfr.errors import SfrError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: msvcrt byte-range locks instead
    fcntl = None  # type: ignore[assignment]
    import msvcrt

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class UnsafePathError(SfrError):
    """A path sfr would write is a symbolic link or not a regular file."""


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "not a regular file"


def _refuse(path: Path, kind: str) -> UnsafePathError:
    """The error for a link or special file where sfr writes."""
    return UnsafePathError(
        f"{path} is {kind}; sfr download never writes through links or into anything but a "
        "regular file, so nothing was changed there.",
        hint=f"Remove {path} (or move it away) and run the command again.",
    )


def check_regular(path: Path) -> bool:
    """Whether `path` exists (without following a link); raises if it is not a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise _refuse(path, _kind(mode))
    return True


def open_regular(path: Path, mode: str) -> BinaryIO:
    """Open a regular file without following a link: "rb", "wb" (create/truncate), "ab"."""
    flags = {
        "rb": os.O_RDONLY,
        "wb": os.O_WRONLY | os.O_CREAT,
        "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    }[mode]
    try:
        handle = os.open(path, flags | _NOFOLLOW | _NONBLOCK | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        if os.path.islink(path):
            raise _refuse(path, "a symbolic link") from None
        if isinstance(error, IsADirectoryError):
            raise _refuse(path, "a folder") from None
        raise
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, _kind(info.st_mode))
        if mode == "wb":
            os.ftruncate(handle, 0)
        return os.fdopen(handle, mode)
    except BaseException:
        os.close(handle)
        raise


def write_regular(path: Path, data: bytes) -> None:
    """Replace the content of a small regular file (refusing links)."""
    with open_regular(path, "wb") as stream:
        stream.write(data)


class LockedError(SfrError):
    """Another process holds the lock of a destination."""


class DestinationLock:
    """An exclusive lock on `path` (a lock file) for the `what` it protects; a context manager.

    `wait=False` refuses at once when another process holds it (LockedError naming the lock
    file and the holder's pid and host); `wait=True` blocks until it is free (for short critical
    sections such as rewriting a manifest).
    """

    def __init__(self, path: Path, what: str, *, wait: bool = False) -> None:
        """Remember what to lock; nothing happens before `__enter__`."""
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self._handle: int | None = None

    def __enter__(self) -> DestinationLock:
        """Take the lock (creating the lock file), or raise LockedError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_regular(self.path)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
        try:
            if not _lock(handle, wait=self.wait):
                holder = os.pread(handle, 200, 0).decode("utf-8", "replace").strip()
                raise LockedError(
                    f"{self.what} is being downloaded by another sfr process"
                    f"{f' ({holder})' if holder else ''}: it holds the lock {self.path}.",
                    hint="Wait for that download to finish, then run the command again (it "
                    "will find the file installed). A lock is released as soon as its process "
                    "ends, even when killed.",
                )
            os.ftruncate(handle, 0)
            os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(handle)
            raise
        self._handle = handle
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        """Release the lock (the lock file stays; it is reused)."""
        if self._handle is not None:
            os.close(self._handle)  # closing the descriptor releases the lock
            self._handle = None


def _lock(handle: int, *, wait: bool) -> bool:
    """Take an exclusive lock on an open file; False if another holder has it and not `wait`."""
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    try:  # pragma: no cover - Windows
        msvcrt.locking(handle, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
    except OSError:  # pragma: no cover
        return False
    return True  # pragma: no cover
