"""What a server's answers say about a file being downloaded, and whether they agree.

A download keeps, beside its `.part`, a `FileRecord`: whose bytes these are (the artefact), the
validators (strong ETag, Last-Modified) and the total size the server stated. Every later answer
is checked against it: a 206 must start where asked, its Content-Range must be possible and
match its Content-Length, and size and validators must not change (RFC 9110 §13.1.5 If-Range,
§14.4 Content-Range, §15.5.17 416). Any disagreement raises `Disagreement`, on which the caller
throws the bytes away and starts the file again.

The end of a file is proven only by the server stating it after the last byte arrived: a 416
to `bytes=N-` saying `*/N`, or, from a server that ignores ranges, a whole-file answer whose
Content-Length is N (or a whole body that ended with its last chunk) with the same validators.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import requests

from sfr.hub.safefiles import check_regular, open_regular, write_regular

_CONTENT_RANGE = re.compile(r"^bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)$")


class Disagreement(Exception):
    """An answer contradicts what is known about the file; `reason` says how."""

    def __init__(self, reason: str) -> None:
        """Keep the one-line `reason`."""
        super().__init__(reason)
        self.reason = reason


@dataclass
class FileRecord:
    """What is known about the file whose bytes are in a `.part` (kept in its `.validator`):
    the artefact, the validators, the total size, and whether the last body ended cleanly at
    the `.part`'s size (`ended`; `chunked_end` when it ended with its last chunk)."""

    etag: str | None = None
    last_modified: str | None = None
    total: int | None = None
    label: str | None = None
    ended: bool = field(default=False, compare=False)
    chunked_end: bool = field(default=False, compare=False)

    @property
    def if_range(self) -> str | None:
        """The value sent as If-Range: the strong ETag, else Last-Modified."""
        return self.etag or self.last_modified

    def forget(self) -> None:
        """Know nothing any more (the `.part` is thrown away)."""
        self.etag = self.last_modified = self.total = None
        self.ended = self.chunked_end = False

    def learn(self, response: requests.Response, total: int | None, label: str) -> None:
        """Start over from a whole-file answer: its validators and size, and the artefact."""
        self.etag, self.last_modified = validators(response)
        self.total, self.label = total, label
        self.ended = self.chunked_end = False

    @classmethod
    def load(cls, path: Path) -> FileRecord:
        """Read a `.validator` file (JSON, or the bare If-Range value of older versions)."""
        if not check_regular(path):
            return cls()
        with open_regular(path, "rb") as stream:
            text = stream.read(4096).decode("utf-8", "replace").strip()
        try:
            data = json.loads(text)
        except ValueError:
            return cls(etag=text or None)
        if not isinstance(data, dict):
            return cls()

        def text_of(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        total = data.get("total")
        return cls(
            etag=text_of("etag"),
            last_modified=text_of("last_modified"),
            total=total if isinstance(total, int) and total >= 0 else None,
            label=text_of("label"),
        )

    def save(self, path: Path) -> None:
        """Write the `.validator` file (never through a link); OSError on a disk error."""
        payload = {
            "etag": self.etag,
            "last_modified": self.last_modified,
            "total": self.total,
            "label": self.label,
        }
        write_regular(path, json.dumps(payload).encode("utf-8"))


def validators(response: requests.Response) -> tuple[str | None, str | None]:
    """(strong ETag, Last-Modified) of an answer; a weak ETag cannot guard a resume."""
    etag = response.headers.get("ETag") or None
    if etag is not None and etag.startswith("W/"):
        etag = None
    return etag, response.headers.get("Last-Modified") or None


def content_length(response: requests.Response) -> int | None:
    """The Content-Length of an answer, if it states one."""
    length = response.headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


def check_same_file(response: requests.Response, record: FileRecord, total: int | None) -> None:
    """Raise unless an answer stating `total` describes the same file as the record."""
    etag, modified = validators(response)
    if record.total is not None and total is not None and total != record.total:
        raise Disagreement(f"the size changed from {record.total:,} to {total:,}")
    if record.etag and etag and etag != record.etag:
        raise Disagreement(f"the ETag changed from {record.etag} to {etag}")
    if record.last_modified and modified and modified != record.last_modified:
        raise Disagreement("the Last-Modified date changed")


def check_partial(
    response: requests.Response, record: FileRecord, have: int
) -> tuple[int, int, int | None]:
    """(start, end, total) of a 206 that continues `have` bytes; learns its total."""
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
    if match is None or match.group(1) is None:
        raise Disagreement("partial content without a usable Content-Range")
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if start != have:
        raise Disagreement(f"asked for bytes from {have:,}, got them from {start:,}")
    if end < start or (total is not None and end >= total):
        raise Disagreement(f"an impossible Content-Range {match.group(0)!r}")
    length = content_length(response)
    if length is not None and length != end - start + 1:
        raise Disagreement(f"Content-Length {length:,} disagrees with {match.group(0)!r}")
    check_same_file(response, record, total)
    if total is not None:
        record.total = total
    return start, end, total


def end_proven_by_416(
    response: requests.Response, record: FileRecord, have: int, registry_size: int | None
) -> int:
    """A 416 to `bytes=have-`: `have`, proven the whole file, if it says the file has `have`
    bytes (and the registry agrees)."""
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
    if match is None or match.group(3) == "*":
        raise Disagreement("the server refused the range without saying the size")
    total = int(match.group(3))
    if total != have:
        raise Disagreement(f"the server says {total:,} bytes, {have:,} are on disk")
    check_same_file(response, record, total)
    if registry_size is not None and total != registry_size:
        raise Disagreement(f"{total:,} bytes, the registry expects {registry_size:,}")
    return have


def end_proven_by_whole_answer(
    response: requests.Response, record: FileRecord, have: int
) -> int | None:
    """A 200 to the request past the end of a finished body (the server ignores ranges):
    `have` if its Content-Length is `have` — or it sends none but the body held ended with its
    last chunk — with the same validators; None when it cannot prove anything."""
    length = content_length(response)
    if length is None:
        if not record.chunked_end:
            return None
        check_same_file(response, record, None)
        return have
    check_same_file(response, record, length)
    if length != have:
        raise Disagreement(f"the server now says {length:,} bytes, {have:,} received")
    return have
