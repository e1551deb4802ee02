"""worker/replica.py's serve_* and pump without Ray or a model: what a stream puts in the
outbox, in order, and which items go at once."""

from __future__ import annotations

import json
from types import SimpleNamespace

from worker.replica import ModelReplicaImpl
from worker.stream_outbox import END


def chunk(text: str) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def replica() -> ModelReplicaImpl:
    out = ModelReplicaImpl("m#0", {"model_name": "m", "path": "/nonexistent.gguf"})
    out.engine = SimpleNamespace(batch=None)  # _stream only needs one to be there
    return out


def test_a_stream_that_fails_mid_way_sends_what_it_had_then_the_error_then_its_end():
    def chunks(engine, stop):
        yield chunk("Hel")
        raise ValueError("the engine broke")

    r = replica()
    r._serve(chunks, {}, "r1", "gw")
    items = r.outbox.take("gw", 1.0)["r1"]
    assert items[0] == b"" and json.loads(items[1][6:])["choices"][0]["delta"]["content"] == "Hel"
    assert isinstance(items[2], RuntimeError) and "ValueError: the engine broke" in str(items[2])
    assert items[3] is END and len(items) == 4


def test_a_finished_stream_ends_with_done_and_its_first_text_was_urgent():
    def chunks(engine, stop):
        yield {**chunk(""), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        yield chunk("Hi")
        yield chunk("!")

    r = replica()
    sent = []
    r.outbox = SimpleNamespace(open=lambda c, rid: None, end=lambda c, rid: sent.append((END, True)),
                               put=lambda c, rid, item, urgent=False: sent.append((item, urgent)))
    r._serve(chunks, {}, "r1", "gw")
    assert [urgent for _, urgent in sent] == [True, False, True, False, True, True]  # b"", role, Hi, !, DONE, end
    assert sent[-2][0].endswith(b"data: [DONE]\n\n") and r.served == 1
