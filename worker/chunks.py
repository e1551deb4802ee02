"""OpenAI's streaming shapes: chat.completion.chunk and text_completion chunks, with
log-probabilities and tool-call deltas; and `collect`, which folds a stream into the
non-streamed response (so both paths share one generator)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence

from worker.generation import TokenLogprob
from worker.tool_calls import ToolCall


class ChunkShaper:
    def __init__(self, kind: str, model: str, with_logprobs: bool) -> None:
        self.kind = kind
        self.model = model
        self.with_logprobs = with_logprobs
        self.created = int(time.time())
        prefix, self.object = ("chatcmpl", "chat.completion.chunk") if kind == "chat" else ("cmpl", "text_completion")
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.text_offset = 0

    def _chunk(self, choice: dict, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": [{"index": 0, **choice}]}
        if usage is not None:
            out["usage"] = usage
        return out

    def opening(self) -> Iterator[dict]:
        if self.kind == "chat":
            yield self._chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})

    def content(self, text: str, logprobs: Sequence[TokenLogprob]) -> dict | None:
        if not text and not (self.with_logprobs and logprobs):
            return None
        shaped = self._logprobs(logprobs) if self.with_logprobs else None
        if self.kind == "chat":
            return self._chunk({"delta": {"content": text}, "logprobs": shaped, "finish_reason": None})
        return self._chunk({"text": text, "logprobs": shaped, "finish_reason": None})

    def tool_calls(self, calls: Sequence[ToolCall]) -> Iterator[dict]:
        """OpenAI's deltas: the call's id, type and name first, then its arguments."""
        for index, call in enumerate(calls):
            head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            yield self._chunk({"delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None})
            body = {"index": index, "function": {"arguments": call.arguments}}
            yield self._chunk({"delta": {"tool_calls": [body]}, "logprobs": None, "finish_reason": None})

    def closing(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int | None = None) -> dict:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if cached_tokens is not None:  # OpenAI's prompt caching report
            usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        body = {"delta": {}} if self.kind == "chat" else {"text": ""}
        return self._chunk({**body, "logprobs": None, "finish_reason": finish_reason}, usage)

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict:
        if self.kind == "chat":
            return {"content": [
                {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in e.top]}
                for e in entries
            ]}
        offsets = []
        for e in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{t: lp for t, lp, _ in e.top} for e in entries], "text_offset": offsets}


def collect(chunks: Iterable[dict]) -> dict:
    """A whole (non-streamed) OpenAI response from the chunks of a stream."""
    parts: list[str] = []
    calls: dict[int, dict] = {}
    logprobs: dict | None = None
    first = last = None
    for c in chunks:
        first = first or c
        last = c
        choice = c["choices"][0]
        if "delta" in choice:
            delta = choice["delta"]
            parts.append(delta.get("content") or "")
            for d in delta.get("tool_calls") or ():
                call = calls.setdefault(d["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                call["id"] = d.get("id") or call["id"]
                call["function"]["name"] += d.get("function", {}).get("name") or ""
                call["function"]["arguments"] += d.get("function", {}).get("arguments") or ""
        else:
            parts.append(choice.get("text") or "")
        if choice.get("logprobs"):
            logprobs = _merged(logprobs, choice["logprobs"])
    finish = last["choices"][0]["finish_reason"]
    text = "".join(parts)
    if first["object"] == "chat.completion.chunk":
        message = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return {"id": first["id"], "object": obj, "created": first["created"], "model": first["model"],
            "choices": [choice], "usage": last.get("usage")}


def _merged(total: dict | None, more: dict) -> dict:
    if total is None:
        return {k: list(v) for k, v in more.items()}
    for key, values in more.items():
        total[key] = total.get(key, []) + list(values)
    return total
