"""A loopback HTTP file server for download tests, with injected faults and a request log.

`FileServer` listens on 127.0.0.1 on an ephemeral port in a background thread. Each served path
can answer some error statuses first (`fail_with`), drop the connection after some body bytes
(`drop_after`, one entry per request, consumed in order) or ignore Range requests
(`ranges=False`). Answers carry an ETag of the content and honour If-Range. The other `Served`
fields make the server lie in the ways real ones do: no Content-Length (the body ends when the
connection closes), a Content-Length off by some bytes, a 206 starting elsewhere than asked or
announcing another total or length, a 416 without the size, an ETag that changes with every
answer, a redirect loop. Every request is logged, so tests can count what reached the server.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class Served:
    """A file the server holds and the faults it injects when serving it."""

    data: bytes
    ranges: bool = True
    fail_with: list[int] = field(default_factory=list)
    drop_after: list[int] = field(default_factory=list)
    length: bool = True  # send Content-Length (else the body is delimited by closing)
    length_delta: int = 0  # a 200's Content-Length states this many bytes more than it sends
    range_start_delta: int = 0  # a 206 starts this many bytes after the asked start (says so)
    range_total_delta: int = 0  # a 206's Content-Range announces this many bytes more in all
    range_length_delta: int = 0  # a 206's Content-Length disagrees with its Content-Range
    range_extra_bytes: int = 0  # a 206 sends this many bytes beyond its Content-Range
    total_in_416: bool = True  # a 416 says `bytes */SIZE` (else no Content-Range)
    content_encoding: str | None = None  # a Content-Encoding header (the body is not encoded)
    etag_per_answer: bool = False  # every answer carries a new ETag (If-Range never matches)
    validators: bool = True  # send an ETag (else neither ETag nor Last-Modified)
    chunked: bool = False  # HTTP/1.1 chunked bodies without Content-Length (a drop: no last chunk)
    redirect_loop: bool = False  # answer 302 to the same address, forever


@dataclass(frozen=True)
class Request:
    """One request the server received."""

    method: str
    path: str
    range: str | None
    if_range: str | None


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files; use as a context manager."""

    def __init__(self) -> None:
        """Bind to an ephemeral loopback port; serving starts on `__enter__`."""
        self.files: dict[str, Served] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FileServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def root(self) -> str:
        """`http://127.0.0.1:PORT`."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def mirror(self) -> str:
        """The base URL of the mirror this server plays (`ROOT/mirror`)."""
        return f"{self.root}/mirror"

    def serve(self, path: str, data: bytes, **faults: object) -> str:
        """Serve `data` at `path` (with `Served` faults); its full URL."""
        self.files[path] = Served(data, **faults)  # type: ignore[arg-type]
        return self.root + path

    def serve_mirrored(self, original_url: str, data: bytes, **faults: object) -> str:
        """Serve `data` where the mirror rule puts `original_url`: /mirror/<host>/<path>."""
        parts = urlsplit(original_url)
        return self.serve(f"/mirror/{parts.netloc}{parts.path}", data, **faults)

    def hits(self, path: str | None = None, method: str = "GET") -> list[Request]:
        """Requests received (for one path, or all) with that method."""
        with self._lock:
            return [
                r for r in self.requests if r.method == method and (path is None or r.path == path)
            ]

    def log(self, request: Request) -> None:
        """Record a request (called from the handler threads)."""
        with self._lock:
            self.requests.append(request)


def payload_junk(count: int) -> bytes:
    """`count` bytes that belong to no file."""
    return b"\xff" * count


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `server`'s files and log."""

    class Handler(BaseHTTPRequestHandler):
        """Serves `server.files` with Range support and injected faults."""

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

        def do_HEAD(self) -> None:
            """Headers only (for size checks)."""
            self._answer(body=False)

        def do_GET(self) -> None:
            """Headers and body, faults included (a client that hangs up early is fine)."""
            try:
                self._answer(body=True)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _answer(self, body: bool) -> None:
            """Log the request, then answer it: 404, injected status, 200/206/416, or a drop."""
            server.log(
                Request(
                    self.command, self.path, self.headers.get("Range"), self.headers.get("If-Range")
                )
            )
            served = server.files.get(self.path)
            self.protocol_version = "HTTP/1.1" if served and served.chunked else "HTTP/1.0"
            if served is None:
                self._status_only(404)
                return
            if served.fail_with:
                self._status_only(served.fail_with.pop(0))
                return
            if served.redirect_loop:
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, start = served.data, 0
            etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
            if served.etag_per_answer:
                etag = f'"{len(server.requests)}-{etag[1:]}'
            match = _RANGE.match(self.headers.get("Range") or "")
            if_range = self.headers.get("If-Range")
            if served.ranges and match is not None and if_range in (None, etag):
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    if served.total_in_416:
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                start = min(start + served.range_start_delta, len(data) - 1)
                self.send_response(206)
                total = len(data) + served.range_total_delta
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{total}")
                extra = served.range_length_delta
                data = data + payload_junk(served.range_extra_bytes)
            else:
                self.send_response(200)
                extra = served.length_delta
            payload = data[start:]
            if served.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif served.length:
                length = len(payload) + extra
                self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes" if served.ranges else "none")
            if served.validators:
                self.send_header("ETag", etag)
            if served.content_encoding:
                self.send_header("Content-Encoding", served.content_encoding)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if not body:
                return
            cut = served.drop_after.pop(0) if served.drop_after else None
            if served.chunked:
                self._write_chunks(payload[:cut], last=cut is None)
                return
            self.wfile.write(payload[:cut])
            self.wfile.flush()

        def _write_chunks(self, payload: bytes, last: bool) -> None:
            """`payload` in 64 kB chunks, then the last (empty) chunk unless the body is cut."""
            for offset in range(0, len(payload), 65_536):
                piece = payload[offset : offset + 65_536]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            if last:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _status_only(self, status: int) -> None:
            """An empty answer with `status`."""
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
