"""The token loop: llama.cpp samples, we turn tokens into text, stop on stop strings and
end-of-generation tokens, read each token's log-probability, and ask between tokens
whether to go on (cancelled, time limit). No Ray, no OpenAI shapes here.

Text is decoded incrementally (a character split across tokens waits for its last byte)
and the tail that could still become a stop string is held back, so a stop string never
reaches the client. Log-probabilities come from the logits the token was sampled from
(llama.cpp's output for the last position), as log-softmax, without `logits_all`.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

StopCheck = Callable[[], str | None]  # None: go on; "length": end here; "cancelled": drop it


class GenerationCancelled(Exception):
    """The client left; nothing more is generated for it."""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass
class Piece:
    """Text ready to send, with the log-probabilities of the tokens that made it."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Outcome:
    finish_reason: str = "stop"  # stop | length
    completion_tokens: int = 0
    text: str = ""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; 0: the sampled token's only; n: and the n most likely


def generate(llama, prompt: list[int], params: SamplingParams, grammar=None,
             should_stop: StopCheck | None = None, outcome: Outcome | None = None) -> Iterator[Piece]:
    """Pieces of text as they become safe to send; `outcome` is filled in when it ends."""
    outcome = outcome if outcome is not None else Outcome()
    if params.seed is not None:
        llama.set_seed(int(params.seed))
    tokens = llama.generate(
        prompt,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        temp=params.temperature,
        repeat_penalty=params.repeat_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        grammar=grammar,
    )
    text = _TextAssembler(params.stop)
    vocab = llama._model.vocab
    n_vocab = llama.n_vocab()
    pieces = TokenPieces(llama)
    reason = "length"
    try:
        for count, token in enumerate(tokens, start=1):
            verdict = should_stop() if should_stop is not None else None
            if verdict == "cancelled":
                raise GenerationCancelled
            if verdict == "length":
                break
            logprob = (token_logprob(llama._ctx.ctx, -1, n_vocab, token, params.logprobs, pieces)
                       if params.logprobs is not None else None)
            if _is_end_of_generation(vocab, token):
                outcome.completion_tokens = count
                reason = "stop"
                break
            outcome.completion_tokens = count
            raw = llama.detokenize([token], prev_tokens=None, special=False)
            piece, stopped = text.add(raw, logprob)
            if piece is not None:
                yield piece
            if stopped:
                reason = "stop"
                break
            if count >= params.max_tokens:
                break
    finally:
        tokens.close()  # leaves llama.cpp's generator (and its sampler) at once
    rest = text.flush()
    if rest is not None:
        yield rest
    outcome.finish_reason = reason
    outcome.text = text.sent


def _is_end_of_generation(vocab, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(vocab, token))


class TokenPieces:
    """Bytes and text of single tokens (no special tokens), each rendered once."""

    def __init__(self, model) -> None:
        self.model = model  # anything with detokenize([token], special=False): a Llama or its model
        self._bytes: dict[int, bytes] = {}

    def raw(self, token: int) -> bytes:
        raw = self._bytes.get(token)
        if raw is None:
            raw = self._bytes[token] = self.model.detokenize([token], special=False)
        return raw

    def text(self, token: int) -> str:
        return self.raw(token).decode("utf-8", errors="replace")


def token_logprob(ctx, batch_index: int, n_vocab: int, token: int, top_n: int, pieces: TokenPieces) -> TokenLogprob:
    """log-softmax of the logits at `batch_index` (the row the token was sampled from)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(ctx, batch_index)
    row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
    logits = row.astype(np.float64)
    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = ()
    if top_n:
        best = np.argpartition(-logprobs, top_n)[:top_n] if top_n < n_vocab else np.arange(n_vocab)
        best = best[np.argsort(-logprobs[best])]
        top = tuple((pieces.text(int(t)), float(logprobs[t]), tuple(pieces.raw(int(t)))) for t in best)
    return TokenLogprob(pieces.text(token), float(logprobs[token]), tuple(pieces.raw(token)), top)


def partial_match_length(text: str, needles: tuple[str, ...] | list[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of one of `needles`
    (what must be held back: it may still become a stop string or a marker)."""
    longest = 0
    for needle in needles:
        for n in range(min(len(needle) - 1, len(text)), 0, -1):
            if text.endswith(needle[:n]):
                longest = max(longest, n)
                break
    return longest


class _TextAssembler:
    """Bytes in, safe text out: whole characters only, and never a (partial) stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded but held back: it may be the start of a stop string
        self.pending_logprobs: list[TokenLogprob] = []
        self.sent = ""

    def add(self, raw: bytes, logprob: TokenLogprob | None) -> tuple[Piece | None, bool]:
        self.pending += self.decoder.decode(raw)
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        for stop in self.stop:
            at = self.pending.find(stop)
            if at >= 0:
                return self._release(self.pending[:at], keep=""), True
        hold = self._held_back_length()
        safe = self.pending[: len(self.pending) - hold] if hold else self.pending
        if not safe:
            return None, False  # its tokens' log-probabilities go out with the text they make
        return self._release(safe, keep=self.pending[len(safe):]), False

    def flush(self) -> Piece | None:
        """The end: what was held back did not become a stop string, so it is text."""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(self.pending, keep="")

    def _held_back_length(self) -> int:
        return partial_match_length(self.pending, self.stop)

    def _release(self, text: str, keep: str) -> Piece | None:
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        self.pending = keep
        if not text and not logprobs:
            return None
        self.sent += text
        return Piece(text, logprobs)
