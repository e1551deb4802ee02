"""`homefleet load NAME`, `homefleet unload NAME`, `homefleet reload`, `homefleet drain NODE`,
`homefleet undrain NODE`: change what a running fleet serves, and where, without restarting
it, through the gateway's admin API.

Off the head's loopback these need the admin key: --admin-key, else $HOMEFLEET_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import sys
import time
from urllib.parse import quote

import httpx

from orchestrator.commands.gateway_client import ADMIN_KEY_HINT, GatewayError, admin_key, call, gateway_url
from orchestrator.config_reload import describe_reload
from orchestrator.drain_channel import describe_drain

# A load may copy a file of tens of GB first; an unload waits for the model's requests to finish.
LOAD_WAIT_S = 3600.0
QUICK_S = 60.0
UNLOAD_S = 900.0
DRAIN_MARGIN_S = 60.0  # beyond the drain's own timeout: the answer comes when it ends


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "load", help="load a configured model now, without a restart",
        description="Place, copy (if its node lacks the file) and load the configured model NAME; by default "
        "wait until it is ready.",
    )
    p.add_argument("name", metavar="NAME", help="the model's name in the config")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return once the load has started")
    _gateway_flags(p)
    p.set_defaults(func=run_load)

    p = subparsers.add_parser(
        "unload", help="unload a model once its requests finish",
        description="Stop the replicas of model NAME once their requests finish (an on-demand model loads "
        "again at its next request).",
    )
    p.add_argument("name", metavar="NAME", help="the model's name in the config")
    _gateway_flags(p)
    p.set_defaults(func=run_unload)

    p = subparsers.add_parser(
        "reload", help="re-read the config file, as SIGHUP to `homefleet up` does",
        description="Re-read the config file `homefleet up` was started with: new models are added, removed "
        "ones unloaded after their requests finish, changed ones reloaded. A config error names the field "
        "and changes nothing.",
    )
    _gateway_flags(p)
    p.set_defaults(func=run_reload)

    p = subparsers.add_parser(
        "drain", help="move a node's models elsewhere and stop sending it work (before it sleeps or leaves)",
        description="No new work goes to node NODE: its models are started on other nodes first where they fit "
        "(make-before-break), its requests in flight finish (up to --timeout), then what is left there stops. "
        "The node stays drained until `homefleet undrain NODE` or until it joins again.",
    )
    p.add_argument("node", metavar="NODE", help="the node's name, as `homefleet status` shows it")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="longest wait for its requests and moves, in seconds (default 60)")
    _gateway_flags(p)
    p.set_defaults(func=run_drain)

    p = subparsers.add_parser(
        "undrain", help="let a drained node take work again",
        description="Placement may use node NODE again (after `homefleet drain NODE`).",
    )
    p.add_argument("node", metavar="NODE", help="the node's name")
    _gateway_flags(p)
    p.set_defaults(func=run_undrain)


def _gateway_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway base URL (default: $HOMEFLEET_URL, else http://127.0.0.1:8000)")
    p.add_argument("--admin-key", metavar="KEY", help="admin key for a gateway on another machine "
                   "(default: $HOMEFLEET_ADMIN_KEY)")


def _admin_call(args: argparse.Namespace, path: str, body: dict | None, timeout_s: float, transport) -> dict:
    return call(gateway_url(args.url), "POST", path, admin_key(args.admin_key), body, transport=transport,
                timeout_s=timeout_s, key_hint=ADMIN_KEY_HINT)


def run_load(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    started = time.monotonic()
    try:
        answer = _admin_call(args, f"/api/models/{quote(args.name, safe='')}/load", {"wait": args.wait},
                             LOAD_WAIT_S if args.wait else QUICK_S, transport)
    except GatewayError as exc:
        print(f"homefleet load: {exc}", file=sys.stderr)
        return 1
    line = load_line(answer, time.monotonic() - started, args.wait)
    ok = answer.get("state") == "ready" or (not args.wait and answer.get("state") != "failed")
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def load_line(answer: dict, elapsed_s: float, waited: bool) -> str:
    """'chat loaded on laptop-1 in 3.2 s', 'chat loading on laptop-1', 'chat failed: reason'."""
    model, state, node = answer.get("model", "?"), answer.get("state", "?"), answer.get("node")
    where = f" on {node}" if node else ""
    if state == "ready":
        return f"{model} loaded{where} in {elapsed_s:.1f} s" if waited else f"{model} ready{where}"
    reason = f": {answer['reason']}" if answer.get("reason") else ""
    return f"{model} {state}{where}{reason}"


def run_unload(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    try:
        answer = _admin_call(args, f"/api/models/{quote(args.name, safe='')}/unload", None, UNLOAD_S, transport)
    except GatewayError as exc:
        print(f"homefleet unload: {exc}", file=sys.stderr)
        return 1
    replicas = answer.get("unloaded") or []
    model = answer.get("model", args.name)
    print(f"{model} unloaded ({', '.join(replicas)})" if replicas else f"{model} was not loaded")
    return 0


def run_reload(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    try:
        answer = _admin_call(args, "/api/reload", None, UNLOAD_S, transport)
    except GatewayError as exc:
        print(f"homefleet reload: {exc}", file=sys.stderr)
        return 1
    print(describe_reload(answer))
    return 0


def run_drain(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    try:
        answer = _admin_call(args, f"/api/nodes/{quote(args.node, safe='')}/drain", {"timeout_s": args.timeout},
                             args.timeout + DRAIN_MARGIN_S, transport)
    except GatewayError as exc:
        print(f"homefleet drain: {exc}", file=sys.stderr)
        return 1
    print(describe_drain(answer))
    return 0 if answer.get("state") in ("drained", "left") else 1


def run_undrain(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    try:
        answer = _admin_call(args, f"/api/nodes/{quote(args.node, safe='')}/undrain", None, QUICK_S, transport)
    except GatewayError as exc:
        print(f"homefleet undrain: {exc}", file=sys.stderr)
        return 1
    node = answer.get("node", args.node)
    print(f"{node} takes work again" if answer.get("was_draining") else f"{node} was not draining")
    return 0
