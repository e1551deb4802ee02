"""One llama.cpp model, with OpenAI-shaped chat and text completion. No Ray here.

The engine formats chat itself (the GGUF's own template, else the configured format,
else the architecture's usual one) so that it knows the prompt's length before it
generates: a prompt longer than the context is a `context_length_exceeded` error, not an
engine crash.

A generative model decodes in a `BatchedEngine` (worker/batch_engine.py): `parallel` slots,
each with the full context, served together by one decode thread, so callers may call
`stream_chat` / `chat` from many threads at once. A `Llama` opened `vocab_only` (no
weights, no KV) gives the metadata, the template and the tokenizer. An embedding model
keeps llama-cpp-python's `Llama` (one call at a time: the replica serialises them), which
embeds all the inputs of a request in shared batches.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

from worker.batch_engine import BatchedEngine, SequenceHandle
from worker.chat_format import choose_formatter
from worker.chat_template import TemplateError, tokenize_prompt
from worker.chunks import ChunkShaper, collect
from worker.errors import RequestError, context_length_exceeded
from worker.generation import GenerationCancelled, SamplingParams, StopCheck
from worker.sampler_chain import GrammarError
from worker.structured import json_grammar
from worker.tool_calls import ToolCallStream, forced_call_grammar, tool_names
from worker.memory_use import measure_process_memory

log = logging.getLogger(__name__)

KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids
__all__ = ["Engine", "EngineSettings", "GenerationCancelled", "StopCheck"]


@dataclass(frozen=True)
class EngineSettings:
    model_name: str
    path: str
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int | None = None
    chat_format: str | None = None
    flash_attn: bool | None = None  # None: llama.cpp's auto, as llama-server
    kv_type: str = "f16"
    embedding: bool = False
    n_batch: int = 512
    n_ubatch: int = 512
    parallel: int = 1  # requests decoded together (slots), each with the full n_ctx
    gpu_index: int | None = None  # the one GPU placement chose; None: llama.cpp's own choice
    # A split across machines (issue 13): llama.cpp RPC servers of helper nodes, each taking
    # `rpc_layers[i]` of the offloaded layers (in layer order, the first layers), this node's GPU the rest.
    rpc_servers: tuple[str, ...] = ()
    rpc_layers: tuple[int, ...] = ()
    cpu_repack: bool = True  # False: the CPU computes on the weights as stored (as a split does)


def default_threads() -> int:
    """Physical cores: llama.cpp's decode is memory-bound and hyperthreads only contend."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:
        return max(1, (os.cpu_count() or 2) // 2)


class Engine:
    def __init__(self, settings: EngineSettings, on_load_progress=None, pieces_every_s: float = 0.0,
                 cpu_share=None) -> None:
        """`pieces_every_s`: a stream's pieces reach its reader in bundles at most this often
        (worker/batch_engine.py), for a reader that forwards them in batches anyway.
        `cpu_share`: the machine's table of decoding replicas (worker/cpu_share.py)."""
        import llama_cpp

        self.settings = settings
        self.pieces_every_s = pieces_every_s
        started = time.perf_counter()
        self.batch: BatchedEngine | None = None
        if settings.embedding:
            self.llama = llama_cpp.Llama(**self._llama_kwargs(settings))
        else:
            self.llama = llama_cpp.Llama(model_path=settings.path, vocab_only=True, n_ctx=64, verbose=False)
            self.batch = BatchedEngine(
                settings.path,
                n_ctx_per_slot=settings.n_ctx,
                n_slots=settings.parallel,
                n_batch=max(settings.n_batch, settings.parallel + 64),
                n_ubatch=settings.n_ubatch,
                n_threads=settings.n_threads or default_threads(),
                flash_attn=settings.flash_attn,
                type_k=KV_TYPES[settings.kv_type] if settings.kv_type != "f16" else None,
                type_v=KV_TYPES[settings.kv_type] if settings.kv_type != "f16" else None,
                on_load_progress=on_load_progress,
                cpu_share=cpu_share,
                **_layer_settings(settings),
            )
        self.load_seconds = time.perf_counter() - started
        self.architecture = self.llama.metadata.get("general.architecture", "unknown")
        self.formatter = choose_formatter(self.llama, settings.chat_format)
        self.n_ctx = settings.n_ctx if self.batch is not None else self.llama.n_ctx()
        self._nvml = None
        self.decode_rates: deque[float] = deque(maxlen=8)  # tokens/s of recent requests that ran alone

    @staticmethod
    def _llama_kwargs(settings: EngineSettings) -> dict[str, Any]:
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
        gpu = usable_gpu(settings.gpu_index, settings.n_gpu_layers)
        if gpu is not None:
            import llama_cpp

            kwargs["split_mode"] = llama_cpp.LLAMA_SPLIT_MODE_NONE
            kwargs["main_gpu"] = gpu
        if settings.flash_attn:
            kwargs["flash_attn"] = True
        if settings.kv_type != "f16":
            kwargs["type_k"] = kwargs["type_v"] = KV_TYPES[settings.kv_type]
        return kwargs

    def close(self) -> None:
        """Free the context and the weights now (an unload), not when the collector gets to it."""
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        llama, self.llama = self.llama, None
        if llama is not None:
            llama.close()

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
            "parallel": self.batch.n_slots if self.batch is not None else 1,
            "slots": self.slots(),
            **self.threads(),
        }

    def threads(self) -> dict:
        """CPU threads: its own, and what it decodes with now (its share while other replicas
        on the machine decode too, worker/cpu_share.py)."""
        if self.batch is None:
            own = self.settings.n_threads or default_threads()
            return {"threads": own, "threads_now": own}
        return {"threads": self.batch.threads[0], "threads_now": self.batch.threads_now[0]}

    def slots(self) -> dict:
        """Busy and waiting requests, and what the prompt cache has saved."""
        if self.batch is None:
            return {"total": 1}
        b = self.batch
        return {"total": b.n_slots, "active": b.active, "queued": b.queued,
                "cached_tokens": b.stats["cached_tokens"], "prefilled_tokens": b.stats["prefilled_tokens"]}

    def memory(self) -> dict:
        if self._nvml is None:
            from worker.probe import NvmlSession

            self._nvml = NvmlSession()
        return measure_process_memory(os.getpid(), self._nvml)

    # ---- prompts -----------------------------------------------------------------------
    def _tokens_for_chat(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        try:
            rendered = self.formatter.render(messages, tools)
        except TemplateError as exc:  # the template refused the conversation (e.g. roles must alternate)
            raise RequestError(
                f"model '{self.settings.model_name}' cannot format these messages: {exc}", param="messages"
            ) from None
        return tokenize_prompt(self.llama, rendered)

    def _tokens_for_text(self, prompt: str) -> list[int]:
        return self.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def _check_fits(self, prompt_tokens: int, max_tokens: int | None, param: str = "messages") -> int:
        """Tokens left for the answer; raise context_length_exceeded when none are."""
        room = self.n_ctx - prompt_tokens
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise context_length_exceeded(prompt_tokens, max_tokens, self.n_ctx, param)
        return room if max_tokens is None else max_tokens

    def _params(self, tokens: list[int], sampling: dict, param: str, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=self._check_fits(len(tokens), sampling.get("max_tokens"), param),
            temperature=sampling.get("temperature", 0.8),
            top_p=sampling.get("top_p", 0.95),
            top_k=sampling.get("top_k", 40),
            min_p=sampling.get("min_p", 0.05),
            repeat_penalty=sampling.get("repeat_penalty", 1.0),
            presence_penalty=sampling.get("presence_penalty") or 0.0,
            frequency_penalty=sampling.get("frequency_penalty") or 0.0,
            seed=sampling.get("seed"),
            stop=tuple(sampling.get("stop") or ()),
            logprobs=logprobs,
        )

    # ---- generation --------------------------------------------------------------------
    def stream_chat(self, messages: list[dict], sampling: dict, should_stop: StopCheck | None = None) -> Iterator[dict]:
        """OpenAI chat.completion.chunk dicts; the last one carries finish_reason and usage."""
        tools = sampling.get("tools") or None
        tool_choice = sampling.get("tool_choice") or ("auto" if tools else None)
        if tool_choice == "none":
            tools = None
        grammar = json_grammar(sampling.get("response_format"))
        forced = bool(tools) and (tool_choice == "required" or isinstance(tool_choice, dict))
        if forced:
            if grammar is not None:
                raise RequestError("response_format cannot be combined with a required tool call",
                                   param="response_format")
            grammar = forced_call_grammar(tools, tool_choice)
        tokens = self._tokens_for_chat(messages, tools)
        logprobs = (sampling.get("top_logprobs") or 0) if sampling.get("logprobs") else None
        params = self._params(tokens, sampling, "messages", logprobs)
        calls = ToolCallStream(self.formatter.tool_format, tool_names(tools), forced,
                               parallel=sampling.get("parallel_tool_calls", True)) if tools else None
        handle = self._submit(tokens, params, grammar, should_stop, "tools" if forced else "response_format")
        return self._chunks("chat", handle, params, calls)

    def stream_text(self, prompt: str, sampling: dict, should_stop: StopCheck | None = None) -> Iterator[dict]:
        """OpenAI text_completion chunks; the last one carries finish_reason and usage."""
        tokens = self._tokens_for_text(prompt)
        params = self._params(tokens, sampling, "prompt", sampling.get("logprobs"))
        handle = self._submit(tokens, params, None, should_stop, "prompt")
        return self._chunks("text", handle, params, None)

    def _submit(self, tokens: list[int], params: SamplingParams, grammar, should_stop, grammar_param: str) -> SequenceHandle:
        """Queue the request now (not when the first chunk is asked for), so what llama.cpp
        refuses is the caller's error before any byte is sent."""
        batch = self._generative()
        try:
            return batch.submit(tokens, params, grammar._grammar if grammar is not None else None, should_stop,
                                self.pieces_every_s)
        except GrammarError as exc:
            raise RequestError(f"the grammar for {grammar_param} does not parse: {exc}", param=grammar_param,
                               code="invalid_json_schema") from None

    def _generative(self) -> BatchedEngine:
        if self.batch is None:
            raise RequestError(f"model '{self.settings.model_name}' serves embeddings only", param="model",
                               code="model_not_generative")
        return self.batch

    def _chunks(self, kind: str, handle: SequenceHandle, params: SamplingParams,
                calls: ToolCallStream | None) -> Iterator[dict]:
        shaper = ChunkShaper(kind, self.settings.model_name, with_logprobs=params.logprobs is not None)
        started = time.perf_counter()
        try:
            yield from shaper.opening()
            for piece in handle:
                text = calls.feed(piece.text) if calls is not None else piece.text
                chunk = shaper.content(text, piece.logprobs)
                if chunk is not None:
                    yield chunk
        finally:
            handle.cancel()  # a no-op once it ended; frees the slot if the reader left early
        outcome = handle.outcome
        finish_reason = outcome.finish_reason
        if calls is not None:
            rest, found = calls.finish()
            if rest:
                yield shaper.content(rest, [])
            if found:
                yield from shaper.tool_calls(found)
                finish_reason = "tool_calls"
        elapsed = time.perf_counter() - started
        if outcome.completion_tokens > 8 and elapsed > 0 and self._ran_alone(handle):
            self.decode_rates.append(outcome.completion_tokens / elapsed)
        yield shaper.closing(finish_reason, outcome.prompt_tokens, outcome.completion_tokens,
                             cached_tokens=outcome.cached_tokens)

    def _ran_alone(self, handle: SequenceHandle) -> bool:
        """Whether its rounds decoded no other sequence: only then is its rate the node's speed."""
        if self.batch is None or not handle.token_steps:
            return False
        first, last = handle.token_steps[0], handle.token_steps[-1]
        rounds = list(self.batch.rounds)  # one C call: the decode thread cannot append meanwhile
        return all(generated <= 1 for step, generated, _ in rounds if first <= step <= last)

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
        counts = []
        for index, text in enumerate(inputs):
            tokens = self._tokens_for_text(text)
            self._check_fits(len(tokens), None, "input")
            if len(tokens) > self.settings.n_batch:  # llama.cpp embeds one batch at a time
                raise RequestError(
                    f"input[{index}] is {len(tokens)} tokens; this model embeds at most {self.settings.n_batch}",
                    param="input",
                    code="context_length_exceeded",
                )
            counts.append(len(tokens))
        # One call for all the inputs: llama-cpp-python packs as many sequences as fit into each
        # decode (n_batch tokens), rather than one decode per input.
        vectors = self.llama.embed(list(inputs)) if inputs else []
        data = [{"object": "embedding", "index": i, "embedding": _pooled(v)} for i, v in enumerate(vectors)]
        prompt_tokens = sum(counts)
        return {
            "object": "list",
            "data": data,
            "model": self.settings.model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }


def _layer_settings(settings: EngineSettings) -> dict[str, Any]:
    """Where the layers go. Split across machines: the RPC servers' devices take the first
    offloaded layers and this node's GPU the rest; where this build has no such GPU (a
    declared machine on a CPU-only host) the rest stays on its CPU, as any layer placed on a
    GPU it cannot see. A split computes on weights as stored (no CPU repacking): only the
    token embedding is on the main node's CPU, and an RPC server's CPU device (tests) and a
    local one then give the same numbers."""
    gpu = usable_gpu(settings.gpu_index, settings.n_gpu_layers)
    if not settings.rpc_servers:
        return {"n_gpu_layers": settings.n_gpu_layers, "gpu": gpu, "cpu_repack": settings.cpu_repack}
    n_gpu_layers = settings.n_gpu_layers if gpu is not None else sum(settings.rpc_layers)
    return {"n_gpu_layers": n_gpu_layers, "gpu": gpu, "rpc_servers": tuple(settings.rpc_servers),
            "rpc_layers": tuple(settings.rpc_layers), "cpu_repack": False}


def usable_gpu(gpu_index: int | None, n_gpu_layers: int) -> int | None:
    """The GPU to pin the model to, when this llama.cpp build has that GPU: a node whose
    hardware is declared (a test, a plan) may name GPUs a CPU build cannot see."""
    if gpu_index is None or n_gpu_layers == 0:
        return None
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return None
    # CUDA numbers GPUs fastest first unless told otherwise; NVML (the probe, placement)
    # numbers them by PCI bus. The replica sets CUDA_DEVICE_ORDER=PCI_BUS_ID so both agree.
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    return gpu_index if gpu_index < count else None


def _pooled(vectors: list) -> list[float]:
    """One vector per input: a model without pooling returns one per token; average them."""
    if vectors and isinstance(vectors[0], list):
        n = len(vectors)
        return [sum(column) / n for column in zip(*vectors)]
    return vectors


