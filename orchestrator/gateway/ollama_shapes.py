"""Ollama's answers, built from what the gateway has: the replica's stream of OpenAI chunks
(server-sent events) becomes Ollama's NDJSON objects, and the cluster view becomes
`/api/tags`, `/api/ps` and `/api/show`. No I/O here: the clock is passed in.

A generation's last object carries Ollama's counts and durations (nanoseconds), measured at
the gateway: load (waiting for an on-demand load), prompt evaluation (accepted to first
token), evaluation (first token to the end) and the total.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from orchestrator.cluster_view import ModelView, ReplicaView

DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}  # OpenAI's finish_reason -> Ollama's
FOR_EVER = timedelta(microseconds=(2**63 - 1) // 1000)  # what Ollama reports as expires_at for keep_alive -1
QUANTIZATION = re.compile(r"(?i)(?<![a-z0-9])(IQ\d_[A-Z0-9]+|Q\d_K(?:_[SML])?|Q\d_\d|BF16|F16|F32)(?![a-z0-9])")


def timestamp(unix_s: float) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at`."""
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def error_line(message: str) -> dict:
    return {"error": message}


class OllamaStream:
    """One generation's conversion: feed it the replica's SSE bytes as they come, get Ollama's
    objects; `kind` is "chat" (message pieces) or "generate" (response pieces)."""

    def __init__(self, kind: str, model: str, started_ns: int, load_ns: int = 0,
                 clock: Callable[[], int] = time.monotonic_ns, wall: Callable[[], float] = time.time) -> None:
        self.kind, self.model = kind, model
        self.clock, self.wall = clock, wall
        self.started_ns, self.load_ns = started_ns, load_ns
        self.accepted_ns = self.first_token_ns = None
        self.buffer = b""
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.calls: dict[int, dict] = {}
        self.error_status: int | None = None  # set when the stream ended with an error

    def accepted(self) -> None:
        """The replica took the request (its prompt evaluation starts now)."""
        self.accepted_ns = self.clock()

    def feed(self, data: bytes) -> list[dict]:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        out: list[dict] = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):  # other lines are comments (`: loading 40%`)
                    out += self._data(line[5:].strip().decode("utf-8"))
        return out

    def _data(self, payload: str) -> list[dict]:
        if payload == "[DONE]":
            return self._ending()
        chunk = json.loads(payload)
        if "error" in chunk:
            error = chunk["error"]
            self.error_status = 502 if error.get("type") == "server_error" else 400
            return [error_line(error.get("message") or "the replica failed")]
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens, self.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        if not chunk.get("choices"):
            return []
        choice = chunk["choices"][0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or ():
            self._add_call(call)
        text = delta.get("content") if "delta" in choice else choice.get("text")
        if not text:
            return []
        if self.first_token_ns is None:
            self.first_token_ns = self.clock()
        return [self._piece(text)]

    def _add_call(self, delta: dict) -> None:
        call = self.calls.setdefault(delta.get("index", 0), {"name": "", "arguments": ""})
        function = delta.get("function") or {}
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""

    def _piece(self, text: str, done: bool = False, **more: Any) -> dict:
        out: dict[str, Any] = {"model": self.model, "created_at": timestamp(self.wall())}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text, **more}
        else:
            out["response"] = text
        out["done"] = done
        return out

    def _ending(self) -> list[dict]:
        out = []
        if self.calls:
            try:
                calls = [{"function": {"index": i, "name": c["name"], "arguments": json.loads(c["arguments"] or "{}")}}
                         for i, c in sorted(self.calls.items())]
            except json.JSONDecodeError:
                self.error_status = 502
                return [error_line("the model's tool call arguments are not JSON")]
            if not all(isinstance(c["function"]["arguments"], dict) for c in calls):  # Ollama's is an object
                self.error_status = 502
                return [error_line("the model's tool call arguments are not a JSON object")]
            out.append(self._piece("", tool_calls=calls))
        now = self.clock()
        accepted = self.accepted_ns if self.accepted_ns is not None else self.started_ns
        first = self.first_token_ns if self.first_token_ns is not None else now
        out.append({
            **self._piece("", done=True),
            "done_reason": DONE_REASONS.get(self.finish_reason or "stop", self.finish_reason),
            "total_duration": now - self.started_ns,
            "load_duration": self.load_ns,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": max(0, first - accepted),
            "eval_count": self.completion_tokens,
            "eval_duration": max(0, now - first),
        })
        return out

    async def ndjson(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The relay's SSE bytes as NDJSON lines; closing this closes `events` (its slot is freed)."""
        try:
            async for data in events:
                for item in self.feed(data):
                    yield json.dumps(item, separators=(",", ":")).encode() + b"\n"
        finally:
            await events.aclose()


def fold(pieces: list[dict]) -> dict:
    """The whole answer (stream: false) from a stream's objects: its text joined, any tool
    calls, the last object's counts; an error if the stream had one."""
    for piece in pieces:
        if "error" in piece:
            return piece
    if not pieces or not pieces[-1].get("done"):
        return error_line("the answer ended before it was done")
    last = dict(pieces[-1])
    if "message" in last:
        calls = [c for p in pieces for c in p["message"].get("tool_calls") or ()]
        last["message"] = {"role": "assistant", "content": "".join(p["message"]["content"] for p in pieces)}
        if calls:
            last["message"]["tool_calls"] = calls
    else:
        last["response"] = "".join(p["response"] for p in pieces)
    return last


def done_without_answer(kind: str, model: str, reason: str, now_s: float) -> dict:
    """/api/chat or /api/generate with nothing to answer: Ollama's way to load (reason "load")
    or unload (keep_alive 0, reason "unload") a model."""
    answer = {"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""}
    return {"model": model, "created_at": timestamp(now_s), **answer, "done": True, "done_reason": reason}


# ---- what the fleet serves ---------------------------------------------------------------------


def quantization_of(file_name: str | None) -> str:
    """The quantization a GGUF file's name says (Q4_K_M, Q8_0, F16...), or ""."""
    found = QUANTIZATION.search(file_name or "")
    return found.group(1).upper() if found else ""


def details(model: ModelView, architecture: str | None) -> dict:
    name = (model.file.name if model.file else None) or model.path
    return {"parent_model": "", "format": "gguf", "family": architecture or "",
            "families": [architecture] if architecture else None, "parameter_size": "",
            "quantization_level": quantization_of(name)}


def digest(model: ModelView) -> str:
    return (model.file.sha256 if model.file else None) or ""


def tag(model: ModelView, architecture: str | None, modified_at: str) -> dict:
    """One entry of /api/tags: a model the fleet serves, loaded or not."""
    size = (model.file.size_bytes if model.file else None) or 0
    return {"name": model.name, "model": model.name, "modified_at": modified_at, "size": size,
            "digest": digest(model), "details": details(model, architecture)}


def replica_bytes(replica: ReplicaView) -> tuple[int, int]:
    """(size, size_vram) of a replica: measured when it reports, else estimated."""
    gpu = replica.measured_gpu_bytes if replica.measured_gpu_bytes is not None else replica.estimated_gpu_bytes
    ram = replica.measured_ram_bytes if replica.measured_ram_bytes is not None else replica.estimated_ram_bytes
    return (ram or 0) + (gpu or 0), gpu or 0


def running(model: ModelView, architecture: str | None, unloads_in_s: float | None, now_s: float) -> dict | None:
    """One entry of /api/ps: a model with ready replicas, the nodes they run on (homefleet's
    `nodes` and `replicas`), their memory summed; None when none is ready."""
    ready = [r for r in model.replicas if r.state == "ready"]
    if not ready:
        return None
    sizes = [replica_bytes(r) for r in ready]
    # A keep_alive past Ollama's "for ever" (years in seconds) reads as for ever, not an overflow.
    forever = unloads_in_s is None or unloads_in_s >= FOR_EVER.total_seconds()
    expires = datetime.fromtimestamp(now_s, tz=timezone.utc) + (FOR_EVER if forever else timedelta(seconds=unloads_in_s))
    return {
        "name": model.name, "model": model.name,
        "size": sum(s for s, _ in sizes), "size_vram": sum(v for _, v in sizes),
        "digest": digest(model), "details": details(model, architecture),
        "expires_at": expires.isoformat().replace("+00:00", "Z"),
        "context_length": model.context,
        "nodes": sorted({r.node for r in ready if r.node}),
        "replicas": [{"node": r.node, "size": s, "size_vram": v, "processor": r.processor}
                     for r, (s, v) in zip(ready, sizes)],
    }


def show(model: ModelView, architecture: str | None, embedding: bool, modified_at: str) -> dict:
    """/api/show: what Ollama says of a model, from the fleet's config and its loaded replicas."""
    info: dict[str, Any] = {"general.architecture": architecture or ""}
    if architecture:
        info[f"{architecture}.context_length"] = model.context
    return {
        "license": "",
        "modelfile": f"# served by homefleet from its config\nFROM {model.path or model.name}\n"
                     f"PARAMETER num_ctx {model.context}\n",
        "parameters": f"num_ctx {model.context}",
        "template": "",
        "details": details(model, architecture),
        "model_info": info,
        "capabilities": ["embedding"] if embedding else ["completion"],
        "modified_at": modified_at,
    }
