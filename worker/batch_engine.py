"""Continuous batching: one llama.cpp context serves `n_slots` sequences at once.

One decode thread owns the context and works in rounds. A round gives every generating
sequence one token, all in a single `llama_decode`, then prefills prompt chunks, oldest
prompt first, `n_batch - n_slots` prompt tokens in all (at least one chunk): never more
than `n_batch` tokens a round, so a long prompt delays the running streams by one chunk a
round, never until it ends. With up to 3 sequences in the engine each chunk has a
`llama_decode` of its own (below, determinism); from 4, the waiting prompts share one,
which costs one pass over the weights instead of one each (8 prompts, 236 tokens, on 2
cores: 263 ms instead of 285). While requests come in bursts, an idle engine's first
request waits 10 ms for more (`_gather_burst`), so that a burst starts together: with
both, waves of 8 streams through `homefleet up` gave 2.6% more tokens/s, of 4 streams 1.0%
(medians of 8 interleaved pairs), one stream among bursts 0.4% fewer (one request at a
time never waits). Each sequence
samples with its own llama.cpp sampler chain (worker/sampler_chain.py) from its own row
of logits, and turns tokens into text with the single path's assembler (stop strings,
held-back tails, log-probabilities). No Ray, no OpenAI shapes here.

KV: `n_ctx_per_slot * n_slots` cells split into one stream per slot (`kv_unified=False`,
the default): every slot has its full context by construction, a token attends only to
its own sequence's cells, and idle slots keep theirs as prompt cache. A unified KV costs
the same memory (less for sliding-window layers) but makes every token attend over the
cells of all slots (10-12% slower rounds with 900 tokens cached per slot, Gemma 3 270M on
2 cores) and makes a sequence's numbers depend on where its neighbours' cells lie. Its
one advantage, no cost for gaps between busy slots (llama.cpp decodes a round in one
graph per run of consecutive slot ids), is had by choosing slots that keep the busy ones
together (orchestrator/core/slots.py).

Determinism: with at most 3 sequences in the engine, prompt chunks have the same
boundaries whatever else runs (a long prompt that shared a round with 4 or more keeps the
boundaries it got there), and a round with at most 3 generating sequences runs the
same CPU kernels as a round with one, so such a
request gives bit-identical logits (and text, for a seed) alone or beside others, given
the same prompt-cache state. From 4 tokens in a round llama.cpp's CPU matmuls switch to
other kernels (repacked gemm), whose rounding differs (0.1-0.3 in a top log-probability
on Gemma 3 270M), so text can fork where two tokens nearly tie; llama-server is the same.

Prompt cache: every slot remembers the tokens its KV holds; a new request takes the idle
slot chosen by orchestrator/core/slots.py (a long reusable prefix, else keep busy slots
together and evict the least; requests admitted in one round choose together), the rest
of that sequence's KV is removed and only the suffix is prefilled.
Requests beyond the slots wait in a FIFO queue; the caller bounds it (`queued`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from orchestrator.core.slots import MIN_REUSE_TOKENS, SlotSnapshot, assign_slots
from worker.cpu_share import CpuBoard, shared_threads
from worker.generation import GenerationCancelled, Outcome, Piece, SamplingParams, StopCheck, _TextAssembler
from worker.generation import TokenPieces, token_logprob
from worker.sampler_chain import SamplerChain

log = logging.getLogger(__name__)

# While requests come in bursts, an idle engine's first request waits for the rest of its
# burst (_gather_burst): up to BURST_GAP_S after each arrival, BURST_GAPS_AT_MOST of them in
# all. A burst is seen when a request joins work that began (from idle) less than
# BURST_WINDOW_S before; BURSTY_FOR_S after the last one, the first request starts at once
# again: one request at a time never waits.
BURST_GAP_S, BURST_GAPS_AT_MOST = 0.01, 4
BURST_WINDOW_S, BURSTY_FOR_S = 0.25, 60.0
# From this many sequences in a round llama.cpp's CPU matmuls run other kernels than for one
# (repacked gemm): a request's numbers differ from its solo run's anyway (module docstring).
BATCHED_KERNELS_FROM = 4

__all__ = ["BatchOutcome", "BatchedEngine", "SequenceHandle", "context_params"]


@dataclass
class BatchOutcome(Outcome):
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the slot's KV (prompt cache)
    slot: int = -1


class SequenceHandle:
    """One submitted request. Iterate it for Pieces (blocks); `outcome` is complete when
    the iteration ends. Cancelled (by `should_stop` or `cancel()`): GenerationCancelled.
    Leaving the iteration early cancels it."""

    def __init__(self, prompt: list[int], params: SamplingParams, should_stop: StopCheck | None,
                 pieces_every_s: float = 0.0) -> None:
        self.prompt = prompt
        self.params = params
        self.should_stop = should_stop
        self.pieces_every_s = pieces_every_s  # hand pieces to the reader at most this often (the first at once)
        self._held: list[Piece] = []  # pieces decoded but not yet handed over
        self._handed_at: float | None = None  # when pieces last went to the reader
        self.outcome = BatchOutcome(prompt_tokens=len(prompt))
        self.token_steps: list[int] = []  # the engine round in which each answer token was sampled
        self.submitted_step = -1  # engine step count when submitted, admitted (got a slot), finished
        self.admitted_step = -1
        self.finished_step = -1
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._done = threading.Event()

    def __iter__(self) -> Iterator[Piece]:
        finished = False
        try:
            while True:
                kind, value = self._events.get()
                if kind == "pieces":
                    yield from value
                elif kind == "end":
                    finished = True
                    return
                elif kind == "cancelled":
                    finished = True
                    raise GenerationCancelled
                else:
                    finished = True
                    raise value
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        """Stop at the next step; the slot is free for the next request at once."""
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _verdict(self) -> str | None:
        if self._cancelled.is_set():
            return "cancelled"
        return self.should_stop() if self.should_stop is not None else None


@dataclass(eq=False)
class _Slot:
    id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV holds
    last_used: int = 0
    seq: _Sequence | None = None


@dataclass(eq=False)
class _Sequence:
    handle: SequenceHandle
    slot: _Slot
    sampler: SamplerChain
    text: _TextAssembler
    pending: list[int]  # tokens to decode next: the prompt's rest, or the last sampled token
    admitted: int  # order of admission: prefill goes oldest first
    generated: int = 0

    @property
    def prefilling(self) -> bool:
        return self.generated == 0


class BatchedEngine:
    def __init__(self, model, *, n_ctx_per_slot: int, n_slots: int, n_batch: int = 512, n_ubatch: int | None = None,
                 n_threads: int | None = None, n_threads_batch: int | None = None, kv_unified: bool = False,
                 flash_attn: bool | None = None, type_k: int | None = None, type_v: int | None = None,
                 swa_full: bool = False, min_cache_reuse: int = MIN_REUSE_TOKENS, n_gpu_layers: int = 0,
                 gpu: int | None = None, verbose: bool = False, on_load_progress=None,
                 rpc_servers: tuple[str, ...] = (), rpc_layers: tuple[int, ...] = (), cpu_repack: bool = True,
                 cpu_share: CpuBoard | None = None, burst_gap_s: float = BURST_GAP_S) -> None:
        """`model`: a GGUF path (loaded here) or a llama_cpp.Llama whose weights are shared
        (its own context stays as it is). `gpu`: the one GPU (index) a loaded model's
        offloaded layers go to; None lets llama.cpp spread them over all GPUs.
        `on_load_progress(fraction)`: called as llama.cpp loads the weights.
        `rpc_servers`: llama.cpp RPC servers (HOST:PORT) of other machines whose devices take
        `rpc_layers` of the `n_gpu_layers` offloaded layers each, the first ones; this node's
        GPU (`gpu`), if any, the rest (worker/ggml_rpc.py). `cpu_repack` False keeps the CPU's
        weights as they are in the file (no repacked kernels; an RPC server's CPU device never
        repacks): the same CPU arithmetic on both sides of a split, for a like-for-like check.
        `flash_attn` None is llama.cpp's "auto" (on where the backend supports it, as
        llama-server does; 4-8% more tokens/s at 8 streams on this CPU). `cpu_share`: the
        machine's table of decoding replicas (worker/cpu_share.py); while others decode too,
        a model that computes on the CPU takes its share of the threads."""
        import llama_cpp

        from worker.engine import default_threads

        if n_batch <= n_slots:
            raise ValueError(f"n_batch ({n_batch}) must exceed n_slots ({n_slots}): a round holds a token for "
                             "every slot and a chunk of prompt")
        self._llama_cpp = llama_cpp
        self._owner = None  # keeps the Llama alive when its model is borrowed
        if isinstance(model, str):
            self.model = _load_model(model, n_gpu_layers, gpu, verbose, on_load_progress, rpc_servers, rpc_layers,
                                     cpu_repack)
        else:
            self._owner, self.model = model, model._model
        self.n_slots = n_slots
        self.n_ctx_per_slot = n_ctx_per_slot
        self.n_batch = n_batch
        self.prefill_chunk = n_batch - n_slots  # so that a round never holds more than n_batch tokens
        self.min_cache_reuse = min_cache_reuse
        self.burst_gap_s = burst_gap_s
        self._left_idle_at = -float("inf")  # when the engine last began work from idle
        self._bursty_until = -float("inf")  # requests come in bursts until then (monotonic)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model.model))
        threads = n_threads or default_threads()
        self.threads = (threads, n_threads_batch or threads)  # its own (decode, prompt) threads
        self.threads_now = self.threads
        self.rounds_by_threads: dict[int, int] = {}  # decode threads -> rounds run with that many
        computes_on_cpu = (n_gpu_layers <= llama_cpp.llama_model_n_layer(self.model.model)
                           or not llama_cpp.llama_supports_gpu_offload())
        self._cpu_share = cpu_share if computes_on_cpu else None
        params = context_params(n_ctx_per_slot, n_slots, n_batch, n_ubatch=n_ubatch, n_threads=threads,
                                n_threads_batch=n_threads_batch, kv_unified=kv_unified, flash_attn=flash_attn,
                                type_k=type_k, type_v=type_v, swa_full=swa_full)
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {n_slots} slots")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._tokens = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self._n_seq_id = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))
        self._logits = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))
        self._n_seq_id[:] = 1
        self.pieces = TokenPieces(self.model)
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.step = 0  # rounds so far: each gives every generating sequence one token
        self.decode_calls = 0
        self.rounds: deque[tuple[int, int, int]] = deque(maxlen=4096)  # (round, tokens generated, prompt tokens)
        self.stats = {"decoded_tokens": 0, "prefilled_tokens": 0, "cached_tokens": 0, "requests": 0}
        self._queue: deque[tuple[SequenceHandle, SamplerChain]] = deque()
        self._chores: list = []  # callables the decode thread runs between rounds
        self._outbox: list[tuple[SequenceHandle, str, object]] = []  # events not yet handed to their callers
        self._admitted = 0
        self._use = 0
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()  # submit's sampler against close's free of the model
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="batched-decode", daemon=True)
        self._thread.start()

    # ---- callers ---------------------------------------------------------------------
    def submit(self, prompt_tokens: list[int], params: SamplingParams, grammar_gbnf: str | None = None,
               should_stop: StopCheck | None = None, pieces_every_s: float = 0.0) -> SequenceHandle:
        """Queue a request; iterate the handle for its Pieces. A prompt (with max_tokens)
        longer than a slot's context, or a grammar llama.cpp cannot parse, is a ValueError.
        `pieces_every_s`: the reader gets its pieces in bundles at most this often (the first
        piece and the end at once): a reader that forwards them in batches anyway (the
        replica) then wakes once a bundle, not once a token."""
        prompt = list(prompt_tokens)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) + max(params.max_tokens, 0) > self.n_ctx_per_slot:
            raise ValueError(f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                             f"{self.n_ctx_per_slot} tokens of a slot")
        with self._model_lock:  # close() frees the model the sampler reads
            if self._closing:
                raise RuntimeError("the engine is closed")
            sampler = SamplerChain(self.model.vocab, self.n_vocab, params, grammar_gbnf)
        handle = SequenceHandle(prompt, params, should_stop, pieces_every_s)
        with self._cond:
            if self._closing:
                sampler.close()
                raise RuntimeError("the engine is closed")
            now = time.monotonic()
            if (self._queue or self.active) and now - self._left_idle_at < BURST_WINDOW_S:
                self._bursty_until = now + BURSTY_FOR_S  # it joins what began moments ago: a burst
            handle.submitted_step = self.step
            self._queue.append((handle, sampler))
            self._cond.notify()
        return handle

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.seq is not None)

    def describe(self) -> dict:
        return {"n_slots": self.n_slots, "n_ctx_per_slot": self.n_ctx_per_slot, "n_ctx": self.n_ctx,
                "n_batch": self.n_batch, "prefill_chunk": self.prefill_chunk, "active": self.active,
                "threads": self.threads[0], "threads_now": self.threads_now[0],
                "queued": self.queued, "steps": self.step, "slots_cached_tokens": [len(s.tokens) for s in self.slots],
                **self.stats}

    def clear_cache(self) -> int:
        """Forget what idle slots hold (their KV and tokens); returns the tokens dropped.
        Runs on the decode thread between rounds."""
        done = threading.Event()
        dropped = [0]

        def clear() -> None:
            for slot in self.slots:
                if slot.seq is None and slot.tokens:
                    self._llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
                    dropped[0] += len(slot.tokens)
                    slot.tokens.clear()
            done.set()

        with self._cond:
            if self._closing:
                return 0
            self._chores.append(clear)
            self._cond.notify()
        done.wait()
        return dropped[0]

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        if self._cpu_share is not None:
            self._cpu_share.idle()
        if self.batch is not None:
            self._llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self._llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self._owner is None and self.model is not None:
            # Weights it loaded itself go now, not whenever the collector runs: a split's weights
            # live on other machines' RPC servers, and freeing them after those stopped aborts.
            with self._model_lock:
                self.model.close()

    def __enter__(self) -> BatchedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the decode thread -----------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self.active == 0:  # no decode follows: hand over what the last round produced now
                self._deliver()
                self._share_cores(idle=True)
            with self._cond:
                waited = False
                while not self._closing and not self._queue and not self._chores and self.active == 0:
                    self._cond.wait()
                    waited = True
                if waited and self._queue and not self._closing:  # the first request after a rest
                    self._gather_burst()
                if self._closing:
                    break
                chores, self._chores = self._chores, []
            try:
                for chore in chores:
                    chore()
                self._drop_stopped()
                self._admit()
                if self.active:
                    self._share_cores()
                    self._step()
            except Exception as exc:  # a failed step must not leave callers waiting for ever
                log.exception("batched decode step failed")
                self._fail_all(exc)
        self._fail_all(RuntimeError("the engine is closed"))
        self._deliver()

    def _gather_burst(self) -> None:
        """An idle engine's first request, while requests come in bursts (BURST_WINDOW_S):
        wait while more keep coming (each within `burst_gap_s` of the last, BURST_GAPS_AT_MOST
        gaps in all), so that the burst starts in one round and its prompts are prefilled
        together. Started at once instead, the first prefill holds every core while the
        burst's other requests are still on their way (through the gateway, Ray, tokenising),
        and they trickle in over 40-130 ms on 2 cores, each then prefilled on its own. Holds
        `_cond`."""
        self._left_idle_at = now = time.monotonic()
        if now >= self._bursty_until or self.burst_gap_s <= 0:
            return
        deadline = now + BURST_GAPS_AT_MOST * self.burst_gap_s
        while not self._closing and len(self._queue) < self.n_slots:
            seen, left = len(self._queue), deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(self.burst_gap_s, left))
            if len(self._queue) == seen:  # a gap with nothing new: the burst, if any, is in
                return

    def _share_cores(self, idle: bool = False) -> None:
        """Before a round: its share of the machine's threads while other replicas decode too,
        all of them when alone. Idle: it says so, and has all of them for whatever comes next."""
        if self._cpu_share is None:
            return
        if idle:
            self._cpu_share.idle()
            now = self.threads
        else:
            decoding = self._cpu_share.decoding()
            now = tuple(shared_threads(own, decoding) for own in self.threads)
            self.rounds_by_threads[now[0]] = self.rounds_by_threads.get(now[0], 0) + 1
        if now != self.threads_now:
            self._llama_cpp.llama_set_n_threads(self.ctx, *now)
            self.threads_now = now

    def _emit(self, handle: SequenceHandle, kind: str, value=None) -> None:
        self._outbox.append((handle, kind, value))

    def _deliver(self) -> None:
        """Hand the round's events to the callers' threads. Called just before the next
        llama_decode, which releases the GIL for the whole decode: the callers' Python (chunk
        shaping, SSE, Ray's stream) then runs while llama.cpp computes, rather than between
        the samplings of a round, where every token woke a caller that the decode thread
        then waited for, for the GIL (8 streams in a Ray actor: sampling took twice as long).
        A handle's pieces go in bundles at most every `pieces_every_s`; the end at once."""
        outbox, self._outbox = self._outbox, []
        now = time.monotonic()
        for handle, kind, value in outbox:
            if kind == "piece":
                handle._held.append(value)
            else:
                self._hand_over(handle, now)
                handle._events.put((kind, value))
                handle._done.set()
        for slot in self.slots:  # an ended request handed its pieces over with its end
            handle = slot.seq.handle if slot.seq is not None else None
            if handle is not None and (handle._handed_at is None or now - handle._handed_at >= handle.pieces_every_s):
                self._hand_over(handle, now)

    @staticmethod
    def _hand_over(handle: SequenceHandle, now: float) -> None:
        if handle._held:
            handle._events.put(("pieces", handle._held))
            handle._held, handle._handed_at = [], now

    def _drop_stopped(self) -> None:
        """Ask every running and waiting request whether to go on (once per step)."""
        for slot in self.slots:
            seq = slot.seq
            if seq is not None:
                try:
                    verdict = seq.handle._verdict()
                except Exception as exc:  # the caller's check failed: that request ends, not the others
                    self._end(seq, "error", exc)
                    continue
                if verdict == "cancelled":
                    self._end(seq, "cancelled")
                elif verdict == "length":
                    self._finish(seq, "length")
        with self._cond:
            waiting = list(self._queue)
        for handle, sampler in waiting:
            try:
                verdict = handle._verdict()
            except Exception:
                verdict = "cancelled"
            if verdict is None:
                continue
            with self._cond:  # cancelled, or out of time, before it started
                self._queue.remove((handle, sampler))
            sampler.close()
            handle.finished_step = self.step
            handle.outcome.finish_reason = "length"
            self._emit(handle, "cancelled" if verdict == "cancelled" else "end")

    def _admit(self) -> None:
        """Seat waiting requests, first come first served, in the idle slots; those that
        start together choose their slots together (orchestrator/core/slots.py)."""
        idle = [s for s in self.slots if s.seq is None]
        with self._cond:
            starting = [self._queue.popleft() for _ in range(min(len(idle), len(self._queue)))]
        if not starting:
            return
        seated = 0
        try:
            snapshots = [SlotSnapshot(s.id, s.tokens, s.last_used, self._oldest_pos(s)) for s in idle]
            busy = [s.id for s in self.slots if s.seq is not None]
            choices = assign_slots(snapshots, [handle.prompt for handle, _ in starting], self.n_swa, busy,
                                   self.min_cache_reuse)
            for (handle, sampler), choice in zip(starting, choices):
                self._seat(handle, sampler, self.slots[choice.slot_id], choice.reused_tokens)
                seated += 1
        except BaseException:  # the rest wait again, where _fail_all finds them
            with self._cond:
                self._queue.extendleft(reversed(starting[seated:]))
            raise

    def _seat(self, handle: SequenceHandle, sampler: SamplerChain, slot: _Slot, reused: int) -> None:
        if not self._llama_cpp.llama_memory_seq_rm(self.memory, slot.id, reused, -1):
            reused = 0
            self._llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
        del slot.tokens[reused:]
        self._admitted += 1
        slot.seq = _Sequence(handle, slot, sampler, _TextAssembler(handle.params.stop), handle.prompt[reused:],
                             self._admitted)
        handle.admitted_step = self.step
        handle.outcome.cached_tokens = reused
        handle.outcome.slot = slot.id
        self.stats["cached_tokens"] += reused
        self.stats["requests"] += 1

    def _oldest_pos(self, slot: _Slot) -> int:
        if not slot.tokens:
            return -1
        return int(self._llama_cpp.llama_memory_seq_pos_min(self.memory, slot.id))

    def _step(self) -> None:
        """One round: a token for every generating sequence in one llama_decode, then prompt
        chunks (oldest prompt first) up to `prefill_chunk` tokens: at most n_batch tokens in
        all. The chunks share one llama_decode from BATCHED_KERNELS_FROM sequences, else each
        has its own."""
        running = sorted((s.seq for s in self.slots if s.seq is not None), key=lambda q: q.slot.id)
        generating = [q for q in running if not q.prefilling]
        if generating:
            self._decode([(q, q.pending) for q in generating])
        prompts = sorted((q for q in running if q.prefilling and q.slot.seq is q), key=lambda q: q.admitted)
        spent = 0
        if len(prompts) > 1 and len(running) >= BATCHED_KERNELS_FROM:
            work = []
            for q in prompts:  # oldest first, as much of each as the round has room for
                chunk = q.pending[:self.prefill_chunk - spent]
                if not chunk:
                    break
                work.append((q, chunk))
                spent += len(chunk)
            # by slot: llama.cpp computes a run of consecutive sequence ids as one ubatch
            self._decode(sorted(work, key=lambda w: w[0].slot.id))
        else:
            for q in prompts:
                chunk = q.pending[:self.prefill_chunk]  # the same boundaries whatever else runs
                if spent and spent + len(chunk) > self.prefill_chunk:
                    break
                self._decode([(q, chunk)])
                spent += len(chunk)
        self.rounds.append((self.step, len(generating), spent))
        self.step += 1

    def _decode(self, work: list[tuple[_Sequence, list[int]]]) -> None:
        """Decode `work` (ordered by slot id) in one llama_decode; sample where a prompt ends
        or a generated token was fed."""
        outputs: list[tuple[_Sequence, int]] = []
        n = 0
        seq_ids = self.batch.seq_id
        for q, chunk in work:
            start = len(q.slot.tokens)
            k = len(chunk)
            self._tokens[n:n + k] = chunk
            self._pos[n:n + k] = np.arange(start, start + k)
            self._logits[n:n + k] = 0
            for i in range(n, n + k):
                seq_ids[i][0] = q.slot.id
            if k == len(q.pending):  # the prompt's end (or a generated token): its logits are sampled
                self._logits[n + k - 1] = 1
                outputs.append((q, n + k - 1))
            n += k
        self.batch.n_tokens = n
        self._deliver()
        code = self._llama_cpp.llama_decode(self.ctx, self.batch)
        self.decode_calls += 1
        if code != 0:
            for q, _ in work:
                self._llama_cpp.llama_memory_seq_rm(self.memory, q.slot.id, -1, -1)
                q.slot.tokens.clear()
                self._end(q, "error", RuntimeError(f"llama_decode returned {code} ({n} tokens in the batch)"))
            return
        for q, chunk in work:
            q.slot.tokens.extend(chunk)
            if q.prefilling:
                self.stats["prefilled_tokens"] += len(chunk)
                del q.pending[:len(chunk)]
            else:
                self.stats["decoded_tokens"] += 1
        for q, index in outputs:
            try:
                self._sampled(q, index)
            except Exception as exc:  # one sequence's failure ends it alone
                log.exception("sampling failed for the sequence in slot %d", q.slot.id)
                self._end(q, "error", exc)

    def _sampled(self, q: _Sequence, index: int) -> None:
        token = q.sampler.sample(self.ctx, index)
        q.generated += 1
        q.handle.token_steps.append(self.step)
        params = q.handle.params
        q.handle.outcome.completion_tokens = q.generated
        if self._llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(q, "stop")
            return
        logprob = (token_logprob(self.ctx, index, self.n_vocab, token, params.logprobs, self.pieces)
                   if params.logprobs is not None else None)
        piece, stopped = q.text.add(self.pieces.raw(token), logprob)
        if piece is not None:
            self._emit(q.handle, "piece", piece)
        if stopped:
            self._finish(q, "stop")
        elif q.generated >= params.max_tokens or len(q.slot.tokens) + 1 >= self.n_ctx_per_slot:
            self._finish(q, "length")
        else:
            q.pending = [token]

    def _finish(self, q: _Sequence, reason: str) -> None:
        rest = q.text.flush()
        if rest is not None:
            self._emit(q.handle, "piece", rest)
        q.handle.outcome.finish_reason = reason
        q.handle.outcome.text = q.text.sent
        self._end(q, "end")

    def _end(self, q: _Sequence, kind: str, error: Exception | None = None) -> None:
        """Free the slot at once; its KV (what it decoded) stays as prompt cache."""
        q.sampler.close()
        self._use += 1
        q.slot.last_used = self._use
        q.slot.seq = None
        q.handle.finished_step = self.step
        self._emit(q.handle, kind, error)

    def _fail_all(self, exc: Exception) -> None:
        for slot in self.slots:
            if slot.seq is not None:
                self._llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
                slot.tokens.clear()
                self._end(slot.seq, "error", exc)
        with self._cond:
            waiting, self._queue = list(self._queue), deque()
        for handle, sampler in waiting:
            sampler.close()
            self._emit(handle, "error", exc)


def context_params(n_ctx_per_slot: int, n_slots: int, n_batch: int = 512, *, n_ubatch: int | None = None,
                   n_threads: int = 1, n_threads_batch: int | None = None, kv_unified: bool = False,
                   flash_attn: bool | None = None, type_k: int | None = None, type_v: int | None = None,
                   swa_full: bool = False):
    """The llama_context_params of a batched engine; the dry run (worker/dry_run.py) should
    build its context from these too, so that estimate and engine agree."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx_per_slot * n_slots
    params.n_batch = n_batch
    params.n_ubatch = min(n_batch, n_ubatch or n_batch)
    params.n_seq_max = n_slots
    params.n_outputs_max = n_slots  # logits rows a decode can ask for: one per sequence (the compute
    params.n_outputs_max_per_seq = 1  # buffer's worst case holds n_vocab x this, not x n_batch)
    params.n_threads = n_threads
    params.n_threads_batch = n_threads_batch or n_threads
    params.kv_unified = kv_unified
    params.swa_full = swa_full
    params.embeddings = False
    params.no_perf = True
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    if type_k is not None:
        params.type_k = type_k
    if type_v is not None:
        params.type_v = type_v
    return params


def _load_model(path: str, n_gpu_layers: int, gpu: int | None, verbose: bool, on_progress=None,
                rpc_servers: tuple[str, ...] = (), rpc_layers: tuple[int, ...] = (), cpu_repack: bool = True):
    import llama_cpp
    from llama_cpp._internals import LlamaModel
    from llama_cpp._logger import set_verbose

    set_verbose(verbose)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_extra_bufts = cpu_repack
    keep = None  # the arrays llama_model_params points to, alive until the load returns
    if rpc_servers:
        keep = _split_across_machines(params, n_gpu_layers, gpu, rpc_servers, rpc_layers)
    elif gpu is not None:  # everything offloaded on that GPU alone
        params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        params.main_gpu = gpu
    callback = None
    if on_progress is not None:
        def report(fraction: float, _user_data) -> bool:
            on_progress(float(fraction))
            return True  # go on loading

        callback = llama_cpp.llama_progress_callback(report)  # kept alive until the load returns
        params.progress_callback = callback
    model = LlamaModel(path_model=path, params=params, verbose=verbose)
    del callback, keep
    return model


def _split_across_machines(params, n_gpu_layers: int, gpu: int | None, rpc_servers: tuple[str, ...],
                           rpc_layers: tuple[int, ...]) -> tuple:
    """Offload onto the RPC servers' devices first (the first layers), then this node's GPU:
    llama.cpp's own order for RPC (fewest network transfers). Layers by tensor_split."""
    import ctypes

    import llama_cpp

    from worker import ggml_rpc

    if len(rpc_layers) != len(rpc_servers):
        raise ValueError(f"{len(rpc_servers)} RPC servers but layers for {len(rpc_layers)}")
    devices = ggml_rpc.rpc_devices(list(rpc_servers))
    if len(devices) != len(rpc_servers):
        raise RuntimeError(f"each RPC server must serve one device; they serve {len(devices)}")
    shares = list(rpc_layers)
    local = ggml_rpc.local_gpu_device(gpu) if gpu is not None else None
    if local is not None:
        devices.append(local)
        shares.append(max(0, n_gpu_layers - sum(rpc_layers)))
    elif sum(rpc_layers) != n_gpu_layers:
        raise ValueError(f"{n_gpu_layers} layers to offload but the RPC servers take {sum(rpc_layers)} and this "
                         "node has no GPU for the rest")
    device_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    split = (ctypes.c_float * llama_cpp.llama_max_devices())(*shares)
    params.devices = ctypes.cast(device_array, ctypes.c_void_p).value
    params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
    params.tensor_split = split
    return device_array, split
