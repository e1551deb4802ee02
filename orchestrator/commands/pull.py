"""`homefleet pull SOURCE`: fetch a model file into a node's store ahead of time, with progress.

Without --node or --url, a URL or hf:// name is downloaded into this machine's store;
with them, the running cluster's node NAME (the head by default) fetches it, and a file
name that some node holds is copied from there. An interrupted pull resumes where it was.
"""

from __future__ import annotations

import argparse
import sys
import time

from orchestrator.commands.gateway_client import ADMIN_KEY_HINT, GatewayError, admin_key, call, gateway_url
from orchestrator.core.hardware import format_bytes
from orchestrator.core.model_source import SourceError, StoreSource, normalize_sha256, parse_source
from orchestrator.core.store_types import TransferProgress

POLL_S = 0.5


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pull",
        help="fetch a model file into a node's store, with progress",
        description="Fetch SOURCE (an http(s) URL, hf://OWNER/REPO/FILE.gguf[@REVISION], or the name of a file "
        "another node holds) into a node's models dir. Interrupted pulls resume; the file is verified by "
        "SHA-256 and appears under its name only when complete.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--node", help="the node whose store gets the file (through the gateway; default: the head)")
    p.add_argument("--url", help="gateway base URL: pull through the running cluster (default for --node: "
                   "$HOMEFLEET_URL, else http://127.0.0.1:8000)")
    p.add_argument("--sha256", help="expected SHA-256 of the file")
    p.add_argument("--models-dir", metavar="DIR", help="store to download into, without --node/--url "
                   "(default: ~/.local/share/homefleet/models)")
    p.add_argument("--api-key", metavar="KEY", help="API key for a gateway on another machine")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        source = parse_source(args.source)
        sha256 = normalize_sha256(args.sha256) if args.sha256 else None
    except SourceError as exc:
        print(f"homefleet pull: {exc}", file=sys.stderr)
        return 2
    printer = ProgressPrinter(sys.stderr)
    if args.node or args.url:
        return _pull_through_gateway(args, sha256, printer)
    if isinstance(source, StoreSource):
        print(f"homefleet pull: {args.source} names a file a node holds: pass --node NAME (and --url URL when "
              "the gateway is not on this machine) to copy it there", file=sys.stderr)
        return 2
    return _pull_here(args, sha256, printer)


def _pull_here(args: argparse.Namespace, sha256: str | None, printer: "ProgressPrinter") -> int:
    from worker.sources import pull_into_store
    from worker.store import ModelStore, default_models_dir
    from worker.transfer import TransferFailed

    store = ModelStore(args.models_dir or default_models_dir())
    try:
        stored = pull_into_store(args.source, store, sha256=sha256, on_progress=printer.show)
    except (TransferFailed, ValueError, OSError) as exc:
        printer.done()
        print(f"homefleet pull: {exc}", file=sys.stderr)
        return 1
    printer.done()
    print(f"{stored.path}  {format_bytes(stored.size_bytes)}  sha256 {stored.sha256}")
    return 0


def _pull_through_gateway(args: argparse.Namespace, sha256: str | None, printer: "ProgressPrinter") -> int:
    url = gateway_url(args.url)
    try:
        started = call(url, "POST", "/api/pull", admin_key() or args.api_key,
                       {"source": args.source, "node": args.node, "sha256": sha256}, timeout_s=60,
                       key_hint=ADMIN_KEY_HINT)
    except GatewayError as exc:
        print(f"homefleet pull: {exc}", file=sys.stderr)
        return 1
    node, transfer_id = started["node"], started["transfer_id"]
    print(f"homefleet pull: {started['name']} -> {node}", file=sys.stderr)
    try:
        while True:
            try:
                progress = TransferProgress.model_validate(
                    call(url, "GET", f"/api/transfers/{transfer_id}", args.api_key))
            except GatewayError as exc:
                printer.done()
                print(f"homefleet pull: {exc}", file=sys.stderr)
                return 1
            printer.show(progress)
            if not progress.active:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        printer.done()
        print(f"homefleet pull: the transfer goes on on {node} (`homefleet status` shows it)", file=sys.stderr)
        return 130
    printer.done()
    if progress.state != "done":
        print(f"homefleet pull: {progress.state}: {progress.error or ''}", file=sys.stderr)
        return 1
    print(f"{node}:{progress.path}  {format_bytes(progress.total_bytes)}  sha256 {progress.sha256}")
    return 0


def progress_line(p: TransferProgress) -> str:
    """'copying  45%  230 MiB / 512 MiB  112 MiB/s  ETA 3 s  from desktop'."""
    parts = [p.state]
    if p.percent is not None:
        parts.append(f"{p.percent:3.0f}%")
    total = f" / {format_bytes(p.total_bytes)}" if p.total_bytes else ""
    parts.append(f"{format_bytes(p.bytes_done)}{total}")
    if p.rate_bytes_per_s:
        parts.append(f"{format_bytes(p.rate_bytes_per_s)}/s")
    if p.eta_s is not None and p.active:
        parts.append(f"ETA {p.eta_s:.0f} s")
    if p.source:
        parts.append(f"from {p.source}")
    if p.attempt > 1:
        parts.append(f"attempt {p.attempt}")
    return "  ".join(parts)


class ProgressPrinter:
    """One line redrawn in place on a terminal; a line every few seconds in a log."""

    def __init__(self, stream, every_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._width = 0

    def show(self, progress: TransferProgress) -> None:
        line = progress_line(progress)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        elif now - self._last >= self.every_s or not progress.active:
            self.stream.write(line + "\n")
            self._last = now
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
