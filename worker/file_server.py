"""An HTTP server for the files of one store: `GET /files/NAME`, with Range, by name only.

Peers fetch model files from it (a node's agent runs one), authenticated with a bearer
key that the head hands only to the nodes it asks to copy. Bodies go out with sendfile(2):
the bytes never pass through Python, so a copy runs at the speed of the network.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger(__name__)

Resolver = Callable[[str], Path]  # name -> path; raises ValueError (e.g. StoreError) for any other name
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
SENDFILE_CHUNK_BYTES = 64 << 20


class FileRequestHandler(BaseHTTPRequestHandler):
    server: "FileServer"
    protocol_version = "HTTP/1.1"
    timeout = 120  # a peer that stops reading does not hold a thread for ever

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        if not self._authorized():
            return self._reply(401, "missing or wrong bearer key")
        if not self.path.startswith("/files/"):
            return self._reply(404, "not found")
        name = unquote(self.path[len("/files/"):].split("?", 1)[0])
        try:
            path = self.server.resolve(name)
            f = open(path, "rb")
        except (ValueError, OSError):
            return self._reply(404, f"no file {name!r} here")
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end = 0, size - 1
            status = 200
            wanted = self.headers.get("Range")
            if wanted:
                match = _RANGE.match(wanted.strip())
                if match is None:
                    return self._reply(416, "only single 'bytes=START-[END]' ranges", {"Content-Range": f"bytes */{size}"})
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size or end < start:
                    return self._reply(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
                status = 206
            length = end - start + 1
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                self.send_body(f, start, length)

    def send_body(self, f, offset: int, count: int) -> None:
        """sendfile(2) from the open file; a reader that leaves ends it quietly."""
        try:
            while count > 0:
                sent = self.connection.sendfile(f, offset, min(count, SENDFILE_CHUNK_BYTES))
                if sent == 0:
                    break
                offset += sent
                count -= sent
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        if count > 0:  # the file shrank: end the body now, so the reader moves on at once
            self.close_connection = True

    def _authorized(self) -> bool:
        key = self.server.key
        if key is None:
            return True
        scheme, _, sent = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), key.encode())

    def _reply(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        data = (message + "\n").encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class FileServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, resolve: Resolver, key: str | None,
                 handler: type[FileRequestHandler] = FileRequestHandler) -> None:
        super().__init__((host, port), handler)
        self.resolve = resolve
        self.key = key
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FileServer":
        self._thread = threading.Thread(target=self.serve_forever, name="file-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever(): without one it would hang
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()
