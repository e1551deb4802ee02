"""`homefleet status`: ask a running gateway for `GET /api/cluster` and print it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import httpx

from orchestrator.commands.gateway_client import DEFAULT_URL, GatewayError, call, fetch_view
from orchestrator.status_report import render_status



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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("HOMEFLEET_URL") or DEFAULT_URL).rstrip("/")
    api_key = args.api_key or os.environ.get("HOMEFLEET_API_KEY") or None
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


def fetch_cluster(url: str, api_key: str | None, transport: httpx.BaseTransport | None = None) -> dict:
    """The JSON of {url}/api/cluster; StatusError with a readable message on any failure."""
    try:
        return call(url, "GET", "/api/cluster", api_key, transport=transport)
    except GatewayError as exc:
        raise StatusError(str(exc)) from exc
