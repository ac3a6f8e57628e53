"""The speech decoder's queue: first audio first, the most starved stream next, order kept."""

from __future__ import annotations

import threading

import pytest

from iomni.errors import Unavailable
from iomni.model.speech.queue import SpeechQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def served(queue: SpeechQueue, audio_s: float = 0.0) -> str:
    taken = queue.take(timeout_s=0)
    assert taken is not None
    key, request = taken
    queue.done(key, audio_s, ended=False)
    return request


def test_a_new_reply_goes_before_later_chunks_of_a_playing_one() -> None:
    clock = Clock()
    queue = SpeechQueue(clock)
    queue.put("playing", "p1")
    assert served(queue, audio_s=1.0) == "p1"
    clock.now = 0.1
    queue.put("playing", "p2")
    clock.now = 0.2
    queue.put("new", "n1")
    assert served(queue, audio_s=1.0) == "n1"
    assert served(queue) == "p2"


def playing_with_two_seconds() -> tuple[Clock, SpeechQueue]:
    """A queue whose reply "playing" sent 2 s of audio at t = 0."""
    clock = Clock()
    queue = SpeechQueue(clock, reserve_s=0.5)
    queue.put("playing", "p1")
    served(queue, audio_s=2.0)
    return clock, queue


def test_a_playing_reply_with_audio_in_hand_waits_while_another_has_none() -> None:
    clock, queue = playing_with_two_seconds()
    queue.put("new", "n1")
    served(queue)  # the new reply's first text: no audio yet
    queue.put("playing", "p2")
    assert queue.take(timeout_s=0) is None  # 2 s left at its client: it can wait
    clock.now = 1.6  # 0.4 s left: below the reserve
    assert served(queue) == "p2"


def test_nothing_is_held_back_once_every_reply_has_audio() -> None:
    _, queue = playing_with_two_seconds()
    queue.put("playing", "p2")
    assert served(queue) == "p2"


def test_the_stream_with_least_audio_left_is_fed_first() -> None:
    clock = Clock()
    queue = SpeechQueue(clock)
    queue.put("rich", "r1")
    queue.put("poor", "q1")
    served(queue, audio_s=3.0)  # rich: 3 s of audio sent at t=0
    served(queue, audio_s=1.0)  # poor: 1 s
    clock.now = 0.5
    queue.put("rich", "r2")
    queue.put("poor", "q2")
    assert served(queue) == "q2"  # 0.5 s left at its client vs 2.5 s
    assert served(queue) == "r2"


def test_a_discard_jumps_the_queue() -> None:
    queue = SpeechQueue(Clock())
    queue.put("a", "a1")
    queue.put("b", "b-discard", urgent=True)
    assert served(queue) == "b-discard"


def test_one_reply_is_served_in_order_and_never_twice_at_once() -> None:
    queue = SpeechQueue(Clock())
    queue.put("a", "a1")
    queue.put("a", "a2")
    first = queue.take(timeout_s=0)
    assert first == ("a", "a1")
    assert queue.take(timeout_s=0) is None  # a2 waits until a1 is done
    queue.done("a", 0.0, ended=False)
    assert queue.take(timeout_s=0) == ("a", "a2")


def test_ended_replies_are_forgotten_and_drain_returns_the_rest() -> None:
    queue = SpeechQueue(Clock())
    queue.put("a", "a1")
    key, _ = queue.take(timeout_s=0)
    queue.done(key, 0.5, ended=True)
    queue.put("b", "b1")
    queue.put("c", "c1")
    assert len(queue) == 2
    assert sorted(queue.drain()) == ["b1", "c1"]
    assert queue.take(timeout_s=0) is None


def test_take_wakes_up_on_put() -> None:
    queue = SpeechQueue()
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(queue.take(timeout_s=5)))
    waiter.start()
    queue.put("a", "a1")
    waiter.join(5)
    assert got == [("a", "a1")]


def test_a_discard_supersedes_the_replys_queued_text() -> None:
    """A barge-in does not wait for (or pay for) the text its client had already queued."""
    queue = SpeechQueue(Clock())
    queue.put("other", "o1")
    for request in ("a1", "a2", "a3"):
        queue.put("reply", request)
    assert served(queue) == "o1"
    assert served(queue) == "a1"
    assert queue.put("reply", "discard", discard=True) == ["a2", "a3"]
    assert queue.put("other", "o2") == []
    assert served(queue) == "discard"
    assert served(queue) == "o2"


def test_a_batch_brings_every_servable_reply_most_urgent_first() -> None:
    clock = Clock()
    queue = SpeechQueue(clock, reserve_s=0.5)
    for key, audio_s in (("rich", 3.0), ("poor", 1.0)):
        queue.put(key, f"{key}1")
        served(queue, audio_s=audio_s)  # both start playing at t = 0
    clock.now = 0.8  # poor has 0.2 s left at its client, rich 2.2 s
    for request in ("rich2", "rich3", "poor2", "poor3"):
        queue.put(request[:-1], request)
    assert queue.take_batch(8, timeout_s=0) == [("poor", "poor2"), ("rich", "rich2")]
    for key in ("poor", "rich"):
        queue.done(key, 1.0, ended=False)
    clock.now = 1.8  # poor: 2 s sent, 0.2 s left; rich: 4 s sent, 2.2 s left
    queue.put("new", "new1")
    queue.put("new", "new2")
    queue.put("new", "new3")
    # The new reply brings the two requests its first chunk needs; rich (2.2 s in hand) waits.
    assert queue.take_batch(8, timeout_s=0) == [
        ("new", "new1"),
        ("new", "new2"),
        ("poor", "poor3"),
    ]
    assert queue.take_batch(8, timeout_s=0) is None  # new and poor are out being served


def test_a_batch_stops_at_its_limit_and_keeps_the_rest_queued() -> None:
    queue = SpeechQueue(Clock())
    for key in "abc":
        queue.put(key, f"{key}1")
    assert queue.take_batch(2, timeout_s=0) == [("a", "a1"), ("b", "b1")]
    assert queue.take_batch(2, timeout_s=0) == [("c", "c1")]
    assert len(queue) == 0


def test_requests_given_back_are_taken_again_first_and_in_order() -> None:
    clock = Clock()
    queue = SpeechQueue(clock, reserve_s=5.0)
    queue.put("playing", "p1")
    served(queue, audio_s=1.0)
    for request in ("p2", "p3", "p4"):
        queue.put("playing", request)
    assert queue.take_batch(8, timeout_s=0) == [("playing", "p2")]
    assert not queue.first_audio_waiting()
    queue.put("new", "n1")
    assert queue.first_audio_waiting()  # a batch serving "playing" should hand over
    queue.requeue("playing", "p2")
    assert queue.take_batch(8, timeout_s=0) == [("new", "n1"), ("playing", "p2")]
    assert not queue.first_audio_waiting()  # "new" is being served


def test_a_request_given_back_after_the_drain_is_refused() -> None:
    """Nothing takes from a drained queue: a request given back then must be failed by the
    caller, not kept where it would never be answered."""
    queue = SpeechQueue(Clock())
    queue.put("a", "a1")
    queue.put("a", "a2")
    assert queue.take_batch(8, timeout_s=0) == [("a", "a1"), ("a", "a2")]
    assert queue.drain() == []
    with pytest.raises(Unavailable, match="shutting down"):
        queue.requeue("a", "a2")
    assert len(queue) == 0
