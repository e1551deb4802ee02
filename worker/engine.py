"""One llama.cpp model, with OpenAI-shaped chat and text completion. No Ray here.

The engine formats chat itself (the GGUF's own template, else the configured format,
else the architecture's usual one) so that it knows the prompt's length before it
generates: a prompt longer than the context is a `context_length_exceeded` error, not an
engine crash. A `Llama` is not thread-safe: callers serialise requests (the replica does).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from worker.chat_format import ChatFormatter, choose_formatter
from worker.errors import RequestError, context_length_exceeded
from worker.memory_use import measure_process_memory

log = logging.getLogger(__name__)

KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids
# Asked before each token: None to go on, "length" to end the answer there (a time limit),
# "cancelled" to drop it (the client left).
StopCheck = Callable[[], str | None]


class GenerationCancelled(Exception):
    """The client left; nothing more is generated for it."""


@dataclass(frozen=True)
class EngineSettings:
    model_name: str
    path: str
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int | None = None
    chat_format: str | None = None
    flash_attn: bool = False
    kv_type: str = "f16"
    embedding: bool = False
    n_batch: int = 512
    n_ubatch: int = 512


def default_threads() -> int:
    """Physical cores: llama.cpp's decode is memory-bound and hyperthreads only contend."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:
        return max(1, (os.cpu_count() or 2) // 2)


class Engine:
    def __init__(self, settings: EngineSettings) -> None:
        import llama_cpp

        self.settings = settings
        started = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model_path=settings.path,
            n_ctx=settings.n_ctx,
            n_gpu_layers=settings.n_gpu_layers,
            n_threads=settings.n_threads or default_threads(),
            n_batch=settings.n_batch,
            n_ubatch=settings.n_ubatch,
            embedding=settings.embedding,
            verbose=False,
        )
        if settings.flash_attn:
            kwargs["flash_attn"] = True
        if settings.kv_type != "f16":
            kwargs["type_k"] = kwargs["type_v"] = KV_TYPES[settings.kv_type]
        self.llama = llama_cpp.Llama(**kwargs)
        self.load_seconds = time.perf_counter() - started
        self.architecture = self.llama.metadata.get("general.architecture", "unknown")
        self.formatter: ChatFormatter = choose_formatter(self.llama, settings.chat_format)
        self.n_ctx = self.llama.n_ctx()
        self._nvml = None
        self.decode_rates: deque[float] = deque(maxlen=8)  # tokens/s of recent requests

    # ---- facts -----------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "model": self.settings.model_name,
            "architecture": self.architecture,
            "n_ctx": self.n_ctx,
            "n_layers": int(self.llama.metadata.get(f"{self.architecture}.block_count", 0) or 0),
            "chat_format": self.formatter.name,
            "load_seconds": round(self.load_seconds, 3),
            "decode_tokens_per_s": round(statistics.median(self.decode_rates), 2) if self.decode_rates else None,
        }

    def memory(self) -> dict:
        if self._nvml is None:
            from worker.probe import NvmlSession

            self._nvml = NvmlSession()
        return measure_process_memory(os.getpid(), self._nvml)

    # ---- prompts -----------------------------------------------------------------------
    def _tokens_for_chat(self, messages: list[dict]) -> tuple[list[int], list[str]]:
        try:
            formatted = self.formatter.format(messages)
        except Exception as exc:  # the chat template refused the conversation (e.g. roles must alternate)
            raise RequestError(
                f"model '{self.settings.model_name}' cannot format these messages: {exc}", param="messages"
            ) from None
        tokens = self.llama.tokenize(formatted.prompt.encode("utf-8"), add_bos=formatted.add_bos, special=True)
        return tokens, formatted.stop

    def _tokens_for_text(self, prompt: str) -> list[int]:
        return self.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def _check_fits(self, prompt_tokens: int, max_tokens: int | None, param: str = "messages") -> int:
        """Tokens left for the answer; raise context_length_exceeded when none are."""
        room = self.n_ctx - prompt_tokens
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise context_length_exceeded(prompt_tokens, max_tokens, self.n_ctx, param)
        return room if max_tokens is None else max_tokens

    # ---- generation --------------------------------------------------------------------
    def _generate(self, tokens: list[int], sampling: dict, extra_stop: list[str], param: str) -> Iterator[dict]:
        max_tokens = self._check_fits(len(tokens), sampling.get("max_tokens"), param)
        stop = list(sampling.get("stop") or []) + list(extra_stop)
        seed = sampling.get("seed")
        if seed is not None:
            self.llama.set_seed(int(seed))
        return self.llama.create_completion(
            prompt=tokens,
            max_tokens=max_tokens,
            temperature=sampling.get("temperature", 0.8),
            top_p=sampling.get("top_p", 0.95),
            stop=stop or None,
            presence_penalty=sampling.get("presence_penalty", 0.0),
            frequency_penalty=sampling.get("frequency_penalty", 0.0),
            seed=seed,
            stream=True,
        )

    def stream_chat(self, messages: list[dict], sampling: dict, should_stop: StopCheck | None = None) -> Iterator[dict]:
        """OpenAI chat.completion.chunk dicts; the last one carries finish_reason and usage."""
        tokens, stop = self._tokens_for_chat(messages)
        return self._stream("chat", tokens, sampling, stop, should_stop)

    def stream_text(self, prompt: str, sampling: dict, should_stop: StopCheck | None = None) -> Iterator[dict]:
        """OpenAI text_completion chunks; the last one carries finish_reason and usage."""
        return self._stream("text", self._tokens_for_text(prompt), sampling, [], should_stop)

    def _stream(self, kind: str, tokens: list[int], sampling: dict, stop: list[str],
                should_stop: StopCheck | None) -> Iterator[dict]:
        pieces = self._generate(tokens, sampling, stop, "messages" if kind == "chat" else "prompt")
        return _openai_chunks(kind, self.settings.model_name, pieces, len(tokens), self.decode_rates.append,
                              should_stop)

    def chat(self, messages: list[dict], sampling: dict, should_stop: StopCheck | None = None) -> dict:
        return collect(self.stream_chat(messages, sampling, should_stop))

    def complete(self, prompt: str, sampling: dict, should_stop: StopCheck | None = None) -> dict:
        return collect(self.stream_text(prompt, sampling, should_stop))

    def embed(self, inputs: list[str]) -> dict:
        if not self.settings.embedding:
            raise RequestError(
                f"model '{self.settings.model_name}' does not serve embeddings (set embedding: true in its config)",
                param="model",
                code="model_not_embedding",
            )
        data, prompt_tokens = [], 0
        for index, text in enumerate(inputs):
            tokens = self._tokens_for_text(text)
            self._check_fits(len(tokens), None, "input")
            if len(tokens) > self.settings.n_batch:  # llama.cpp embeds one batch at a time
                raise RequestError(
                    f"input[{index}] is {len(tokens)} tokens; this model embeds at most {self.settings.n_batch}",
                    param="input",
                    code="context_length_exceeded",
                )
            prompt_tokens += len(tokens)
            data.append({"object": "embedding", "index": index, "embedding": _pooled(self.llama.embed(text))})
        return {
            "object": "list",
            "data": data,
            "model": self.settings.model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }


def _pooled(vectors: list) -> list[float]:
    """One vector per input: a model without pooling returns one per token; average them."""
    if vectors and isinstance(vectors[0], list):
        n = len(vectors)
        return [sum(column) / n for column in zip(*vectors)]
    return vectors


def _openai_chunks(
    kind: str, model: str, pieces: Iterator[dict], prompt_tokens: int, on_decoded=None,
    should_stop: StopCheck | None = None,
) -> Iterator[dict]:
    created = int(time.time())
    if kind == "chat":
        ident, obj = f"chatcmpl-{uuid.uuid4().hex[:24]}", "chat.completion.chunk"
    else:
        ident, obj = f"cmpl-{uuid.uuid4().hex[:24]}", "text_completion"

    def chunk(delta_or_text, finish_reason=None, usage=None) -> dict:
        if kind == "chat":
            choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish_reason}
        out = {"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out

    if kind == "chat":
        yield chunk({"role": "assistant", "content": ""})
    completion_tokens, finish_reason = 0, "stop"
    first_token_at = None
    for piece in pieces:
        verdict = should_stop() if should_stop is not None else None
        if verdict == "cancelled":
            pieces.close()  # frees llama.cpp's generator now
            raise GenerationCancelled
        if verdict == "length":
            pieces.close()
            finish_reason = "length"
            break
        first_token_at = first_token_at or time.perf_counter()
        choice = piece["choices"][0]
        text = choice.get("text") or ""
        if choice.get("finish_reason") is None or text:
            completion_tokens += 1
        if text:
            yield chunk({"content": text} if kind == "chat" else text)
        if choice.get("finish_reason"):
            finish_reason = choice["finish_reason"]
    if on_decoded is not None and first_token_at is not None and completion_tokens > 8:
        on_decoded((completion_tokens - 1) / (time.perf_counter() - first_token_at))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    yield chunk({} if kind == "chat" else "", finish_reason=finish_reason, usage=usage)


def collect(chunks: Iterator[dict]) -> dict:
    """A whole (non-streamed) OpenAI response from the chunks of a stream."""
    parts, first, last = [], None, None
    for c in chunks:
        first = first or c
        last = c
        choice = c["choices"][0]
        parts.append(choice["delta"].get("content") or "" if "delta" in choice else choice.get("text") or "")
    text = "".join(parts)
    finish = last["choices"][0]["finish_reason"]
    if first["object"] == "chat.completion.chunk":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": first["id"],
        "object": obj,
        "created": first["created"],
        "model": first["model"],
        "choices": [choice],
        "usage": last.get("usage"),
    }
