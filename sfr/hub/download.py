"""Resumable, verified HTTP downloads of one file, for slow and flaky connections.

Bytes stream into `<dest>.part`; whose bytes they are (the artefact) and what the server said
about the file (ETag, Last-Modified, total size) are kept in `<dest>.part.validator`
(`sfr.hub.answers.FileRecord`); a `.part` of another artefact sharing the destination is thrown
away. An existing `.part` is resumed with an HTTP Range request made conditional with If-Range,
so bytes of a file that changed on the server in between are never glued together.

A file is renamed into place only when it is *proven complete*: its size equals the registry's
size, its sha256 the registry's, or the server, asked for the bytes after the last one held
(`Range: bytes=N-`), answered 416 with the total `*/N` (a server that ignores ranges: a 200
whose Content-Length is N, with the same validators). A body that simply ends (no
Content-Length, or a connection closed early) is never taken as the whole file. Every
disagreement (`sfr.hub.answers`: a total that differs from an earlier one, a Content-Range that
does not start where asked or does not match its Content-Length, a body longer than announced,
a validator that changed, a 416 for another size) throws the `.part` away and starts the file
again; it is never success. Then the sha256 is checked when the registry knows it (bytes that
fail are moved to `<dest>.part.bad`).

Connection errors, timeouts, truncated bodies, 408/429 and 5xx answers are retried with
exponential backoff; other 4xx answers are errors at once; any other error of the HTTP client or
the disk is a `DownloadError` naming the file and the address. Addresses in messages and records
never carry `user:password@` (`sfr.hub.addresses`). Files written are never followed through a
link (`sfr.hub.safefiles`). Progress is reported through a callback of the event dataclasses
below.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import requests
import urllib3

from sfr.errors import SfrError
from sfr.files import CHUNK_BYTES
from sfr.hub.addresses import public_address, scrub
from sfr.hub.answers import (
    Disagreement,
    FileRecord,
    check_partial,
    content_length,
    end_proven_by_416,
    end_proven_by_whole_answer,
)
from sfr.hub.safefiles import check_regular, open_regular

DEFAULT_RETRIES = 5
DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")
_NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.DecodeError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
_CLIENT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, ValueError)


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
    """A verified download: where it is, its size and digest, the address it came from.

    `url` never carries user information (`user:password@`). `received` counts the bytes this
    call took from the network: 0 when the file was already whole on disk (a `.part` proven
    complete) and only verified and put in place.
    """

    path: Path
    size: int
    sha256: str
    url: str
    received: int = 0


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


class _DiskError(Exception):
    """Writing the `.part` (or its validator) failed; wraps the OSError."""

    def __init__(self, path: Path, error: OSError) -> None:
        """Remember the file and the error."""
        super().__init__(str(error))
        self.path = path
        self.error = error


@dataclass(frozen=True)
class _Transfer:
    """One file being fetched: its address, its `.part`, what is known of it, and how to try.

    `digest` and `known` are updated in place as bytes arrive and the server answers.
    """

    url: str
    part: Path
    digest: _Digest
    known: FileRecord
    label: str
    expected: Expected
    policy: RetryPolicy
    on_event: Callable[[DownloadEvent], None]
    http: requests.Session

    @property
    def shown(self) -> str:
        """The address without user information, for messages."""
        return public_address(self.url)


def part_path(dest: Path) -> Path:
    """Where the bytes of `dest` accumulate until they are verified."""
    return dest.with_name(dest.name + ".part")


def validator_path(part: Path) -> Path:
    """Where what the server said about a `.part` file is kept (ETag, Last-Modified, total)."""
    return part.with_name(part.name + ".validator")


def bad_path(dest: Path) -> Path:
    """Where the bytes of `dest` that failed verification are moved."""
    return dest.with_name(dest.name + ".part.bad")


def remote_size(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> int | None:
    """The size a server announces for `url` (HEAD, following redirects); None if it says none."""
    shown = public_address(url)
    try:
        response = requests.head(
            url,
            allow_redirects=True,
            timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s),
            headers={"Accept-Encoding": "identity"},
        )
    except (*_NETWORK_ERRORS, *_CLIENT_ERRORS) as error:
        raise DownloadError(f"HEAD {shown} failed: {scrub(str(error))}") from None
    refusal = refusal_text(response.status_code, url)
    if refusal is not None:
        raise DownloadError(f"HEAD {refusal[0]}", hint=refusal[1])
    if response.status_code >= 400:
        raise DownloadError(f"HEAD {shown} answered HTTP {response.status_code}.")
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


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
        on_disk = os.lstat(self.part).st_size if check_regular(self.part) else 0
        if on_disk == self.size:
            return
        self.restart()
        if on_disk:
            with open_regular(self.part, "rb") as stream:
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
    before_install: Callable[[FetchedFile], None] = lambda fetched: None,
) -> FetchedFile:
    """Download `url` to `dest` (resuming `<dest>.part`), prove it complete, verify it, and
    rename it into place; `before_install` is called with the verified file just before the
    rename (the install layer records a pending manifest entry there).

    Attempts that fail transiently are retried up to `policy.retries` times in a row; an attempt
    that brought the file further than ever before resets that count, so a long download over a
    connection that keeps dropping still completes.

    Raises UnreachableError (this address cannot deliver the file: try the next one),
    DownloadError (verification failed, the end cannot be proven, disk or client error) and
    UnsafePathError (a link or special file where the `.part`, its validator or `dest` go).
    """
    shown = public_address(url)
    part = part_path(dest)
    validator = validator_path(part)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        check_regular(dest)
        check_regular(validator)
        if not check_regular(part):
            validator.unlink(missing_ok=True)  # a leftover of a .part that is gone
        known = FileRecord.load(validator)
        if known.label not in (None, label):  # bytes of another artefact at the same place
            part.unlink(missing_ok=True)
            validator.unlink(missing_ok=True)
            known.forget()
            known.label = None
        digest = _Digest(part)
        received = 0

        def counting(event: DownloadEvent) -> None:
            nonlocal received
            if isinstance(event, BytesReceived):
                received += event.count
            on_event(event)

        http = session or requests.Session()
        try:
            transfer = _Transfer(url, part, digest, known, label, expected, policy, counting, http)
            total = _attempts(transfer)
        finally:
            if session is None:
                http.close()
        fetched = _verify_and_install(
            shown, dest, part, digest, label, expected, total, on_event, before_install
        )
        return replace(fetched, received=received)
    except _DiskError as error:
        raise DownloadError(
            f"Downloading {label} from {shown}: writing {error.path} failed: "
            f"{error.error.strerror or error.error}.",
            hint="Check the folder is writable and the disk has room, then run the command "
            "again to resume.",
        ) from None
    except OSError as error:
        raise DownloadError(
            f"Downloading {label} from {shown} failed: {error.strerror or error} "
            f"({error.filename or dest}).",
            hint="Check the folder is writable and the disk has room, then run the command "
            "again to resume.",
        ) from None


def _attempts(transfer: _Transfer) -> int:
    """Request until the `.part` is proven complete; its size."""
    part, digest, policy = transfer.part, transfer.digest, transfer.policy
    failures = 0
    furthest = os.lstat(part).st_size if check_regular(part) else 0
    while True:
        before = os.lstat(part).st_size if check_regular(part) else 0
        try:
            proven = _attempt(transfer)
            if proven is not None:
                return proven
            if digest.size > before:
                continue  # a body ended cleanly: the next request proves the end or continues
            reason = f"the server sent no bytes beyond the {digest.size:,} held"
        except _Transient as transient:
            reason = transient.reason
        except _CLIENT_ERRORS as error:  # not a network failure: retrying will not help
            raise UnreachableError(
                f"Downloading {transfer.label} from {transfer.shown} failed: "
                f"{type(error).__name__}: {scrub(str(error))}.",
                hint="Check the address (--base-url, SFR_MIRROR); a server that answers like "
                "this cannot deliver the file. Any bytes received are kept in "
                f"{part} for the next run.",
            ) from None
        reached = os.lstat(part).st_size if check_regular(part) else 0
        failures = 1 if reached > furthest else failures + 1
        furthest = max(furthest, reached)
        if failures > policy.retries:
            kept = f" from the {reached:,} bytes kept in {part}" if reached else ""
            raise UnreachableError(
                f"Downloading {transfer.label} from {transfer.shown} failed {failures} times in "
                f"a row: {reason}.",
                hint=f"Run the same command again to resume{kept}; --retries N tries "
                "harder, --timeout S waits longer, --base-url uses a mirror.",
            ) from None
        delay = policy.delay(failures)
        transfer.on_event(RetryScheduled(transfer.label, failures, policy.retries, reason, delay))
        policy.sleep(delay)


def _attempt(transfer: _Transfer) -> int | None:
    """One GET: append to (or restart) the `.part`; its size once proven complete, else None."""
    url, label, expected = transfer.url, transfer.label, transfer.expected
    part, digest, known = transfer.part, transfer.digest, transfer.known
    digest.catch_up()
    have = digest.size
    if expected.size is not None and have == expected.size:
        return have  # the registry's size is the proof; the sha256 is checked next
    if known.ended and expected.sha256 == digest.hasher.copy().hexdigest():
        return have  # the registry's digest is the proof
    if expected.size is not None and have > expected.size:
        _restart(part, digest, known, f"{have:,} bytes on disk, more than the registry's size")
    if known.total is not None and have > known.total:
        _restart(part, digest, known, f"{have:,} bytes on disk, more than the announced size")
    # Without a registry size or digest, only the server can prove the end: a 200 to the
    # request past a finished body is then its answer, not a new copy to start over with.
    unproven = expected.size is None and expected.sha256 is None
    probing = unproven and (known.ended or (have > 0 and have == known.total))
    if have and not probing and not known.if_range and expected.sha256 is None:
        # Nothing would tell bytes of a file changed in between from the rest of this one (no
        # ETag or Last-Modified to send as If-Range, no published digest to check the whole
        # against): the file is fetched whole again instead of resumed.
        part.unlink(missing_ok=True)
        digest.restart()
        known.forget()
        have = 0
    headers = {"Accept-Encoding": "identity"}
    if have or known.ended:
        headers["Range"] = f"bytes={have}-"
        if known.if_range:
            headers["If-Range"] = known.if_range
    timeouts = transfer.policy.timeouts
    try:
        with transfer.http.get(url, headers=headers, stream=True, timeout=timeouts) as response:
            status = response.status_code
            if status == 416 and "Range" in headers:
                return end_proven_by_416(response, known, have, expected.size)
            _check_status(status, url, label)
            _check_encoding(response, url, label)
            if status == 200 and probing:
                return _whole_file_answer(response, part, known, have, url, label)
            if status == 200:
                start, end, total = 0, None, content_length(response)
                _check_total(total, expected, url, label)
                digest.restart()
                known.learn(response, total, label)
                _save(known, validator_path(part))
            else:
                start, end, total = check_partial(response, known, have)
                _check_total(total, expected, url, label)
            known.ended = False
            size_hint = expected.size if expected.size is not None else total
            _check_free_space(part, (size_hint or 0) - start, label)
            transfer.on_event(FileStarted(label, transfer.shown, size_hint, start))
            wanted = None if end is None else end - start + 1
            received = _stream(
                response,
                part,
                digest,
                label=label,
                append=bool(start),
                limit=wanted,
                on_event=transfer.on_event,
            )
    except Disagreement as disagreement:
        _restart(part, digest, known, disagreement.reason)
    except _NETWORK_ERRORS as error:
        raise _Transient(_network_reason(error, digest.size)) from None
    if wanted is not None and received > wanted:
        _restart(part, digest, known, "the server sent more bytes than its Content-Range said")
    if wanted is not None and received < wanted:
        raise _Transient(f"connection closed after {digest.size:,} bytes")
    if total is not None and digest.size > total:
        _restart(part, digest, known, f"received {digest.size:,} bytes of a {total:,}-byte file")
    if total is not None and digest.size < total:
        if wanted is None:
            raise _Transient(f"connection closed after {digest.size:,} of {total:,} bytes")
        return None  # the server sent part of the rest: ask for what remains
    known.ended = True  # the body ended here; only the server can say it is the end
    # urllib3 raises on a chunked body cut before its last chunk: one that ended was whole
    known.chunked_end = bool(getattr(response.raw, "chunked", False)) and start == 0
    return None


def _check_encoding(response: requests.Response, url: str, label: str) -> None:
    """Refuse a body the server encoded although asked not to (its bytes are not the file's)."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnreachableError(
            f"{public_address(url)} sent {label} with Content-Encoding {encoding!r} although "
            "asked for the bytes as they are; they cannot be checked or resumed.",
            hint="Use another address or mirror (--base-url, SFR_MIRROR).",
        )


def _save(record: FileRecord, path: Path) -> None:
    """Write a `.validator` file; a disk error is a `_DiskError`."""
    try:
        record.save(path)
    except OSError as error:
        raise _DiskError(path, error) from None


def _whole_file_answer(
    response: requests.Response, part: Path, known: FileRecord, have: int, url: str, label: str
) -> int:
    """A 200 to the request past the end of a finished body: the proof, or an error when the
    server can prove nothing (no size, no ranges)."""
    proven = end_proven_by_whole_answer(response, known, have)
    if proven is None:
        raise UnreachableError(
            f"{public_address(url)} neither states the size of {label} nor answers range "
            "requests, so a complete download cannot be told from a cut one; nothing was "
            "installed.",
            hint="Use a mirror that sends Content-Length or supports ranges (--base-url, "
            f"SFR_MIRROR). The {have:,} bytes received are in {part}.",
        )
    return proven


def _check_total(total: int | None, expected: Expected, url: str, label: str) -> None:
    """Refuse an address whose file has another size than the registry's."""
    if expected.size is not None and total is not None and total != expected.size:
        raise UnreachableError(
            f"{public_address(url)} announces {total:,} bytes for {label}, the registry expects "
            f"{expected.size:,}: not the published file.",
            hint="Check the address or the mirror (--base-url, SFR_MIRROR).",
        )


def _stream(
    response: requests.Response,
    part: Path,
    digest: _Digest,
    *,
    label: str,
    append: bool,
    limit: int | None,
    on_event: Callable[[DownloadEvent], None],
) -> int:
    """Write the body to the `.part` (appending or from scratch); the bytes received.

    With a `limit` (the length a Content-Range announced), one byte more than that is the most
    written, enough to tell that the server sent too much.
    """
    received = 0
    try:
        stream = open_regular(part, "ab" if append else "wb")
    except OSError as error:
        raise _DiskError(part, error) from None
    with stream:
        for chunk in _body(response):
            if limit is not None and received + len(chunk) > limit:
                chunk = chunk[: limit - received + 1]
            try:
                stream.write(chunk)
                stream.flush()
            except OSError as error:
                raise _DiskError(part, error) from None
            digest.update(chunk)
            received += len(chunk)
            on_event(BytesReceived(label, len(chunk)))
            if limit is not None and received > limit:
                break
    return received


def _restart(part: Path, digest: _Digest, known: FileRecord, reason: str) -> NoReturn:
    """Throw the `.part` away (its bytes cannot be trusted) and try the file from scratch."""
    part.unlink(missing_ok=True)
    validator_path(part).unlink(missing_ok=True)
    digest.restart()
    known.forget()
    raise _Transient(f"{reason}; starting this file again")


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
    shown = public_address(url)
    if status >= 500 or status in RETRYABLE_CLIENT_STATUSES:
        raise _Transient(f"HTTP {status} from the server")
    if status == 404:
        raise UnreachableError(
            f"{label}: {shown} answered 404 Not Found.",
            hint="The file is not at that address. If you use a mirror (--base-url or "
            "SFR_MIRROR), it must hold <mirror>/<host>/<path> of the published address; "
            "`sfr download list --urls` prints every address.",
        )
    refusal = refusal_text(status, url)
    if refusal is not None:
        raise UnreachableError(f"{label}: {refusal[0]}", hint=refusal[1])
    if status >= 400:
        raise UnreachableError(
            f"{label}: {shown} answered HTTP {status}.",
            hint="The server refuses this request; check the address or use a mirror "
            "(--base-url or SFR_MIRROR).",
        )
    if status not in (200, 206):
        raise UnreachableError(f"{label}: {shown} answered HTTP {status} instead of the file.")


def refusal_text(status: int, url: str) -> tuple[str, str] | None:
    """(message, hint) for an answer refusing access (401, 403), naming `url` without its user
    information; None for any other status."""
    shown = public_address(url)
    given = urlsplit(url).username is not None
    if status == 401:
        if given:
            return (
                f"{shown} needs credentials (HTTP 401 Unauthorized) and refused the user name "
                "and password in the address.",
                "Check them, or use a mirror you can read (--base-url, SFR_MIRROR).",
            )
        return (
            f"{shown} needs credentials (HTTP 401 Unauthorized).",
            "Put them in the mirror address, https://USER:PASSWORD@HOST/PATH (sfr never prints "
            "or records them), or use a mirror you can read (--base-url, SFR_MIRROR).",
        )
    if status == 403:
        return (
            f"{shown} forbids access (HTTP 403 Forbidden).",
            "The server refuses this file to you (credentials, network or an expired link): "
            "check the address, or use a mirror you can read (--base-url, SFR_MIRROR).",
        )
    return None


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
    shown: str,
    dest: Path,
    part: Path,
    digest: _Digest,
    label: str,
    expected: Expected,
    total: int,
    on_event: Callable[[DownloadEvent], None],
    before_install: Callable[[FetchedFile], None],
) -> FetchedFile:
    """Check size and sha256 of the proven `.part`, then rename it atomically onto `dest`."""
    digest.catch_up()
    size, sha256 = digest.size, digest.hasher.hexdigest()
    problem = None
    if size != total or (expected.size is not None and size != expected.size):
        problem = f"{size:,} bytes on disk, {expected.size or total:,} expected"
    elif expected.sha256 is not None and sha256 != expected.sha256:
        problem = (
            f"sha256 {sha256} differs from {expected.sha256} recorded in {expected.sha256_source}"
        )
    validator_path(part).unlink(missing_ok=True)
    if problem is not None:
        os.replace(part, bad_path(dest))
        raise DownloadError(
            f"{label} from {shown} failed verification ({problem}); nothing was installed at "
            f"{dest}. The bytes were moved to {bad_path(dest)}.",
            hint="Run the command again to download from scratch (delete the .part.bad file "
            "once you no longer need it); if it keeps failing, the file on the server changed.",
        )
    with open_regular(part, "rb") as stream:
        os.fsync(stream.fileno())  # on disk before it is recorded and renamed into place
    fetched = FetchedFile(dest, size, sha256, shown)
    before_install(fetched)
    check_regular(dest)
    os.replace(part, dest)
    on_event(FileFinished(label, dest, size, sha256))
    return fetched


def _network_reason(error: Exception, on_disk: int) -> str:
    """A one-line reason for a transient network error, with the bytes kept so far."""
    if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        what = "timed out"
    elif isinstance(
        error,
        (
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError,
            http.client.HTTPException,
        ),
    ):
        what = "connection broken"
    else:
        detail = _ERRNO.search(str(error))
        what = f"connection failed ({detail.group(0) if detail else type(error).__name__})"
    return f"{what} with {on_disk:,} bytes received" if on_disk else what
