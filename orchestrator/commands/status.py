"""`homefleet status`: ask a running gateway for `GET /api/cluster` and print it.

`--watch` asks again every `--interval` seconds until Ctrl-C (exit 0). On a terminal each
frame is drawn over the last (cursor home, no blank flash); on a pipe or a file the frames
follow one another as plain text, without escape codes. A failed request is shown in the
frame and asked again: the gateway may be restarting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

import httpx

from orchestrator.commands.gateway_client import DEFAULT_URL, GatewayError, call, fetch_view
from orchestrator.status_report import HIDE_CURSOR, SHOW_CURSOR, render_status, watch_frame

DEFAULT_INTERVAL_S = 2.0
MIN_INTERVAL_S = 0.2



class StatusError(Exception):
    """Why no cluster view came back, in words fit for the terminal."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show nodes and models of a running cluster",
        description="Show the nodes (hardware, live use) and models (node, GPU/CPU split, memory, "
        "state, reason) of a running homefleet gateway.",
    )
    parser.add_argument(
        "--url",
        default=None,
        help=f"gateway base URL (default: $HOMEFLEET_URL, else {DEFAULT_URL})",
    )
    parser.add_argument("--json", action="store_true", help="print the raw /api/cluster JSON instead of tables")
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="API key, needed when the gateway is not on this machine (default: $HOMEFLEET_API_KEY)",
    )
    parser.add_argument("--watch", "-w", action="store_true",
                        help="refresh in place until Ctrl-C (on a pipe: print a new frame each interval)")
    parser.add_argument("--interval", "-n", type=_interval, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                        help=f"seconds between refreshes with --watch (default {DEFAULT_INTERVAL_S:g})")
    parser.set_defaults(func=run)


def _interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds >= MIN_INTERVAL_S:  # also refuses nan
        raise argparse.ArgumentTypeError(f"at least {MIN_INTERVAL_S:g} seconds, got {text}")
    return seconds


def run(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("HOMEFLEET_URL") or DEFAULT_URL).rstrip("/")
    api_key = args.api_key or os.environ.get("HOMEFLEET_API_KEY") or None
    if getattr(args, "watch", False):
        return watch(lambda: _frame_text(url, api_key, args.json), f"homefleet status {url}",
                     getattr(args, "interval", DEFAULT_INTERVAL_S), sys.stdout)
    try:
        payload, view = fetch_view(url, api_key)
    except GatewayError as exc:
        print(f"homefleet status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        sys.stdout.write(render_status(view, color=color, width=shutil.get_terminal_size().columns))
    return 0


def _frame_text(url: str, api_key: str | None, as_json: bool) -> str:
    """What one refresh shows: the tables (or the JSON on one line), else why there is none."""
    try:
        payload, view = fetch_view(url, api_key)
    except GatewayError as exc:
        return f"{exc}\n(asking again)"
    if as_json:
        return json.dumps(payload)
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return render_status(view, color=color, width=shutil.get_terminal_size().columns)


def watch(
    frame_text: Callable[[], str], title: str, interval_s: float, out: TextIO,
    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time, frames: int | None = None,
) -> int:
    """Draw `frame_text()` every `interval_s` until Ctrl-C (or `frames` frames): exit code 0."""
    in_place = out.isatty()
    if in_place:
        out.write(HIDE_CURSOR)
    drawn = 0
    try:
        while frames is None or drawn < frames:
            started = clock()
            stamp = time.strftime("%H:%M:%S", time.localtime(started))
            out.write(watch_frame(frame_text(), f"{title}  every {interval_s:g}s  {stamp}", in_place))
            out.flush()
            drawn += 1
            if frames is None or drawn < frames:
                sleep(max(0.0, interval_s - (clock() - started)))
    except KeyboardInterrupt:
        pass
    finally:
        if in_place:
            out.write(SHOW_CURSOR)
            out.flush()
    return 0


def fetch_cluster(url: str, api_key: str | None, transport: httpx.BaseTransport | None = None) -> dict:
    """The JSON of {url}/api/cluster; StatusError with a readable message on any failure."""
    try:
        return call(url, "GET", "/api/cluster", api_key, transport=transport)
    except GatewayError as exc:
        raise StatusError(str(exc)) from exc
