"""`homefleet join HEAD_ADDRESS`: make this machine a worker node of the cluster; foreground
until Ctrl-C, then leave (the node shows as gone in `homefleet status`). While it runs it
keeps the machine in the fleet: a node that dies or is declared dead joins again by itself
(orchestrator/membership.py). On Ctrl-C or SIGTERM the head drains the node first (its
models started elsewhere, its requests finished; `--drain-timeout`). `--wake-mac` names the
card the head may wake the machine at (Wake-on-LAN) when it sleeps."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from orchestrator.cluster_token import DEFAULT_TOKEN_FILE, TokenError, worker_token

LOG_DIR = Path("~/.cache/homefleet/logs")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "join",
        help="join this machine to a cluster as a worker node",
        description="Start a Ray worker node labelled with this machine's name; its node agent reports "
        "hardware, live use and model files to the head. `homefleet up` prints this command. While it runs, "
        "a node that dies or is declared dead joins again by itself.",
    )
    p.add_argument("head_address", metavar="HEAD_ADDRESS", help="the head's Ray address, e.g. 192.168.1.10:6379")
    p.add_argument("--name", help="node name (default: hostname); a live node of the same name is refused")
    p.add_argument("--hardware", metavar="FILE", help="report this hardware file instead of probing")
    p.add_argument("--models-dir", metavar="DIR",
                   help="where this machine keeps GGUF files (default: ~/.local/share/homefleet/models)")
    p.add_argument("--store-port", type=int, default=0, metavar="PORT",
                   help="port where this machine serves its model files to peers (default: any free port; "
                   "fix it to open it in a firewall)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token-file", metavar="FILE", type=Path,
                       help="file holding the cluster's Ray token: a copy of the head's (`homefleet token` prints "
                       f"it); default: $HOMEFLEET_TOKEN, else {DEFAULT_TOKEN_FILE}")
    token.add_argument("--token", default=None,
                       help="the token itself (every user of this machine sees it in `ps`: prefer --token-file)")
    p.add_argument("--node-ip-address", help="this machine's LAN address for Ray to bind to")
    p.add_argument("--wake-mac", metavar="MAC",
                   help="MAC address the head sends Wake-on-LAN to when this machine sleeps and a request needs "
                   "it (default: that of the card carrying the node's address)")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="on Ctrl-C/SIGTERM, how long the head may take to move this node's models elsewhere and "
                   "finish its requests before it leaves (default 60; 0: leave at once)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        token, warning = (args.token, None) if args.token else worker_token(args.token_file, os.environ)
    except TokenError as exc:
        print(f"homefleet join: {exc}", file=sys.stderr)
        return 2
    if warning:
        print(f"homefleet join: warning: {warning}", file=sys.stderr, flush=True)
    hardware = None
    if args.hardware:
        from orchestrator.machines import load_hardware_file

        try:
            hardware = load_hardware_file(args.hardware)
        except (OSError, ValueError) as exc:
            print(f"homefleet join: {exc}", file=sys.stderr)
            return 2
    wake_mac = None
    if args.wake_mac:
        from orchestrator.core.wake_on_lan import format_mac

        try:
            wake_mac = format_mac(args.wake_mac)
        except ValueError as exc:
            print(f"homefleet join: --wake-mac: {exc}", file=sys.stderr)
            return 2
    from orchestrator import ray_cluster

    # Before Ray is imported (the keeper reads the head through Ray's GCS client): Ray reads
    # RAY_AUTH_MODE once, when it loads.
    os.environ.update(ray_cluster.auth_environment(token))
    from orchestrator.membership import HeadNodes, NodeKeeper
    from worker.agent import node_environment

    name = args.name or (hardware.name if hardware else socket.gethostname())
    log_dir = LOG_DIR.expanduser()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"ray-worker-{name}.log"
    env = node_environment(name, hardware, args.models_dir, args.store_port, wake_mac)

    def start_node() -> ray_cluster.RayProcess:
        return ray_cluster.join_cluster(args.head_address, token, env, name, args.node_ip_address, log_path=log_path)

    def say(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("homefleet join:") else sys.stdout, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)  # systemd stops with SIGTERM: leave as on Ctrl-C
    keeper = NodeKeeper(name, args.head_address, start_node, HeadNodes(args.head_address), say, log_path=log_path,
                        drain_timeout_s=max(0.0, args.drain_timeout))
    code = keeper.run()
    if code == 0:
        print(f"homefleet: node {name} left", flush=True)
    return code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
