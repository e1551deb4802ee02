"""How `homefleet join` asks the head to drain its node, and how the answer comes back:
two keys in Ray's internal KV (the GCS), which a worker machine reaches with the cluster's
token alone (it has neither the gateway's URL nor the admin key).

    homefleet:drain:<node>    {"request_id", "timeout_s"}   written by join, read by the controller each tick
    homefleet:drained:<node>  {"request_id", "answer"}      written by the controller when the drain ends

The controller deletes the request when it answers; join deletes the answer once read, and
its own request when it stops waiting. The answer is the drain's summary (what moved
where, what stopped), the same one `POST /api/nodes/{name}/drain` returns.

No Ray here: the Ray shell (orchestrator/ray_actors.py on the head, membership.py on a
worker) moves these bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

NAMESPACE = b"homefleet"
REQUEST_PREFIX = "homefleet:drain:"
ANSWER_PREFIX = "homefleet:drained:"


def request_key(node: str) -> bytes:
    return (REQUEST_PREFIX + node).encode()


def answer_key(node: str) -> bytes:
    return (ANSWER_PREFIX + node).encode()


@dataclass(frozen=True)
class DrainRequest:
    node: str
    request_id: str
    timeout_s: float

    def encode(self) -> bytes:
        return json.dumps({"request_id": self.request_id, "timeout_s": self.timeout_s}).encode()

    @classmethod
    def decode(cls, key: bytes, value: bytes | None) -> DrainRequest | None:
        """The request under `key`, or None for a key or value that is not one."""
        name = key.decode(errors="replace")
        if not name.startswith(REQUEST_PREFIX) or not value:
            return None
        try:
            body = json.loads(value)
            return cls(name[len(REQUEST_PREFIX):], str(body["request_id"]), float(body["timeout_s"]))
        except (ValueError, KeyError, TypeError):
            return None


def encode_answer(request_id: str, answer: dict) -> bytes:
    return json.dumps({"request_id": request_id, "answer": answer}).encode()


def decode_answer(value: bytes | None, request_id: str) -> dict | None:
    """The answer to request `request_id` (None: no answer yet, or one to another request)."""
    if not value:
        return None
    try:
        body = json.loads(value)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("request_id") != request_id:
        return None
    return body.get("answer") if isinstance(body.get("answer"), dict) else None


def describe_drain(answer: dict) -> str:
    """'laptop-1 drained in 3.1 s: small#0 moved to desktop; big#0 stopped (no other node has room: ...)'."""
    node = answer.get("node", "?")
    if answer.get("error"):
        return f"{node} not drained: {answer['error']}"
    state = answer.get("state", "drained")
    seconds = answer.get("seconds")
    head = f"{node} {state}" + (f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else "")
    if answer.get("timed_out"):
        head += " (timed out)"
    parts = [f"{m['replica']} moved to {m['to']}" for m in answer.get("moved", ())]
    parts += [f"{s['replica']} stopped ({s['reason']})" for s in answer.get("stopped", ())]
    cut = answer.get("cut_requests") or 0
    if cut:
        parts.append(f"{cut} request(s) still running at the timeout were cut")
    return head + (": " + "; ".join(parts) if parts else ": nothing was running there")
