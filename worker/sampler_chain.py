"""One sequence's llama.cpp sampler chain, and the log-probabilities of a logits row.

The chain is the one llama-cpp-python's `Llama` builds for the single-sequence path
(worker/generation.py), in the same order, so a request samples the same way there and in
the batched engine: penalties over the last 64 generated tokens, the grammar, then greedy
(temperature 0), or top-k, top-p, min-p, temperature and a `dist` sampler seeded for this
request alone (a seeded request gives the same tokens whatever else runs beside it).
"""

from __future__ import annotations

import ctypes

import numpy as np

from worker.generation import SamplingParams, TokenLogprob

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size default, which the single path uses
DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


class GrammarError(ValueError):
    """llama.cpp did not accept the GBNF text."""


class SamplerChain:
    def __init__(self, vocab, n_vocab: int, params: SamplingParams, grammar_gbnf: str | None = None) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self.chain = chain

        def add(sampler) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        add(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty,
                                                   params.frequency_penalty, params.presence_penalty))
        if grammar_gbnf:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar_gbnf.encode("utf-8"), b"root")
            if not grammar:
                self.close()
                raise GrammarError("llama.cpp could not parse the grammar (GBNF) with root 'root'")
            add(grammar)
        seed = DEFAULT_SEED if params.seed is None else int(params.seed) & 0xFFFFFFFF
        if params.temperature < 0:
            add(llama_cpp.llama_sampler_init_dist(seed))
        elif params.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))

    def sample(self, ctx, batch_index: int) -> int:
        """Sample from the logits of batch position `batch_index`, and accept the token."""
        return int(self._llama_cpp.llama_sampler_sample(self.chain, ctx, batch_index))

    def close(self) -> None:
        if self.chain is not None:
            self._llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        self.close()


class TokenPieces:
    """Bytes and text of single tokens, as the single path renders them (no special tokens)."""

    def __init__(self, model) -> None:
        self.model = model
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
