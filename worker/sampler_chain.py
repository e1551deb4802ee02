"""One sequence's llama.cpp sampler chain.

The chain is the one llama-cpp-python's `Llama` builds for the single-sequence path
(worker/generation.py), in the same order, so a request samples the same way there and in
the batched engine: penalties over the last 64 generated tokens, the grammar, then greedy
(temperature 0), or top-k, top-p, min-p, temperature and a `dist` sampler seeded for this
request alone (a seeded request gives the same tokens whatever else runs beside it).

Greedy with neutral penalties and no grammar picks the highest logit: numpy's argmax over
the row (the first maximum, as llama.cpp's greedy sampler) in ~0.05 ms, where the chain
first copies the whole vocabulary into a candidate array (~0.25 ms for Gemma's 262k
tokens, 4% of an 8-stream round on 2 cores). The chain still accepts the token.
"""

from __future__ import annotations

import ctypes

import numpy as np

from worker.generation import SamplingParams

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size default, which the single path uses
DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


class GrammarError(ValueError):
    """llama.cpp did not accept the GBNF text."""


class SamplerChain:
    def __init__(self, vocab, n_vocab: int, params: SamplingParams, grammar_gbnf: str | None = None) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.n_vocab = n_vocab
        neutral_penalties = (params.repeat_penalty == 1.0 and not params.frequency_penalty
                             and not params.presence_penalty)
        self.argmax_only = params.temperature == 0 and not grammar_gbnf and neutral_penalties
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
        llama_cpp = self._llama_cpp
        if not self.argmax_only:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, batch_index))
        row = llama_cpp.llama_get_logits_ith(ctx, batch_index)
        if not row:
            raise RuntimeError(f"llama.cpp has no logits for batch position {batch_index}")
        logits = np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))
        token = int(np.argmax(logits))
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def close(self) -> None:
        if self.chain is not None:
            self._llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        self.close()
