"""`homefleet`: the one console script. Each subcommand lives in orchestrator/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules; each exposes register(subparsers) and sets func=run(args) -> int
# (manage registers five: load, unload, reload, drain, undrain).
COMMANDS = ("up", "join", "token", "status", "events", "chat", "plan", "fit", "pull", "models", "manage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homefleet",
        description="Run local LLMs across the machines of a home lab behind one OpenAI-compatible endpoint.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"orchestrator.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"orchestrator.commands.{name}":
                continue  # not written yet in this checkout
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
