"""`homefleet models`: the model files each node holds and which configured models use
them; `homefleet models prune` removes the copies homefleet made that no model uses."""

from __future__ import annotations

import argparse
import json
import sys

from orchestrator.commands.gateway_client import (
    ADMIN_KEY_HINT,
    GatewayError,
    admin_key,
    call,
    fetch_view,
    gateway_url,
)
from orchestrator.models_report import render_models, render_prune


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the model files of every node's store; `models prune` removes unused copies",
        description="List each node's model store (files, sizes, SHA-256, free disk) and which configured "
        "models use each file. `homefleet models prune` removes copies homefleet made that no configured "
        "model uses (never a file you put in place).",
    )
    p.add_argument("action", nargs="?", choices=["list", "prune"], default="list")
    p.add_argument("--url", help="gateway base URL (default: $HOMEFLEET_URL, else http://127.0.0.1:8000)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--dry-run", action="store_true", help="prune: list what would go, remove nothing")
    p.add_argument("--api-key", metavar="KEY", help="API key for a gateway on another machine")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    url = gateway_url(args.url)
    try:
        if args.action == "prune":
            result = call(url, "POST", "/api/models/prune", admin_key() or args.api_key, {"dry_run": args.dry_run},
                          timeout_s=120, key_hint=ADMIN_KEY_HINT)
            sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else render_prune(result))
            return 0
        _, view = fetch_view(url, args.api_key)
    except GatewayError as exc:
        print(f"homefleet models: {exc}", file=sys.stderr)
        return 1
    if args.json:
        stores = {n.name: n.store.model_dump(mode="json") if n.store else None for n in view.nodes}
        print(json.dumps({"stores": stores, "models": [m.model_dump(mode="json") for m in view.models]}, indent=2))
    else:
        sys.stdout.write(render_models(view))
    return 0
