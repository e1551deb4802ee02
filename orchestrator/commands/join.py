"""`homefleet join HEAD_ADDRESS`: make this machine a worker node of the cluster; foreground
until Ctrl-C, then leave (the node shows as gone in `homefleet status`)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOG_DIR = Path("~/.cache/homefleet/logs")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "join",
        help="join this machine to a cluster as a worker node",
        description="Start a Ray worker node labelled with this machine's name; its node agent reports "
        "hardware, live use and model files to the head. `homefleet up` prints this command with its token.",
    )
    p.add_argument("head_address", metavar="HEAD_ADDRESS", help="the head's Ray address, e.g. 192.168.1.10:6379")
    p.add_argument("--name", help="node name (default: hostname)")
    p.add_argument("--hardware", metavar="FILE", help="report this hardware file instead of probing")
    p.add_argument("--models-dir", metavar="DIR",
                   help="where this machine keeps GGUF files (default: ~/.local/share/homefleet/models)")
    p.add_argument("--store-port", type=int, default=0, metavar="PORT",
                   help="port where this machine serves its model files to peers (default: any free port; "
                   "fix it to open it in a firewall)")
    p.add_argument("--token", default=None, help="the cluster's Ray token (default: $RAY_AUTH_TOKEN)")
    p.add_argument("--node-ip-address", help="this machine's LAN address for Ray to bind to")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from orchestrator import ray_cluster
    from worker.agent import node_environment

    token = args.token or os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        print("homefleet join: needs the cluster's token: --token TOKEN or RAY_AUTH_TOKEN "
              "(`homefleet up` prints the whole join command)", file=sys.stderr)
        return 2
    hardware = None
    if args.hardware:
        from orchestrator.machines import load_hardware_file

        try:
            hardware = load_hardware_file(args.hardware)
        except (OSError, ValueError) as exc:
            print(f"homefleet join: {exc}", file=sys.stderr)
            return 2
    name = args.name or (hardware.name if hardware else socket.gethostname())
    log_dir = LOG_DIR.expanduser()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"ray-worker-{name}.log"
    env = node_environment(name, hardware, args.models_dir, args.store_port)
    worker = ray_cluster.join_cluster(args.head_address, token, env, name, args.node_ip_address, log_path=log_path)
    print(f"homefleet: node {name} joining {args.head_address} (log: {log_path}); Ctrl-C to leave", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while worker.popen.poll() is None:
            time.sleep(0.5)
        print(f"homefleet join: Ray worker exited with code {worker.popen.returncode}; see {log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"homefleet: node {name} leaving ...", flush=True)
        worker.stop()
        return 0
