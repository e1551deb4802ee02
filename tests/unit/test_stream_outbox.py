"""worker/stream_outbox.py: every stream of a gateway in one message a tick, urgent items at once."""

from __future__ import annotations

import threading
import time

from worker.stream_outbox import END, StreamOutbox

TICK_S = 0.3


def outbox() -> StreamOutbox:
    return StreamOutbox(lambda: TICK_S)


def take_in_thread(box: StreamOutbox, consumer: str, idle_s: float = 5.0) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=lambda: got.append((box.take(consumer, idle_s), time.monotonic())))
    thread.start()
    return thread, got


def test_every_stream_of_a_consumer_goes_in_one_message_and_no_other_consumers():
    box = outbox()
    for rid in ("a", "b"):
        box.open("gw1", rid)
        box.put("gw1", rid, b"", urgent=True)
    box.open("gw2", "c")
    box.put("gw2", "c", b"", urgent=True)
    assert box.take("gw1", 1.0) == {"a": [b""], "b": [b""]}
    assert box.take("gw2", 1.0) == {"c": [b""]}


def test_text_waits_for_the_tick_but_an_urgent_item_goes_at_once():
    box = outbox()
    box.open("gw", "a")
    box.put("gw", "a", b"", urgent=True)
    box.take("gw", 1.0)
    sent = time.monotonic()
    box.put("gw", "a", b"data: 1\n\n")
    box.put("gw", "a", b"data: 2\n\n")
    assert box.take("gw", 1.0) == {"a": [b"data: 1\n\ndata: 2\n\n"]}  # joined, one message
    assert time.monotonic() - sent >= TICK_S * 0.9
    thread, got = take_in_thread(box, "gw")
    time.sleep(0.05)
    urgent_at = time.monotonic()
    box.end("gw", "a")
    thread.join(2)
    assert got[0][0] == {"a": [END]} and got[0][1] - urgent_at < TICK_S / 2


def test_the_acceptance_stays_alone_and_the_end_comes_last():
    box = outbox()
    box.open("gw", "a")
    for item in (b"", b"data: x\n\n", b"data: y\n\n"):
        box.put("gw", "a", item)
    box.end("gw", "a")
    assert box.take("gw", 1.0) == {"a": [b"", b"data: x\n\ndata: y\n\n", END]}


def test_a_pump_with_an_open_stream_waits_and_one_without_ends_when_idle():
    box = outbox()
    box.open("gw", "a")
    thread, got = take_in_thread(box, "gw", idle_s=0.1)
    thread.join(0.5)
    assert thread.is_alive() and not got  # a stream is open: it keeps waiting for its items
    box.put("gw", "a", b"data: x\n\n")
    thread.join(TICK_S + 1)
    assert got[0][0] == {"a": [b"data: x\n\n"]}
    box.end("gw", "a")
    assert box.take("gw", 0.1) == {"a": [END]}
    started = time.monotonic()
    assert box.take("gw", 0.1) is None and time.monotonic() - started >= 0.09
    assert box.open_streams("gw") == 0


def test_the_first_item_after_a_message_wakes_a_waiting_pump():
    box = outbox()
    box.open("gw", "a")
    thread, got = take_in_thread(box, "gw", idle_s=30.0)
    time.sleep(0.1)
    put_at = time.monotonic()
    box.put("gw", "a", b"data: x\n\n")  # not urgent, but nothing was sent before: due at once
    thread.join(2)
    assert got[0][0] == {"a": [b"data: x\n\n"]} and got[0][1] - put_at < 0.2


def test_an_older_pump_of_the_same_consumer_ends_when_a_newer_one_attaches():
    box = outbox()
    box.open("gw", "a")
    old = box.attach("gw")
    thread, got = take_in_thread_with(box, "gw", old)
    time.sleep(0.1)
    new = box.attach("gw")
    thread.join(2)
    assert got == [None]
    box.put("gw", "a", b"", urgent=True)
    assert box.take("gw", 1.0, new) == {"a": [b""]}


def test_what_is_left_for_a_consumer_without_a_pump_is_dropped_once_stale():
    now = [0.0]
    box = StreamOutbox(lambda: TICK_S, clock=lambda: now[0], stale_after_s=100.0)
    box.detach("gone", box.attach("gone"))
    box.open("gone", "a")
    box.put("gone", "a", b"")
    box.end("gone", "a")
    now[0] = 101.0
    box.open("gw", "b")
    box.end("gw", "b")  # ends sweep the stale
    assert box.take("gone", 0.0) is None
    assert box.take("gw", 0.0) == {"b": [END]}


def take_in_thread_with(box: StreamOutbox, consumer: str, token: object) -> tuple[threading.Thread, list]:
    got: list = []
    thread = threading.Thread(target=lambda: got.append(box.take(consumer, 30.0, token)))
    thread.start()
    return thread, got
