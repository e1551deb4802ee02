"""`homefleet events`: what the fleet did and why, one line each, from `GET /api/events`;
`--follow` keeps printing new ones (it polls with `since=`) until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

import httpx

from orchestrator.commands.gateway_client import DEFAULT_URL, GatewayError, call, gateway_url

FOLLOW_INTERVAL_S = 2.0
PAGE_LIMIT = 500  # the most one answer holds (orchestrator/event_log.py keeps as many)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "events",
        help="print what the fleet did and why (placed, copied, loaded, evicted, node gone...)",
        description="Print the fleet's events, oldest first: time, kind, model, node and why. "
        "With --follow, keep printing new ones until Ctrl-C.",
    )
    p.add_argument("--url", help=f"gateway base URL (default: $HOMEFLEET_URL, else {DEFAULT_URL})")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    p.add_argument("-n", "--limit", type=int, default=50, metavar="N",
                   help="print the latest N events first (default: 50; 0: only new ones with --follow)")
    p.add_argument("--interval", type=float, default=FOLLOW_INTERVAL_S, metavar="SECONDS",
                   help=f"with --follow: how often to ask for new events (default: {FOLLOW_INTERVAL_S:g})")
    p.add_argument("--json", action="store_true", help="print each event as one JSON line")
    p.add_argument("--api-key", metavar="KEY", help="API key for a gateway on another machine")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    url = gateway_url(args.url)
    if args.limit < 0 or args.limit > PAGE_LIMIT:
        print(f"homefleet events: --limit takes 0 to {PAGE_LIMIT}", file=sys.stderr)
        return 2
    printer = (lambda e: json.dumps(e)) if args.json else format_event
    try:
        page = fetch_events(url, args.api_key, None, max(1, args.limit), transport)
    except GatewayError as exc:
        print(f"homefleet events: {exc}", file=sys.stderr)
        return 1
    for event in page["events"][-args.limit:] if args.limit else []:
        print(printer(event), file=out, flush=True)
    if not args.follow:
        return 0
    try:
        follow(url, args.api_key, page["last_id"], lambda e: print(printer(e), file=out, flush=True),
               args.interval, transport, sleep)
    except KeyboardInterrupt:
        pass
    return 0


def fetch_events(url: str, api_key: str | None, since: int | None, limit: int = PAGE_LIMIT,
                 transport: httpx.BaseTransport | None = None) -> dict:
    query = f"?limit={limit}" + (f"&since={since}" if since is not None else "")
    return call(url, "GET", f"/api/events{query}", api_key, transport=transport)


def follow(url: str, api_key: str | None, since: int, show: Callable[[dict], None], interval_s: float,
           transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Show each event newer than `since` as it comes, until interrupted. A gateway that stops
    answering is said once, then waited for (a restarted one's ids go on above the old ones:
    it then answers from its first event)."""
    lost = False
    while True:
        try:
            page = fetch_events(url, api_key, since, PAGE_LIMIT, transport)
        except GatewayError as exc:
            if not lost:
                print(f"homefleet events: {exc}; still trying", file=sys.stderr, flush=True)
            lost = True
            sleep(interval_s)
            continue
        lost = False
        for event in page["events"]:
            show(event)
        since = page["last_id"]
        if len(page["events"]) < PAGE_LIMIT:
            sleep(interval_s)


def format_event(event: dict) -> str:
    """'2026-11-30 03:45:12  loaded        gemma  desktop  gemma#0 ready in 1.2 s'."""
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
    model = event.get("model") or "*"
    node = event.get("node") or "-"
    return f"{at}  {event['kind']:<13} {model:<16} {node:<12} {event.get('reason') or ''}".rstrip()
