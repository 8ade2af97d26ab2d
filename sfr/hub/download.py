"""Resumable, verified HTTP downloads of one file, for slow and flaky connections.

Bytes stream into `<dest>.part`. An existing `.part` is resumed with an HTTP Range request (kept
when the server answers 206 with the matching Content-Range, started over when it answers 200),
made conditional with If-Range on the ETag/Last-Modified of the first answer, so bytes of a file
that changed on the server in between are never glued together.
Connection errors, timeouts, truncated bodies, 408/429 and 5xx answers are retried with
exponential backoff; other 4xx answers are errors at once. The size and sha256 are checked before
the `.part` is renamed into place, so the destination only ever holds a complete, verified file;
bytes that fail the check are moved to `<dest>.part.bad` so that the next run starts clean.
Progress is reported through a callback of the event dataclasses below; nothing is printed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from sfr.errors import SfrError
from sfr.files import CHUNK_BYTES

DEFAULT_RETRIES = 5
DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})
_CONTENT_RANGE = re.compile(r"^bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)$")
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")


class DownloadError(SfrError):
    """A download that cannot complete: unreachable, refused by the server, or failing a check."""


class UnreachableError(DownloadError):
    """This address cannot deliver the file (missing, refused, or failing every retry)."""


@dataclass(frozen=True)
class FileStarted:
    """An attempt began receiving a file; `resumed_from` bytes were already on disk."""

    label: str
    url: str
    total: int | None
    resumed_from: int


@dataclass(frozen=True)
class BytesReceived:
    """`count` more bytes of a file were written."""

    label: str
    count: int


@dataclass(frozen=True)
class RetryScheduled:
    """An attempt failed for a transient `reason`; the next one starts after `delay_s`."""

    label: str
    attempt: int
    retries: int
    reason: str
    delay_s: float


@dataclass(frozen=True)
class FileFinished:
    """A file was received, verified and renamed into place."""

    label: str
    path: Path
    size: int
    sha256: str


DownloadEvent = FileStarted | BytesReceived | RetryScheduled | FileFinished


@dataclass(frozen=True)
class FetchedFile:
    """A verified download: where it is, its size and digest, the address it came from."""

    path: Path
    size: int
    sha256: str
    url: str


@dataclass(frozen=True)
class Expected:
    """What a download must match; `sha256_source` says where the digest comes from."""

    size: int | None = None
    sha256: str | None = None
    sha256_source: str = "the registry"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: retries without progress, backoff, timeouts, and the sleep to wait with."""

    retries: int = DEFAULT_RETRIES
    backoff_s: float = BACKOFF_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    sleep: Callable[[float], None] = time.sleep

    def delay(self, failures: int) -> float:
        """Exponential backoff before the attempt after `failures` consecutive failures."""
        return min(self.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)

    @property
    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts for requests."""
        return (min(CONNECT_TIMEOUT_S, self.timeout_s), self.timeout_s)


class _Transient(Exception):
    """An attempt failed in a way that another attempt may fix."""

    def __init__(self, reason: str) -> None:
        """Keep the one-line `reason` shown in retry messages."""
        super().__init__(reason)
        self.reason = reason


def part_path(dest: Path) -> Path:
    """Where the bytes of `dest` accumulate until they are verified."""
    return dest.with_name(dest.name + ".part")


def validator_path(part: Path) -> Path:
    """Where the server's ETag or Last-Modified of a `.part` file is kept (sent as If-Range)."""
    return part.with_name(part.name + ".validator")


def bad_path(dest: Path) -> Path:
    """Where the bytes of `dest` that failed verification are moved."""
    return dest.with_name(dest.name + ".part.bad")


def mirror_url(url: str, base_url: str) -> str:
    """`url` served by a mirror: `base_url` + `/` + the original host + the original path.

    `https://iplab.dmi.unict.it/sharing/rulstm/TSN-rgb.pth.tar` with the mirror
    `http://mirror.lan/sfr` becomes `http://mirror.lan/sfr/iplab.dmi.unict.it/sharing/rulstm/
    TSN-rgb.pth.tar`: the layout `wget --force-directories` writes, so one mirror holds files
    from several hosts without clashes.
    """
    base = urlsplit(base_url)
    if base.scheme not in ("http", "https") or not base.netloc or base.query or base.fragment:
        raise SfrError(
            f"Mirror address {base_url!r} is not an http(s) URL.",
            hint="Pass --base-url (or SFR_MIRROR) like https://mirror.example.org/sfr",
        )
    original = urlsplit(url)
    path = f"{base.path.rstrip('/')}/{original.netloc}{original.path}"
    return urlunsplit((base.scheme, base.netloc, path, original.query, ""))


def remote_size(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> int | None:
    """The size a server announces for `url` (HEAD, following redirects); None if it says none."""
    try:
        response = requests.head(
            url,
            allow_redirects=True,
            timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s),
            headers={"Accept-Encoding": "identity"},
        )
    except requests.RequestException as error:
        raise DownloadError(f"HEAD {url} failed: {error}") from None
    if response.status_code >= 400:
        raise DownloadError(f"HEAD {url} answered HTTP {response.status_code}.")
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


class _Digest:
    """The running sha256 of a `.part` file, kept between attempts so a resume is not re-read."""

    def __init__(self, part: Path) -> None:
        """An empty digest of `part` (brought up to date by `catch_up`)."""
        self.part = part
        self.hasher = hashlib.sha256()
        self.size = 0

    def restart(self) -> None:
        """Forget every byte: the `.part` file starts over."""
        self.hasher = hashlib.sha256()
        self.size = 0

    def catch_up(self) -> None:
        """Make the digest cover exactly the bytes now in the `.part` file."""
        on_disk = self.part.stat().st_size if self.part.exists() else 0
        if on_disk == self.size:
            return
        self.restart()
        if on_disk:
            with self.part.open("rb") as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    self.hasher.update(chunk)
                    self.size += len(chunk)

    def update(self, chunk: bytes) -> None:
        """Account for `chunk`, just appended to the `.part` file."""
        self.hasher.update(chunk)
        self.size += len(chunk)


def fetch(
    url: str,
    dest: Path,
    *,
    label: str,
    expected: Expected = Expected(),
    policy: RetryPolicy = RetryPolicy(),
    on_event: Callable[[DownloadEvent], None] = lambda event: None,
    session: requests.Session | None = None,
) -> FetchedFile:
    """Download `url` to `dest` (resuming `<dest>.part`), verify it, and rename it into place.

    Attempts that fail transiently are retried up to `policy.retries` times in a row; an attempt
    that brought the file further than ever before resets that count, so a long download over a
    connection that keeps dropping still completes.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    digest = _Digest(part)
    http = session or requests.Session()
    failures = 0
    furthest = part.stat().st_size if part.exists() else 0
    try:
        while True:
            try:
                total = _attempt(url, part, digest, label, expected, policy, on_event, http)
                break
            except _Transient as transient:
                reached = part.stat().st_size if part.exists() else 0
                failures = 1 if reached > furthest else failures + 1
                furthest = max(furthest, reached)
                if failures > policy.retries:
                    kept = f" from the {reached:,} bytes kept in {part}" if reached else ""
                    raise UnreachableError(
                        f"Downloading {label} from {url} failed {failures} times in a row: "
                        f"{transient.reason}.",
                        hint=f"Run the same command again to resume{kept}; --retries N tries "
                        "harder, --timeout S waits longer, --base-url uses a mirror.",
                    ) from None
                delay = policy.delay(failures)
                on_event(RetryScheduled(label, failures, policy.retries, transient.reason, delay))
                policy.sleep(delay)
    finally:
        if session is None:
            http.close()
    return _verify_and_install(url, dest, part, digest, label, expected, total, on_event)


def _attempt(
    url: str,
    part: Path,
    digest: _Digest,
    label: str,
    expected: Expected,
    policy: RetryPolicy,
    on_event: Callable[[DownloadEvent], None],
    http: requests.Session,
) -> int | None:
    """One GET: append to (or restart) the `.part` file; the size the server announced."""
    digest.catch_up()
    have = digest.size
    headers = {"Accept-Encoding": "identity"}
    validator = validator_path(part)
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator.is_file():
            headers["If-Range"] = validator.read_text(encoding="utf-8").strip()
    try:
        with http.get(url, headers=headers, stream=True, timeout=policy.timeouts) as response:
            status = response.status_code
            if status == 416 and have:
                return _range_not_satisfiable(response, part, digest, have)
            _check_status(status, url, label)
            start, total = _resume_point(response, have, url, label)
            size_hint = expected.size if expected.size is not None else total
            if expected.size is not None and total is not None and total != expected.size:
                raise UnreachableError(
                    f"{url} announces {total:,} bytes for {label}, the registry expects "
                    f"{expected.size:,}: not the published file.",
                    hint="Check the address or the mirror (--base-url, SFR_MIRROR).",
                )
            if start == 0:
                digest.restart()
                _remember_validator(response, validator)
            _check_free_space(part, (size_hint or 0) - start, label)
            on_event(FileStarted(label, url, size_hint, start))
            with part.open("ab" if start else "wb") as stream:
                for chunk in _body(response):
                    stream.write(chunk)
                    digest.update(chunk)
                    on_event(BytesReceived(label, len(chunk)))
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
        urllib3.exceptions.HTTPError,
    ) as error:
        raise _Transient(_network_reason(error, digest.size)) from None
    except OSError as error:
        raise DownloadError(
            f"Writing {part} failed: {error.strerror or error}.",
            hint="Check the folder is writable and the disk has room, then run the command again.",
        ) from None
    if total is not None and digest.size < total:
        raise _Transient(f"connection closed after {digest.size:,} of {total:,} bytes")
    return total


def _remember_validator(response: requests.Response, validator: Path) -> None:
    """Keep the strong ETag (else Last-Modified) of a fresh download, so that a resume only
    appends to bytes of the same version of the file (If-Range)."""
    etag = response.headers.get("ETag", "")
    value = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    if value:
        validator.write_text(value, encoding="utf-8")
    else:
        validator.unlink(missing_ok=True)


def _body(response: requests.Response) -> Iterator[bytes]:
    """The raw body in pieces as they arrive, so bytes received before a drop are kept."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3: whole chunks only; a drop loses the chunk in progress
        yield from response.iter_content(CHUNK_BYTES)
        return
    while chunk := read1(CHUNK_BYTES):
        yield chunk


def _check_status(status: int, url: str, label: str) -> None:
    """Raise for an answer that is not file content: transient for 5xx/408/429, else final."""
    if status >= 500 or status in RETRYABLE_CLIENT_STATUSES:
        raise _Transient(f"HTTP {status} from the server")
    if status == 404:
        raise UnreachableError(
            f"{label}: {url} answered 404 Not Found.",
            hint="The file is not at that address. If you use a mirror (--base-url or "
            "SFR_MIRROR), it must hold <mirror>/<host>/<path> of the published address; "
            "`sfr download list --urls` prints every address.",
        )
    if status >= 400:
        raise UnreachableError(
            f"{label}: {url} answered HTTP {status}.",
            hint="The server refuses this request; check the address or use a mirror "
            "(--base-url or SFR_MIRROR).",
        )
    if status not in (200, 206):
        raise UnreachableError(f"{label}: {url} answered HTTP {status} instead of the file.")


def _resume_point(
    response: requests.Response, have: int, url: str, label: str
) -> tuple[int, int | None]:
    """(offset the body starts at, total size if announced) of a 200 or 206 answer."""
    if response.status_code == 200:
        length = response.headers.get("Content-Length", "")
        return 0, int(length) if length.isdigit() else None
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is None or match.group(1) is None:
        raise _Transient(f"{url} sent partial content without a usable Content-Range")
    start = int(match.group(1))
    total = None if match.group(3) == "*" else int(match.group(3))
    if start != have:
        raise _Transient(f"asked for bytes from {have:,}, {url} sent them from {start:,}")
    return start, total


def _range_not_satisfiable(
    response: requests.Response, part: Path, digest: _Digest, have: int
) -> int | None:
    """A 416 to a resume: the `.part` is complete if the server's size equals it, else restart."""
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is not None and match.group(3) not in (None, "*") and int(match.group(3)) == have:
        return have
    part.unlink(missing_ok=True)
    digest.restart()
    raise _Transient("the server refused to resume; starting over")


def _check_free_space(part: Path, needed: int, label: str) -> None:
    """Refuse to start a download the disk cannot hold."""
    free = shutil.disk_usage(part.parent).free
    if needed > free:
        raise DownloadError(
            f"Not enough disk space for {label}: {needed:,} more bytes needed in "
            f"{part.parent}, {free:,} free.",
            hint="Free some space or pass another folder (--data / --runs).",
        )


def _verify_and_install(
    url: str,
    dest: Path,
    part: Path,
    digest: _Digest,
    label: str,
    expected: Expected,
    total: int | None,
    on_event: Callable[[DownloadEvent], None],
) -> FetchedFile:
    """Check size and sha256 of the finished `.part`, then rename it atomically onto `dest`."""
    digest.catch_up()
    size, sha256 = digest.size, digest.hasher.hexdigest()
    wanted_size = expected.size if expected.size is not None else total
    problem = None
    if wanted_size is not None and size != wanted_size:
        problem = f"{size:,} bytes received, {wanted_size:,} expected"
    elif expected.sha256 is not None and sha256 != expected.sha256:
        problem = (
            f"sha256 {sha256} differs from {expected.sha256} recorded in {expected.sha256_source}"
        )
    validator_path(part).unlink(missing_ok=True)
    if problem is not None:
        os.replace(part, bad_path(dest))
        raise DownloadError(
            f"{label} from {url} failed verification ({problem}); nothing was installed at "
            f"{dest}. The bytes were moved to {bad_path(dest)}.",
            hint="Run the command again to download from scratch (delete the .part.bad file "
            "once you no longer need it); if it keeps failing, the file on the server changed.",
        )
    os.replace(part, dest)
    on_event(FileFinished(label, dest, size, sha256))
    return FetchedFile(dest, size, sha256, url)


def _network_reason(error: Exception, on_disk: int) -> str:
    """A one-line reason for a transient network error, with the bytes kept so far."""
    if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        what = "timed out"
    elif isinstance(
        error, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)
    ):
        what = "connection broken"
    else:
        detail = _ERRNO.search(str(error))
        what = f"connection failed ({detail.group(0) if detail else type(error).__name__})"
    return f"{what} with {on_disk:,} bytes received" if on_disk else what
