"""Real HTTP servers on 127.0.0.1 for tests that move model files, with faults on demand.

    from tests.http_fixtures import static_server, fake_hf_endpoint

    with static_server(tmp_path, key="k", drop_after_bytes=1 << 20) as server:
        url = server.file_url("tiny.gguf")   # the first GET is cut after 1 MiB of its body
        ...
        assert server.ranges("tiny.gguf") == [None, "bytes=1048576-"]

    with fake_hf_endpoint({("me/tiny", "main", "tiny.gguf"): path}, token="hf_x") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ...
        assert hub.requests[0].authorization == "Bearer hf_x"

Both are built on the product's `worker.file_server.FileServer`; the faults live in a
subclass of its request handler (`send_body` overridden), never in product code. What a
server does wrong can be changed while it runs, through `server.faults`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from orchestrator.core.model_source import is_store_name
from worker.file_server import FileRequestHandler, FileServer

LOOPBACK = "127.0.0.1"
_FLIP = bytes(b ^ 0xFF for b in range(256))  # bytes.translate table: every byte changed


@dataclass
class Faults:
    """What a test server does wrong; change the fields while it runs to change its behaviour."""

    drop_after_bytes: int | None = None  # close the connection after this many bytes of a body...
    drops_left: int | None = 1  # ...this many times (None: every time)
    wrong_bytes: bool = False  # serve every byte flipped: right size, wrong sha256
    chunk_bytes: int = 64 << 10  # the body goes out in chunks of this size when a fault is on...
    chunk_delay_s: float = 0.0  # ...with this pause after each (a slow server)
    ignore_range: bool = False  # answer 200 with the whole file to a Range request
    head_status: int | None = None  # answer HEAD with this status (405: a server that refuses HEAD)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take_drop(self) -> int | None:
        """The byte count at which this body is cut, or None; counts the drop."""
        with self._lock:
            if self.drop_after_bytes is None or self.drops_left == 0:
                return None
            if self.drops_left is not None:
                self.drops_left -= 1
            return self.drop_after_bytes

    @property
    def active(self) -> bool:
        return self.wrong_bytes or self.chunk_delay_s > 0 or (self.drop_after_bytes is not None and self.drops_left != 0)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def file_name(self) -> str:
        return unquote(urlsplit(self.path).path.rsplit("/", 1)[-1])


class FaultyFileRequestHandler(FileRequestHandler):
    """The product's handler, plus recording and the faults of `server.faults`."""

    server: "RecordingFileServer"

    def do_HEAD(self) -> None:  # noqa: N802
        self._record()
        if self.server.faults.head_status is not None:
            return self._plain(self.server.faults.head_status, "HEAD refused")
        super().do_HEAD()

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        self._apply_ignore_range()
        super().do_GET()

    def _apply_ignore_range(self) -> None:
        if self.server.faults.ignore_range and "Range" in self.headers:
            del self.headers["Range"]

    def send_body(self, f, offset: int, count: int) -> None:
        faults = self.server.faults
        if not faults.active:
            return super().send_body(f, offset, count)
        cut = faults.take_drop()
        limit = count if cut is None else min(count, cut)
        f.seek(offset)
        sent = 0
        try:
            while sent < limit:
                data = f.read(min(faults.chunk_bytes, limit - sent))
                if not data:
                    break
                self.wfile.write(data.translate(_FLIP) if faults.wrong_bytes else data)
                sent += len(data)
                if faults.chunk_delay_s:
                    time.sleep(faults.chunk_delay_s)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        if sent < count:
            self.close_connection = True  # the reader sees the body end early

    def _record(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.requests.append(RecordedRequest(self.command, self.path, headers))

    def _plain(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        self._reply(status, message, dict(headers or {}))  # the product's plain-text answer


class RecordingFileServer(FileServer):
    """A FileServer on 127.0.0.1 that records every request and applies `faults`."""

    def __init__(self, resolve: Callable[[str], Path], key: str | None, faults: Faults,
                 handler: type[FaultyFileRequestHandler] = FaultyFileRequestHandler) -> None:
        super().__init__(LOOPBACK, 0, resolve, key, handler=handler)
        self.faults = faults
        self.requests: list[RecordedRequest] = []

    def start(self) -> "RecordingFileServer":
        # As FileServer.start, polling for shutdown often so that tests stop their servers at once.
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="test-file-server", daemon=True)
        self._thread.start()
        return self

    def file_url(self, name: str) -> str:
        return f"{self.url}/files/{quote(name)}"

    def gets(self, name: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "GET" and (name is None or r.file_name == name)]

    def ranges(self, name: str | None = None) -> list[str | None]:
        """The Range header of each GET (None: a request for the whole file), in order."""
        return [r.range for r in self.gets(name)]


def directory_resolver(root: str | Path) -> Callable[[str], Path]:
    root = Path(root)

    def resolve(name: str) -> Path:
        path = root / name
        if not is_store_name(name) or not path.is_file():
            raise ValueError(f"no file {name!r}")
        return path

    return resolve


def mapping_resolver(paths: Mapping[str, Path]) -> Callable[[str], Path]:
    def resolve(name: str) -> Path:
        if name not in paths:
            raise ValueError(f"no file {name!r}")
        return paths[name]

    return resolve


@contextmanager
def static_server(root_dir: str | Path, key: str | None = None, resolve: Callable[[str], Path] | None = None,
                  **faults) -> Iterator[RecordingFileServer]:
    """Serve the files of `root_dir` by name at `/files/NAME` on 127.0.0.1 (a free port).

    `key`: the bearer key clients must send. `faults`: the fields of `Faults`
    (drop_after_bytes, drops_left, wrong_bytes, chunk_delay_s, ignore_range, head_status).
    """
    server = RecordingFileServer(resolve or directory_resolver(root_dir), key, Faults(**faults)).start()
    try:
        yield server
    finally:
        server.stop()


# ---- a fake Hugging Face Hub --------------------------------------------------------------

HubFiles = Mapping[tuple[str, str, str], Path]  # (repo_id, revision, filename) -> local file


def fake_commit(repo_id: str, revision: str) -> str:
    """The 40-hex commit the fake hub reports for a repository's revision."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


@dataclass(frozen=True)
class _HubFile:
    path: Path
    sha256: str
    size: int


class FakeHubHandler(FaultyFileRequestHandler):
    """`HEAD|GET /{repo_id}/resolve/{revision}/{filename}` the way the Hub answers for LFS files.

    Found: `X-Repo-Commit`, `X-Linked-Etag` and `ETag` (the quoted sha256), `X-Linked-Size`,
    `Content-Length`; the body with Range support, or (cdn=True) a 302 to the fake CDN, like
    the real Hub's redirect to its storage. Not found: 401 + `X-Error-Code: RepoNotFound` for
    an unknown repository or a wrong token, 404 + `RevisionNotFound` / `EntryNotFound`.
    """

    server: "FakeHubServer"

    def do_HEAD(self) -> None:  # noqa: N802
        self._hub(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._hub(body=True)

    def end_headers(self) -> None:
        for k, v in getattr(self, "_hub_headers", {}).items():
            self.send_header(k, v)
        super().end_headers()

    def _hub(self, body: bool) -> None:
        self._hub_headers: dict[str, str] = {}
        self._record()
        hub = self.server
        path = urlsplit(self.path).path
        repo_id, sep, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo_id, revision, filename = unquote(repo_id), unquote(revision), unquote(filename)
        if not sep or not filename:
            return self._plain(404, "not a resolve route")
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._plain(401, "Invalid username or password.",
                               {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid username or password."})
        known = hub.files
        if not any(r == repo_id for r, _, _ in known):
            return self._plain(401, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if not any(r == repo_id and v == revision for r, v, _ in known):
            return self._plain(404, "Revision not found", {"X-Error-Code": "RevisionNotFound"})
        found = known.get((repo_id, revision, filename))
        if found is None:
            return self._plain(404, "Entry not found", {"X-Error-Code": "EntryNotFound"})
        etag = f'"{found.sha256}"' if hub.lfs else f'"{hashlib.sha1(found.path.read_bytes()).hexdigest()}"'
        self._hub_headers = {"X-Repo-Commit": fake_commit(repo_id, revision), "ETag": etag}
        if hub.lfs:
            self._hub_headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(found.size)}
        if hub.cdn is not None:
            location = f"{hub.cdn.file_url(found.sha256)}?X-Amz-Signature=fake"
            return self._plain(302, f"Found. Redirecting to {location}", {"Location": location})
        self.path = f"/files/{found.sha256}"  # the product handler serves it, Range and all
        if body:
            self._apply_ignore_range()
            FileRequestHandler.do_GET(self)
        else:
            FileRequestHandler.do_HEAD(self)


class FakeHubServer(RecordingFileServer):
    def __init__(self, files: HubFiles, token: str | None, lfs: bool, cdn: RecordingFileServer | None,
                 faults: Faults) -> None:
        self.files = {key: _describe(path) for key, path in files.items()}
        super().__init__(mapping_resolver({f.sha256: f.path for f in self.files.values()}), None, faults,
                         handler=FakeHubHandler)
        self.token = token
        self.lfs = lfs
        self.cdn = cdn

    @property
    def resolves(self) -> list[RecordedRequest]:
        """Requests to the resolve route only (huggingface_hub also asks the endpoint other things,
        e.g. once per process `GET /api/agent-harnesses`, answered 404 here)."""
        return [r for r in self.requests if "/resolve/" in r.path]

    def gets(self, name: str | None = None) -> list[RecordedRequest]:
        return [r for r in super().gets(name) if "/resolve/" in r.path]

    def resolve_url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        return f"{self.url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def _describe(path: Path) -> _HubFile:
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return _HubFile(path, digest.hexdigest(), path.stat().st_size)


@contextmanager
def fake_hf_endpoint(files: HubFiles, token: str | None = None, lfs: bool = True, cdn: bool = False,
                     **faults) -> Iterator[FakeHubServer]:
    """A local Hub answering the resolve route for `files` {(repo_id, revision, filename): path}.

    `token`: the one token it accepts (None: any request is served). `lfs=False`: files
    answer as plain git files (ETag a 40-hex git hash, no X-Linked-*). `cdn=True`: resolve
    answers 302 to a second server (another port, so another origin), `hub.cdn`, which
    records what reaches it. `faults`: the fields of `Faults`, for the hub's bodies.
    """
    cdn_server = None
    if cdn:
        by_sha = {_describe(p).sha256: Path(p) for p in files.values()}
        cdn_server = RecordingFileServer(mapping_resolver(by_sha), None, Faults()).start()
    hub = FakeHubServer(files, token, lfs, cdn_server, Faults(**faults)).start()
    try:
        yield hub
    finally:
        hub.stop()
        if cdn_server is not None:
            cdn_server.stop()
