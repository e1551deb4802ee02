"""Turn a model's `url` (http(s) or hf://) into something a Transfer can fetch.

`resolve_source` asks the server what the file is before any byte moves: its size, and for
a Hugging Face file its SHA-256 (the LFS etag) and where it really lives (the Hub answers
with a redirect to its storage). Hugging Face is spoken through `huggingface_hub`, so
HF_ENDPOINT, HF_TOKEN and the Hub's headers behave as they do for its own downloads.

`pull_into_store` is `homefleet pull URL` on the local machine: resolve, transfer, verify.
`read_remote_gguf_header` reads a remote GGUF's header from its first bytes only.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from orchestrator.core.gguf_file import GGUFHeader, GGUFTruncated, parse_gguf_prefix
from orchestrator.core.model_source import HfSource, HttpSource, SourceError, normalize_sha256, parse_url
from orchestrator.core.store_types import StoredFile, TransferProgress
from worker.store import ModelStore
from worker.transfer import Source, Transfer, TransferFailed, TransferSpec

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
HEADER_FIRST_BYTES = 8 << 20
HEADER_MAX_BYTES = 256 << 20
_SHA256_ETAG = re.compile(r"^[0-9a-f]{64}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class SourceUnavailable(ValueError):
    """The source cannot be fetched (not found, refused, unreachable); the message names it."""


@dataclass(frozen=True)
class ResolvedSource:
    url: str  # where the bytes are fetched
    headers: dict[str, str] = field(default_factory=dict)
    label: str = ""  # what users see: the URL or hf://...
    sha256: str | None = None  # known before downloading (a Hub LFS file), else None
    size_bytes: int | None = None

    def as_transfer_source(self) -> Source:
        return Source(label=self.label or self.url, url=self.url, headers=dict(self.headers), kind="download")


def resolve_source(source: HttpSource | HfSource, timeout_s: float = 30) -> ResolvedSource:
    """What the file at `source` is and where to fetch it; SourceUnavailable when it cannot be had."""
    if isinstance(source, HfSource):
        return _resolve_hf(source, timeout_s)
    return _resolve_http(source, timeout_s)


# ---- http(s) ----------------------------------------------------------------------------
def _resolve_http(source: HttpSource, timeout_s: float) -> ResolvedSource:
    url = source.url
    try:
        with httpx.Client(follow_redirects=True, timeout=timeout_s) as client:
            response = client.head(url, headers={"Accept-Encoding": "identity"})
            if response.is_success:
                size = _int_or_none(response.headers.get("Content-Length"))
            else:  # some servers (and signed storage URLs) refuse HEAD: ask for one byte instead
                with client.stream("GET", url, headers={"Range": "bytes=0-0", "Accept-Encoding": "identity"}) as got:
                    if not got.is_success:
                        raise SourceUnavailable(f"{url}: HTTP {got.status_code} {got.reason_phrase}"
                                                f"{_status_hint(got.status_code)}")
                    size = _size_of(got)
    except httpx.HTTPError as exc:
        raise SourceUnavailable(f"{url}: cannot connect ({exc or type(exc).__name__})") from None
    return ResolvedSource(url=url, headers={}, label=url, sha256=None, size_bytes=size)


def _size_of(response: httpx.Response) -> int | None:
    """The file's full size from a (ranged) GET's headers."""
    if response.status_code == 206:
        total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return _int_or_none(response.headers.get("Content-Length"))


def _status_hint(status: int) -> str:
    if status in (401, 403):
        return " (the server wants credentials this URL does not carry)"
    if status == 404:
        return " (no file at this URL)"
    return ""


# ---- Hugging Face ----------------------------------------------------------------------
def _resolve_hf(source: HfSource, timeout_s: float) -> ResolvedSource:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers

    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is imported.
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    revision = source.revision or "main"
    where = f"{source}: {source.repo_id} at {revision} on {endpoint}"
    try:
        url = hf_hub_url(source.repo_id, source.filename, revision=source.revision, endpoint=endpoint)
        metadata = get_hf_file_metadata(url, token=None, timeout=timeout_s, endpoint=endpoint)
        headers = build_hf_headers()  # with `authorization` when HF_TOKEN is set
    except GatedRepoError:
        raise SourceUnavailable(f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SourceUnavailable(f"{where}: no such repository, or it is private or gated and needs HF_TOKEN "
                                "(a token with access to it)") from None
    except RevisionNotFoundError:
        raise SourceUnavailable(f"{where}: no revision {revision!r} in {source.repo_id}") from None
    except EntryNotFoundError:
        raise SourceUnavailable(f"{where}: no file {source.filename!r} in the repository") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        raise SourceUnavailable(f"{where}: the Hub answered HTTP {status}") from None
    except HFValidationError as exc:
        raise SourceUnavailable(f"{source}: {exc}") from None
    except (OSError, *_hub_transport_errors()) as exc:
        raise SourceUnavailable(f"{where}: cannot reach the Hub ({exc or type(exc).__name__})") from None
    # Fetch from the resolve URL, not the signed storage URL it redirects to (that one
    # expires, and a copy may start long after this); redirects drop the token off the Hub.
    final_url = url
    if _origin(final_url) != _origin(endpoint):
        # Storage the Hub redirects to gets signed URLs, never the token.
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    etag = (metadata.etag or "").lower()
    return ResolvedSource(url=final_url, headers=headers, label=str(source),
                          sha256=etag if _SHA256_ETAG.match(etag) else None, size_bytes=metadata.size)


def _hub_transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client errors huggingface_hub lets through (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [httpx.HTTPError]
    try:
        import httpx2

        errors.append(httpx2.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


# ---- a remote GGUF header ------------------------------------------------------------------
def read_remote_gguf_header(resolved: ResolvedSource, first_bytes: int = HEADER_FIRST_BYTES,
                            max_bytes: int = HEADER_MAX_BYTES, timeout_s: float = 30) -> GGUFHeader:
    """The GGUF header of a remote file, from Range requests for its first bytes only.

    Starts with `first_bytes` and doubles while the header runs past them, up to `max_bytes`
    (a 262k-token vocabulary takes a few MiB). GGUFError when it is not a GGUF file or the
    header is longer than `max_bytes`; SourceUnavailable when the bytes cannot be had.
    """
    want = min(first_bytes, max_bytes)
    with httpx.Client(follow_redirects=True, timeout=timeout_s, headers=resolved.headers) as client:
        while True:
            prefix, file_bytes = _fetch_prefix(client, resolved, want)
            try:
                return parse_gguf_prefix(prefix, resolved.label or resolved.url, file_bytes)
            except GGUFTruncated:
                if len(prefix) >= file_bytes or want >= max_bytes:
                    raise
                want = min(2 * want, max_bytes)


def _fetch_prefix(client: httpx.Client, resolved: ResolvedSource, want: int) -> tuple[bytes, int]:
    label = resolved.label or resolved.url
    buf = bytearray()
    try:
        with client.stream("GET", resolved.url, headers={"Range": f"bytes=0-{want - 1}",
                                                           "Accept-Encoding": "identity"}) as response:
            if not response.is_success:
                raise SourceUnavailable(f"{label}: HTTP {response.status_code} {response.reason_phrase}"
                                        f"{_status_hint(response.status_code)}")
            file_bytes = _size_of(response) or resolved.size_bytes
            for chunk in response.iter_bytes():  # a server that ignores Range: stop at `want`
                buf += chunk
                if len(buf) >= want:
                    break
            ended = len(buf) < want
    except httpx.HTTPError as exc:
        raise SourceUnavailable(f"{label}: cannot read its first bytes ({exc or type(exc).__name__})") from None
    if file_bytes is None:
        if not ended:
            raise SourceUnavailable(f"{label}: the server does not say how large the file is")
        file_bytes = len(buf)
    return bytes(buf[:want]), file_bytes


# ---- homefleet pull ------------------------------------------------------------------------
def pull_into_store(source_text: str, store: ModelStore, sha256: str | None = None,
                    on_progress: Callable[[TransferProgress], None] | None = None,
                    transfer_id: str | None = None) -> StoredFile:
    """Fetch the file at `source_text` (http(s) or hf://) into `store`, verified; the stored file.

    `sha256` pins the expected hash (else the Hub's, for an LFS file; else whatever arrives
    is recorded). A pin that disagrees with the Hub fails before any byte moves. Raises
    SourceError / SourceUnavailable (ValueError) for a source that cannot be had, and
    TransferFailed / TransferCancelled from the transfer; an interrupted pull resumes
    where it stopped the next time.
    """
    source = parse_url(source_text)
    pin = None
    if sha256:
        try:
            pin = normalize_sha256(sha256)
        except ValueError as exc:
            raise SourceError(f"sha256 {sha256!r} for {source}: {exc}") from None
    resolved = resolve_source(source)
    if pin and resolved.sha256 and pin != resolved.sha256:
        raise TransferFailed(
            f"{source}: the sha256 pinned ({pin}) is not the one the Hub reports ({resolved.sha256}); "
            "nothing was downloaded"
        )
    spec = TransferSpec(
        transfer_id=transfer_id or f"pull-{uuid.uuid4().hex[:12]}",
        name=source.file_name,
        sources=(resolved.as_transfer_source(),),
        sha256=pin or resolved.sha256,
        size_bytes=resolved.size_bytes,
    )
    return Transfer(store, spec, on_progress=on_progress).run()
