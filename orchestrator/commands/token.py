"""`homefleet token`: print the cluster's Ray token, from the file `homefleet up` keeps it in,
to copy it to a machine that joins (it is never printed to the head's log)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.cluster_token import DEFAULT_TOKEN_FILE, TokenError, read_token_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "token",
        help="print the cluster's Ray token (for `homefleet join --token-file`)",
        description="Print the Ray token `homefleet up` keeps in its token file (0600). Write it to a file of "
        "the same mode on each machine that joins, for `homefleet join --token-file FILE`; anyone who holds it "
        "can run code on every node.",
    )
    p.add_argument("--token-file", metavar="FILE", type=Path, default=DEFAULT_TOKEN_FILE,
                   help=f"the head's token file (default {DEFAULT_TOKEN_FILE})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        token = read_token_file(args.token_file)
    except TokenError as exc:
        print(f"homefleet token: {exc} (`homefleet up` writes it on its first start; run this as the user "
              "that runs the head)", file=sys.stderr)
        return 1
    print(token)
    return 0
