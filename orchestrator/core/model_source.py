"""Where a model file comes from, and what it is called in a node's store.

A config `url` or a `homefleet pull SOURCE` is one of:
- an http(s) URL;
- `hf://OWNER/REPO/PATH/FILE.gguf[@REVISION]`, a file of a Hugging Face repository;
- a bare file name that some node's store holds (`pull` only).
Pure: parsing and naming, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

# A name in a store: one path component, no leading dot (our own sidecars are hidden files).
STORE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+\-]{0,254}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_HF_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


class SourceError(ValueError):
    """A source string that names no file we can fetch; the message says why."""


@dataclass(frozen=True)
class HttpSource:
    url: str

    @property
    def file_name(self) -> str:
        return store_name_for(unquote(PurePosixPath(urlparse(self.url).path).name) or "model.gguf")

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class HfSource:
    repo_id: str  # OWNER/REPO
    filename: str  # path inside the repository
    revision: str | None = None

    @property
    def file_name(self) -> str:
        return store_name_for(PurePosixPath(self.filename).name)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}/{self.filename}{rev}"


@dataclass(frozen=True)
class StoreSource:
    """A file that a node's store holds, by its name there."""

    name: str

    @property
    def file_name(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


Source = HttpSource | HfSource | StoreSource


def parse_url(text: str) -> HttpSource | HfSource:
    """A config `url`: http(s) or hf://."""
    source = parse_source(text)
    if isinstance(source, StoreSource):
        raise SourceError(f"{text!r} is not a URL: use http://, https:// or hf://OWNER/REPO/FILE.gguf")
    return source


def parse_source(text: str) -> Source:
    text = text.strip()
    if text.startswith("hf://"):
        return _parse_hf(text)
    parsed = urlparse(text)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise SourceError(f"{text!r}: a URL needs a host")
        return HttpSource(text)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise SourceError(f"{text!r}: unsupported scheme {parsed.scheme!r} (http, https or hf)")
    if not is_store_name(text):
        raise SourceError(
            f"{text!r} is neither a URL (http://, https://, hf://OWNER/REPO/FILE.gguf) nor a file name "
            "in a node's store (letters, digits, '.', '_', '+', '-'; no slashes)"
        )
    return StoreSource(text)


def _parse_hf(text: str) -> HfSource:
    body = text[len("hf://"):]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision:
            raise SourceError(f"{text!r}: empty revision after '@'")
    parts = [p for p in body.split("/")]
    if len(parts) < 3 or not all(parts):
        raise SourceError(f"{text!r}: expected hf://OWNER/REPO/FILE.gguf[@REVISION]")
    owner, repo, *path = parts
    if not (_HF_REPO_PART.match(owner) and _HF_REPO_PART.match(repo)):
        raise SourceError(f"{text!r}: {owner}/{repo} is not a repository id")
    if any(p in (".", "..") for p in path):
        raise SourceError(f"{text!r}: the file path may not contain '.' or '..'")
    return HfSource(f"{owner}/{repo}", "/".join(path), revision)


def is_store_name(name: str) -> bool:
    return bool(STORE_NAME_PATTERN.match(name)) and name not in (".", "..")


def store_name_for(file_name: str) -> str:
    """A safe store name for a file name from a URL or a path: unsafe characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9._+\-]", "_", file_name).lstrip(".") or "model.gguf"
    return name[:255]


def alternate_name(name: str, sha256: str) -> str:
    """The name a copy takes when the store already holds a different file under `name`."""
    path = PurePosixPath(name)
    return f"{path.stem}-{sha256[:12]}{path.suffix}"


def normalize_sha256(value: str) -> str:
    value = value.strip().lower().removeprefix("sha256:")
    if not SHA256_PATTERN.match(value):
        raise SourceError("must be 64 hexadecimal digits (a SHA-256)")
    return value
