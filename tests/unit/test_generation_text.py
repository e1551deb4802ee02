"""Turning tokens into text: whole characters only, stop strings never sent (not even in
part), and each token's log-probability goes out with the text it made."""

from __future__ import annotations

from worker.generation import TokenLogprob, _TextAssembler


def lp(token: str) -> TokenLogprob:
    return TokenLogprob(token, -0.5, tuple(token.encode()))


def run(stop: tuple[str, ...], raw_pieces: list[bytes]) -> tuple[list[str], bool, str]:
    text = _TextAssembler(stop)
    sent, stopped = [], False
    for raw in raw_pieces:
        piece, stopped = text.add(raw, lp(raw.decode(errors="replace")))
        if piece is not None:
            sent.append(piece.text)
        if stopped:
            break
    if not stopped:
        rest = text.flush()
        if rest is not None and rest.text:
            sent.append(rest.text)
    return sent, stopped, text.sent


def test_a_character_split_across_tokens_waits_for_its_last_byte():
    euro = "€".encode()
    sent, _, whole = run((), [b"a", euro[:1], euro[1:2], euro[2:], b"b"])
    assert whole == "a€b" and "\ufffd" not in whole
    assert sent == ["a", "€", "b"]


def test_a_stop_string_ends_the_answer_and_is_never_sent():
    sent, stopped, whole = run(("STOP",), [b"one ", b"two ST", b"OP three"])
    assert stopped and whole == "one two " and "ST" not in "".join(sent)


def test_text_that_only_began_like_a_stop_string_is_sent_when_it_turns_out_not_to_be():
    sent, stopped, whole = run(("STOP",), [b"a ST", b"ORY"])
    assert not stopped and whole == "a STORY"
    assert sent == ["a ", "STORY"]


def test_held_back_text_is_sent_at_the_end_of_the_answer():
    sent, stopped, whole = run(("STOP",), [b"ends with ST"])
    assert not stopped and whole == "ends with ST"


def test_log_probabilities_travel_with_the_text_they_made():
    text = _TextAssembler(())
    euro = "€".encode()
    assert text.add(euro[:1], lp("x"))[0] is None
    piece, _ = text.add(euro[1:], lp("y"))
    assert piece.text == "€" and [e.token for e in piece.logprobs] == ["x", "y"]
