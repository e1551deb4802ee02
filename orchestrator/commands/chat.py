"""`homefleet chat MODEL [PROMPT]`: stream an answer from the endpoint; a REPL without PROMPT."""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

from orchestrator.commands.status import DEFAULT_URL


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (streams; a REPL without PROMPT)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("prompt", metavar="PROMPT", nargs="?")
    p.add_argument("--url", default=None, help=f"gateway base URL (default: $HOMEFLEET_URL, else {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help="API key (default: $HOMEFLEET_API_KEY)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


class ChatError(Exception):
    pass


def stream_answer(client: httpx.Client, url: str, body: dict, out) -> str:
    """POST a streamed chat request and write the tokens to `out` as they arrive."""
    parts = []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ChatError(f"{response.status_code}: {message}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ChatError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    parts.append(text)
                    out.write(text)
                    out.flush()
    out.write("\n")
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    url = (args.url or os.environ.get("HOMEFLEET_URL") or DEFAULT_URL).rstrip("/")
    key = args.api_key or os.environ.get("HOMEFLEET_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    messages = [{"role": "system", "content": args.system}] if args.system else []
    sampling = {"max_tokens": args.max_tokens, "stream": True}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.seed is not None:
        sampling["seed"] = args.seed
    with httpx.Client(headers=headers, timeout=httpx.Timeout(600, connect=5)) as client:
        try:
            if args.prompt is not None:
                body = {"model": args.model, "messages": messages + [{"role": "user", "content": args.prompt}], **sampling}
                stream_answer(client, url, body, sys.stdout)
                return 0
            return _repl(client, url, args.model, messages, sampling)
        except httpx.ConnectError:
            print(f"homefleet chat: no homefleet gateway at {url}: start one with `homefleet up`", file=sys.stderr)
            return 1
        except httpx.HTTPError as exc:
            print(f"homefleet chat: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        except ChatError as exc:
            print(f"homefleet chat: {exc}", file=sys.stderr)
            return 1


def _repl(client: httpx.Client, url: str, model: str, messages: list, sampling: dict) -> int:
    print(f"chatting with {model} at {url} (Ctrl-D or /exit to leave, /reset to forget)", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = stream_answer(client, url, {"model": model, "messages": messages, **sampling}, sys.stdout)
        except (ChatError, httpx.HTTPError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n(interrupted)", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})
