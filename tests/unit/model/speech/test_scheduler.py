"""The speech scheduler's batches (what the Triton speech decoder and the embedded engine's
speech worker both render through): a reply that starts while a batch renders takes over; what
the batch had not rendered goes back to the queue with its text decoded, and is not fed twice;
a reply without audio takes no text beyond its first chunk's; a reply whose request fails does
not go on with the rest of its batch; a discard stops its reply's render, also one that comes
while the reply opens; an idle reply is freed and its next request says so. No request is left
unanswered: not by a client that vanished, a batch that breaks off, or the stop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from iomni.errors import InvalidInput
from iomni.model.speech import scheduler as scheduler_module
from iomni.model.speech.scheduler import SchedulerHooks, SpeechRequest, SpeechScheduler


class Recorder:
    """What the scheduler fed, answered and failed, by request name."""

    def __init__(self) -> None:
        self.fed: list[str] = []
        self.chunks: list[str] = []
        self.answered: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.messages: list[str] = []
        self.on_render: dict[str, Callable[[], Any]] = {}
        self.completes_first_chunk: set[str] = set()  # requests whose text completes it
        self.silent: set[str] = set()  # requests answered without audio
        self.chunks_per_request = 1


class FakeSession:
    def __init__(self, seen: Recorder) -> None:
        self.seen = seen
        self.names: list[str] = []
        self.text_in = False  # the text the first chunk needs

    def add_text(self, token_ids: list[str], hidden: torch.Tensor) -> int:
        self.names += token_ids
        self.seen.fed += token_ids
        self.text_in |= any(name in self.seen.completes_first_chunk for name in token_ids)
        return len(self.names)

    def first_chunk_text_in(self) -> bool:
        return self.text_in

    def iter_ready(self, mark: int) -> Iterator[np.ndarray]:
        name = self.names[mark - 1]
        for _ in range(0 if name in self.seen.silent else self.seen.chunks_per_request):
            if name in self.seen.on_render:
                self.seen.on_render[name]()
            yield np.ones(24000, np.float32)

    def iter_finish(self) -> Iterator[np.ndarray]:
        return iter(())


class Answer:
    def __init__(self, name: str, seen: Recorder) -> None:
        self.name = name
        self.seen = seen

    def chunk(self, samples: np.ndarray) -> None:
        self.seen.chunks.append(self.name)

    def complete(self) -> None:
        self.seen.answered.append(self.name)

    def fail(self, error: BaseException) -> None:
        self.seen.failed.append((self.name, type(error).__name__))
        self.seen.messages.append(str(error))

    def cancelled(self) -> bool:
        return False


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    monkeypatch.setattr(scheduler_module, "decode_together", lambda sessions: None)
    monkeypatch.setattr(scheduler_module, "render_first_together", lambda marked: [])
    return Recorder()


def put(scheduler: SpeechScheduler, seen: Recorder, key: str, name: str, start: bool) -> None:
    request = SpeechRequest(
        Answer(name, seen),
        token_ids=[name],
        hidden=torch.zeros(1, 4),
        start=start,
        open=lambda: FakeSession(seen),  # type: ignore[arg-type,return-value]
    )
    scheduler.put(key, request)


def serve(scheduler: SpeechScheduler, limit: int = 8) -> list[tuple[str, SpeechRequest]] | None:
    batch = scheduler.queue.take_batch(limit, timeout_s=0)
    if batch is not None:
        scheduler.serve_batch(batch)
    return batch


def test_a_reply_starting_mid_batch_takes_over(seen: Recorder) -> None:
    scheduler = SpeechScheduler()
    seen.on_render["a1"] = lambda: put(scheduler, seen, "new", "n1", start=True)
    put(scheduler, seen, "a", "a1", start=True)
    put(scheduler, seen, "b", "b1", start=True)
    serve(scheduler)
    assert seen.answered == ["a1"]  # b1 was not rendered: it went back
    batch = serve(scheduler)
    assert batch is not None and [key for key, _ in batch] == ["b", "new"]
    assert seen.fed == ["a1", "b1", "n1"]  # b1's text was fed once
    assert seen.answered == ["a1", "b1", "n1"]
    assert len(scheduler.queue) == 0


def test_a_failed_request_fails_the_rest_of_its_reply_in_the_batch(seen: Recorder) -> None:
    scheduler = SpeechScheduler()

    def broken() -> None:
        raise InvalidInput("broken")

    seen.on_render["a1"] = broken
    put(scheduler, seen, "a", "a1", start=True)  # a reply without audio brings two requests
    put(scheduler, seen, "a", "a2", start=False)
    put(scheduler, seen, "b", "b1", start=True)
    serve(scheduler)
    assert seen.failed == [("a1", "InvalidInput"), ("a2", "Unavailable")]
    assert seen.answered == ["b1"]
    assert "a" not in scheduler.sessions  # its state is freed
    assert scheduler.queue.take_batch(8, timeout_s=0) is None  # nothing left, nothing held


def test_a_reply_without_audio_takes_no_text_beyond_its_first_chunk(seen: Recorder) -> None:
    """Its first text group was decoded by an earlier batch, so of the two requests it brings
    the first completes its first chunk's text: the second waits for the next batch instead of
    rendering the reply's second chunk before the other reply's first."""
    scheduler = SpeechScheduler()
    seen.completes_first_chunk = {"a2", "b2"}
    seen.silent = {"a1", "b1"}
    put(scheduler, seen, "a", "a1", start=True)
    serve(scheduler, limit=1)  # a's first group, alone
    put(scheduler, seen, "a", "a2", start=False)
    put(scheduler, seen, "a", "a3", start=False)
    put(scheduler, seen, "b", "b1", start=True)
    put(scheduler, seen, "b", "b2", start=False)
    serve(scheduler)
    assert seen.fed == ["a1", "a2", "b1", "b2"]
    assert seen.answered == ["a1", "a2", "b1", "b2"]
    batch = scheduler.queue.take_batch(8, timeout_s=0)
    assert batch is not None and [request.token_ids for _, request in batch] == [["a3"]]


def test_a_discard_cancels_what_is_queued_and_stops_the_render_in_progress(
    seen: Recorder,
) -> None:
    scheduler = SpeechScheduler()
    seen.chunks_per_request = 5
    discarded = Answer("discard", seen)
    rendered = 0

    def barge_in_at_the_second_chunk() -> None:
        nonlocal rendered
        rendered += 1
        if rendered == 2:
            scheduler.discard("a", discarded)

    seen.on_render["a1"] = barge_in_at_the_second_chunk
    put(scheduler, seen, "a", "a1", start=True)
    put(scheduler, seen, "a", "a2", start=False)
    put(scheduler, seen, "a", "a3", start=False)
    serve(scheduler, limit=1)
    assert seen.chunks == ["a1", "a1"]  # the chunk rendered meanwhile, none after it
    assert seen.answered == ["a1"]
    assert seen.failed == [("a2", "Cancelled"), ("a3", "Cancelled")]
    serve(scheduler)  # the discard itself
    assert seen.answered == ["a1", "discard"]
    assert "a" not in scheduler.sessions
    assert scheduler.queue.take_batch(8, timeout_s=0) is None


def test_closing_a_finished_reply_is_answered_at_once_and_queues_nothing(
    seen: Recorder,
) -> None:
    """The engine closes every reply; after its end there is nothing to discard. Queued, the
    discard looked like a new reply's first audio waiting and broke off the other replies'
    batch."""
    scheduler = SpeechScheduler()
    put(scheduler, seen, "a", "a1", start=True)
    end = SpeechRequest(Answer("a-end", seen), start=False, end=True)
    scheduler.put("a", end)
    serve(scheduler)
    assert seen.answered == ["a1", "a-end"] and "a" not in scheduler.sessions
    scheduler.discard("a", Answer("close", seen))
    assert seen.answered[-1] == "close"
    assert not scheduler.queue.first_audio_waiting() and len(scheduler.queue) == 0
    scheduler.discard("never-started", Answer("close-2", seen))
    assert seen.answered[-1] == "close-2" and len(scheduler.queue) == 0


def test_text_without_a_row_per_token_fails_its_request(seen: Recorder) -> None:
    scheduler = SpeechScheduler()
    request = SpeechRequest(
        Answer("a1", seen),
        token_ids=["a1", "a1b"],
        hidden=torch.zeros(1, 4),
        start=True,
        open=lambda: FakeSession(seen),  # type: ignore[arg-type,return-value]
    )
    scheduler.put("a", request)
    serve(scheduler)
    assert seen.failed == [("a1", "InvalidInput")] and seen.fed == []


def test_an_idle_reply_is_freed_and_its_next_request_says_so(seen: Recorder) -> None:
    scheduler = SpeechScheduler(idle_timeout_s=0.0)
    put(scheduler, seen, "a", "a1", start=True)
    serve(scheduler)
    assert scheduler.sweep() == ["a"]
    assert "a" not in scheduler.sessions
    put(scheduler, seen, "a", "a2", start=False)
    serve(scheduler)
    assert seen.failed == [("a2", "InvalidInput")]
    assert "was idle for more than 0 s and was freed" in seen.messages[0]
    put(scheduler, seen, "never", "x1", start=False)
    serve(scheduler)
    assert seen.failed[-1] == ("x1", "InvalidInput")
    assert "is not open" in seen.messages[-1]


def test_a_request_after_the_stop_fails_instead_of_waiting_forever(seen: Recorder) -> None:
    scheduler = SpeechScheduler()
    put(scheduler, seen, "a", "a1", start=True)
    scheduler.stop()
    assert seen.failed == [("a1", "Unavailable")]  # queued, never taken
    put(scheduler, seen, "a", "a2", start=False)
    scheduler.discard("a", Answer("discard", seen))
    assert seen.failed[1:] == [("a2", "Unavailable"), ("discard", "Unavailable")]


class Vanished(Answer):
    """A transport whose client is gone: every answer raises."""

    def chunk(self, samples: np.ndarray) -> None:
        raise ConnectionError("client gone")

    def complete(self) -> None:
        raise ConnectionError("client gone")

    def fail(self, error: BaseException) -> None:
        raise ConnectionError("client gone")


class CancelledAnswer(Answer):
    def cancelled(self) -> bool:
        return True


def test_a_client_that_vanished_leaves_the_rest_of_its_batch_answered(seen: Recorder) -> None:
    """Its answers raise, failing it raises too: the other replies taken with it are still
    answered, and no reply stays held as being served (its next request would wait forever)."""
    scheduler = SpeechScheduler()
    scheduler.put("bad", SpeechRequest(Vanished("bad", seen), invalid=InvalidInput("bad")))
    gone = SpeechRequest(
        Vanished("gone", seen),
        token_ids=["g1"],
        hidden=torch.zeros(1, 4),
        start=True,
        open=lambda: FakeSession(seen),  # type: ignore[arg-type,return-value]
    )
    scheduler.put("gone", gone)
    put(scheduler, seen, "b", "b1", start=True)
    batch = serve(scheduler)
    assert batch is not None and len(batch) == 3  # all three were served together
    assert seen.answered == ["b1"] and seen.chunks == ["b1"]
    assert "gone" not in scheduler.sessions  # its state is freed
    assert not any(scheduler.queue.active(key) for key in ("bad", "gone", "b"))


def test_a_batch_that_breaks_off_fails_what_it_had_not_answered(
    seen: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = SpeechScheduler()

    def broken() -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(scheduler.queue, "first_audio_waiting", broken)
    put(scheduler, seen, "a", "a1", start=True)
    put(scheduler, seen, "b", "b1", start=True)
    with pytest.raises(RuntimeError, match="a bug"):  # the render loop logs it
        serve(scheduler)
    assert seen.answered == ["a1"]
    assert seen.failed == [("b1", "Internal")]
    assert "b" not in scheduler.sessions
    assert not scheduler.queue.active("b")


def test_a_discard_while_the_reply_opens_leaves_nothing_open(seen: Recorder) -> None:
    """The barge-in comes while the reply's first request builds its session: the session is
    not kept (it would hold memory, and count as open, until the idle sweep)."""
    counts: list[int] = []
    scheduler = SpeechScheduler(hooks=SchedulerHooks(open_sequences=counts.append))

    def barged_in_while_opening() -> FakeSession:
        scheduler.discard("a", Answer("discard", seen))
        return FakeSession(seen)

    request = SpeechRequest(
        Answer("a1", seen),
        token_ids=["a1"],
        hidden=torch.zeros(1, 4),
        start=True,
        open=barged_in_while_opening,  # type: ignore[arg-type]
    )
    scheduler.put("a", request)
    serve(scheduler)
    assert seen.failed == [("a1", "Cancelled")] and seen.fed == []
    serve(scheduler)  # the discard itself
    assert seen.answered == ["discard"]
    assert scheduler.sessions == {} and counts[-1] == 0  # the open_sequences gauge
    assert scheduler.queue.take_batch(8, timeout_s=0) is None


def test_a_cancelled_discard_still_lets_its_key_open_again(seen: Recorder) -> None:
    scheduler = SpeechScheduler()
    put(scheduler, seen, "a", "a1", start=True)
    serve(scheduler)
    scheduler.discard("a", CancelledAnswer("discard", seen))
    serve(scheduler)
    assert seen.failed == [("discard", "Cancelled")]
    put(scheduler, seen, "a", "a2", start=True)  # a transport may reuse a reply's key
    serve(scheduler)
    assert seen.answered == ["a1", "a2"] and "a" in scheduler.sessions


def test_a_request_given_back_after_the_stop_is_failed(seen: Recorder) -> None:
    """The stop comes while a batch is served: what that batch gives back to the queue would
    never be taken again, so it fails instead of waiting forever."""
    scheduler = SpeechScheduler()
    seen.completes_first_chunk = {"a2"}
    seen.silent = {"a1"}
    put(scheduler, seen, "a", "a1", start=True)
    serve(scheduler)
    put(scheduler, seen, "a", "a2", start=False)
    put(scheduler, seen, "a", "a3", start=False)  # beyond the first chunk's text: given back
    batch = scheduler.queue.take_batch(8, timeout_s=0)
    assert batch is not None and len(batch) == 2
    scheduler.stop()
    scheduler.serve_batch(batch)
    assert seen.answered == ["a1", "a2"]
    assert seen.failed == [("a3", "Unavailable")]
    assert len(scheduler.queue) == 0
