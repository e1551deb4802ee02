"""ModelReplica: a Ray actor that owns one llama.cpp model in its own process.

Chat and text requests run on a pool of threads ("requests"), each handing its prompt to
the engine's batched decoder (worker/batch_engine.py), which serves `parallel` of them at
once and queues the rest; none of these threads touches llama.cpp's decoding. Loading and
embeddings (llama-cpp-python's `Llama`, not thread-safe) run one at a time on the "engine"
thread; `info()` and `cancel()` answer from "control" while requests run. A stream's
ready-to-send server-sent-event bytes go to the outbox (worker/stream_outbox.py), and from
there, with every other stream's for the same gateway, in one message of `pump` a tick, so
the gateway only forwards them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
import time
from typing import Iterator

import ray

from orchestrator.core.estimate import GC_EVERY_REQUESTS  # the estimate allows for what this leaves
from worker.cpu_share import CpuBoard, place_offset
from worker.engine import Engine, EngineSettings, GenerationCancelled, default_threads
from worker.errors import RequestError
from worker.stream_outbox import StreamOutbox
from worker.thread_binding import bind_threads_if_whole_machine, usable_cpus

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
FLUSH_INTERVAL_S = 0.05  # per decoding stream: more streams flush less often (_flush_interval)
MIN_FLUSH_INTERVAL_S, MAX_FLUSH_INTERVAL_S = 0.1, 0.25
PUMP_IDLE_S = 60.0  # a gateway's pump ends after this long with no stream of its own (it opens another)
CANCELLED_KEPT_S = 600.0  # a cancel may arrive while its request still waits in the queue
REQUEST_THREADS = 32  # requests in the replica at once; the router admits slots + its queue
PUMP_THREADS = 4  # gateways streaming from the replica at once (a restarted one beside the old)


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ModelReplicaImpl:
    def __init__(self, replica_id: str, settings: dict, limits: dict | None = None) -> None:
        self.replica_id = replica_id
        self.settings = EngineSettings(**settings)
        self.engine: Engine | None = None
        self.state = "loading"
        self.reason: str | None = None
        self.lock = threading.Lock()
        self.served = 0
        self.load_progress: float | None = None  # 0..1 while llama.cpp loads the weights
        self.cancelled: dict[str, float] = {}  # request id -> when its client went away
        # Requests inside this replica now (the gateway reconciles its count with it); a set,
        # as add and discard are atomic under the GIL where `n += 1` is not.
        self.in_progress: set[object] = set()
        self.generation_limit_s = float(limits.get("generation_limit_s", 600.0)) if limits else 600.0
        self.threads_bound = False  # llama.cpp's threads one to a core (worker/thread_binding.py)
        self.cpu_board: CpuBoard | None = None  # the machine's decoding replicas (worker/cpu_share.py)
        self.outbox = StreamOutbox(self._flush_interval_s)

    # ---- lifecycle -------------------------------------------------------------------
    def load(self) -> dict:
        """Load the model; failure is a value with its reason, not a dead actor."""
        # CUDA's own numbering puts the fastest GPU first; placement's (NVML) follows the PCI bus.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        with self.lock:
            if self.engine is None and self.state != "failed":
                try:
                    if not os.path.isfile(self.settings.path):
                        raise FileNotFoundError(f"model file not found on {socket.gethostname()}: {self.settings.path}")
                    self.cpu_board = _claim_cpu_board()
                    first_core = place_offset(self.cpu_board.index, usable_cpus()) if self.cpu_board else 0
                    self.threads_bound = bind_threads_if_whole_machine(self.settings.n_threads or default_threads(),
                                                                       first_core=first_core)
                    # Streams are sent in batches (_flush_interval): no need to wake for every token.
                    self.engine = Engine(self.settings, on_load_progress=self._loading,
                                         pieces_every_s=MIN_FLUSH_INTERVAL_S, cpu_share=self.cpu_board)
                    self.state = "ready"
                    # Ray's modules and the model's metadata are here for good: keep them out of
                    # the collector's full passes (~50 ms each, holding the GIL the decode
                    # thread needs between rounds).
                    gc.collect()
                    gc.freeze()
                except Exception as exc:  # the engine's errors are many; the reason is what matters
                    self.state = "failed"
                    self.reason = _load_failure_reason(self.settings.path, exc)
        return self.info()

    def _loading(self, fraction: float) -> None:
        self.load_progress = fraction

    def info(self) -> dict:
        out = {
            "replica_id": self.replica_id,
            "state": self.state,
            "reason": self.reason,
            "pid": os.getpid(),
            "served": self.served,
            "requests_in_progress": len(self.in_progress),
            "load_progress": self.load_progress,
            "threads_bound": self.threads_bound,
        }
        if self.engine is not None:
            out.update(self.engine.describe())
            try:
                out["memory"] = self.engine.memory()
            except Exception as exc:  # a driver quirk must not make a working replica look dead
                out["memory_error"] = str(exc)
        return out

    # ---- requests --------------------------------------------------------------------
    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise RequestError(
                f"model '{self.settings.model_name}' is not ready ({self.state})", status=503, type="server_error"
            )
        return self.engine

    def chat(self, messages: list[dict], sampling: dict, request_id: str = "") -> dict:
        return self._whole(lambda e, stop: e.chat(messages, sampling, stop), request_id)

    def complete(self, prompt: str, sampling: dict, request_id: str = "") -> dict:
        return self._whole(lambda e, stop: e.complete(prompt, sampling, stop), request_id)

    def embed(self, inputs: list[str], request_id: str = "") -> dict:
        with self.lock:  # llama-cpp-python's Llama: one call at a time
            return self._whole(lambda e, stop: e.embed(inputs), request_id)

    def _whole(self, call, request_id: str) -> dict:
        mark = object()
        self.in_progress.add(mark)
        try:
            if self._was_cancelled(request_id):
                return {"error": _client_left()}
            result = call(self._ready_engine(), self._stop_check(request_id))
            self._served_one()
            return result
        except RequestError as exc:
            return {"error": exc.as_dict()}
        except GenerationCancelled:
            return {"error": _client_left()}
        finally:
            self.in_progress.discard(mark)
            self.cancelled.pop(request_id, None)

    def _stop_check(self, request_id: str):
        """Before each token: has the client left, or has the answer run past the time limit?"""
        deadline = time.monotonic() + self.generation_limit_s

        def check() -> str | None:
            if request_id and request_id in self.cancelled:
                return "cancelled"
            return "length" if time.monotonic() > deadline else None

        return check

    def _was_cancelled(self, request_id: str) -> bool:
        return bool(request_id) and request_id in self.cancelled

    def _served_one(self) -> None:
        self.served += 1
        # llama-cpp-python leaves a sampler cycle (n_vocab x 12 bytes) per completion that only
        # a full collection frees: 3 MiB a request for Gemma, unbounded if left alone.
        if self.served % GC_EVERY_REQUESTS == 0:
            gc.collect()

    def serve_chat(self, messages: list[dict], sampling: dict, request_id: str, consumer: str) -> None:
        """Stream a chat answer to `consumer`'s pump (the gateway that asked)."""
        self._serve(lambda e, stop: e.stream_chat(messages, sampling, stop), sampling, request_id, consumer)

    def serve_text(self, prompt: str, sampling: dict, request_id: str, consumer: str) -> None:
        self._serve(lambda e, stop: e.stream_text(prompt, sampling, stop), sampling, request_id, consumer)

    def pump(self, consumer: str) -> Iterator[dict]:
        """The consumer's streams, all in one message a tick: {request id: [items]}, each
        stream's items in order: first {"error": ...} or b"" (accepted), then SSE bytes, then
        None (its end). Ends after PUMP_IDLE_S with no stream of the consumer open, or when a
        newer pump of the same consumer starts."""
        token = self.outbox.attach(consumer)
        try:
            while True:
                batch = self.outbox.take(consumer, PUMP_IDLE_S, token)
                if batch is None:
                    return
                yield batch
        finally:
            self.outbox.detach(consumer, token)

    def _serve(self, start, sampling: dict, request_id: str, consumer: str) -> None:
        self.outbox.open(consumer, request_id)
        try:
            for item, urgent in self._stream(start, sampling, request_id):
                self.outbox.put(consumer, request_id, item, urgent)
        except Exception as exc:  # in order after what was sent: the gateway ends the stream with an error
            log.exception("stream %s failed", request_id)
            self.outbox.put(consumer, request_id, RuntimeError(f"{type(exc).__name__}: {exc}"))
        finally:
            self.outbox.end(consumer, request_id)

    def _flush_interval_s(self) -> float:
        batch = self.engine.batch if self.engine is not None else None
        return _flush_interval(batch.active if batch is not None else 1)

    def cancel(self, request_id: str) -> None:
        """The client went away: stop generating for it at the next token, or skip it if it
        still waits its turn."""
        if not request_id:
            return
        now = time.monotonic()
        self.cancelled = {k: t for k, t in self.cancelled.items() if now - t < CANCELLED_KEPT_S}
        self.cancelled[request_id] = now

    def _stream(self, start, sampling: dict, request_id: str) -> Iterator[tuple[object, bool]]:
        """(item, whether to send it at once): first {"error": ...} or b"" (accepted), then
        SSE bytes, the last ending with [DONE]; a cancelled stream ends without it."""
        mark = object()
        self.in_progress.add(mark)
        try:
            if self._was_cancelled(request_id):
                yield {"error": _client_left()}, True
                return
            try:
                chunks = start(self._ready_engine(), self._stop_check(request_id))
            except RequestError as exc:
                yield {"error": exc.as_dict()}, True
                return
            yield b"", True
            first_text = True
            try:
                for event, has_content in _sse_events(chunks, sampling.get("include_usage")):
                    yield event, first_text and has_content  # the first token goes at once
                    first_text = first_text and not has_content
            except GenerationCancelled:
                return
            yield SSE_DONE, True
            self._served_one()
        finally:
            self.in_progress.discard(mark)
            self.cancelled.pop(request_id, None)


def _flush_interval(active: int) -> float:
    """Seconds between a replica's messages to a gateway: 10 a second for one or two streams,
    fewer as more decode (at most 4 a second): the gateway writes to each client once a
    message, and every write costs the decoding threads CPU on a small machine. The first
    token always goes at once."""
    return min(MAX_FLUSH_INTERVAL_S, max(MIN_FLUSH_INTERVAL_S, FLUSH_INTERVAL_S * active))


def _sse_events(chunks: Iterator[dict], include_usage: bool) -> Iterator[tuple[bytes, bool]]:
    """(SSE bytes, whether it carries generated text) for each OpenAI chunk."""
    for chunk in chunks:
        usage = chunk.pop("usage", None)
        if usage is not None and include_usage:
            # OpenAI's stream_options.include_usage: a last chunk with no choices.
            yield sse(chunk), False
            chunk = {**chunk, "choices": [], "usage": usage}
        elif usage is not None:
            chunk["usage"] = usage
        choice = chunk["choices"][0] if chunk["choices"] else {}
        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        yield sse(chunk), bool(text)


def _claim_cpu_board() -> CpuBoard | None:
    board = CpuBoard()
    try:
        board.claim()
    except (ImportError, OSError, RuntimeError) as exc:  # no shared memory: every thread, as before
        log.warning("replicas on this machine will not share its cores: %s", exc)
        return None
    return board


def _client_left() -> dict:
    return RequestError("the client closed the connection before the answer was ready", status=499,
                        code="client_closed_request").as_dict()


def _load_failure_reason(path: str, exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return str(exc)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            return f"not a GGUF file: {path} (starts with {magic!r})"
    except OSError as io_exc:
        return f"cannot read {path}: {io_exc.strerror}"
    detail = str(exc) or type(exc).__name__
    return f"llama.cpp could not load {path}: {detail}"


def replica_actor_class(control_concurrency: int = 2):
    """The Ray actor class; built on demand so this module imports without a Ray runtime.

    Loading and embeddings run in the "engine" group: one thread, always the same one
    (llama.cpp's OpenMP keeps a thread team per calling thread; calls arriving on a pool
    of threads made extra teams that fought over the cores). Generation decodes on the
    batched engine's own thread, whatever thread of "requests" submitted it.
    """
    return ray.remote(
        num_cpus=0,
        max_restarts=0,
        concurrency_groups={"engine": 1, "requests": REQUEST_THREADS, "control": control_concurrency,
                            "pump": PUMP_THREADS},
    )(ModelReplicaImpl)


for _name in ("load", "embed"):
    setattr(ModelReplicaImpl, _name, ray.method(concurrency_group="engine")(getattr(ModelReplicaImpl, _name)))
for _name in ("chat", "complete", "serve_chat", "serve_text"):
    setattr(ModelReplicaImpl, _name, ray.method(concurrency_group="requests")(getattr(ModelReplicaImpl, _name)))
ModelReplicaImpl.pump = ray.method(num_returns="streaming", concurrency_group="pump")(ModelReplicaImpl.pump)
ModelReplicaImpl.info = ray.method(concurrency_group="control")(ModelReplicaImpl.info)
ModelReplicaImpl.cancel = ray.method(concurrency_group="control")(ModelReplicaImpl.cancel)
