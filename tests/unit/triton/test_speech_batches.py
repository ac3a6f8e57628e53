"""The speech decoder's batches: a reply that starts while a batch renders takes over; what
the batch had not rendered goes back to the queue with its text decoded, and is not fed twice;
a reply without audio takes no text beyond its first chunk's; a reply whose request fails does
not go on with the rest of its batch."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from iomni.errors import InvalidInput
from iomni.triton.models import speech_decoder
from iomni.triton.models.speech_decoder import TritonPythonModel, _Decoded
from iomni.triton.speech_queue import SpeechQueue


class FakeSession:
    def __init__(self) -> None:
        self.text_in = False  # the text the first chunk needs

    def first_chunk_text_in(self) -> bool:
        return self.text_in


class Recorder:
    """Stands in for the Triton-facing steps of one model: what was fed, answered, failed."""

    def __init__(self, model: TritonPythonModel) -> None:
        self.model = model
        self.fed: list[str] = []
        self.answered: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.on_answer: dict[str, Any] = {}
        self.completes_first_chunk: set[str] = set()  # requests whose text completes it
        self.silent: set[str] = set()  # requests answered without audio

    def take_text(self, request: str, corr: str) -> _Decoded:
        self.fed.append(request)
        session = self.model.sessions.setdefault(corr, (FakeSession(), 0.0))[0]
        session.text_in |= request in self.completes_first_chunk
        return _Decoded(request, f"session-{corr}", len(self.fed))  # type: ignore[arg-type]

    def answer(self, decoded: _Decoded, corr: str) -> tuple[float, bool]:
        request = decoded.request
        if request in self.on_answer:
            self.on_answer[request]()
        self.answered.append(request)
        return (0.0 if request in self.silent else 1.0), False

    def fail(self, corr: str, request: Any, exc: BaseException, done: bool = True) -> None:
        self.failed.append((getattr(request, "request", request), type(exc).__name__))
        if done:
            self.model.queue.done(corr, 0.0, True)


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> tuple[TritonPythonModel, Recorder]:
    model = object.__new__(TritonPythonModel)  # no Triton: the batch logic alone
    model.queue = SpeechQueue()
    model.batch_limit = 8
    model.sessions = {}
    model.lock = threading.Lock()
    monkeypatch.setattr(speech_decoder, "server_alive", lambda: False)
    monkeypatch.setattr(speech_decoder, "decode_together", lambda sessions: None)
    monkeypatch.setattr(speech_decoder, "render_first_together", lambda marked: [])
    recorder = Recorder(model)
    model._take_text = recorder.take_text  # type: ignore[method-assign]
    model._answer = recorder.answer  # type: ignore[method-assign]
    model._fail = recorder.fail  # type: ignore[method-assign]
    model._answered_cancel = lambda request, corr: False  # type: ignore[method-assign]
    return model, recorder


def test_a_reply_starting_mid_batch_takes_over(
    model: tuple[TritonPythonModel, Recorder],
) -> None:
    decoder, seen = model
    queue = decoder.queue
    seen.on_answer["a1"] = lambda: queue.put("new", "n1")  # someone starts talking
    queue.put("a", "a1")
    queue.put("b", "b1")
    decoder._serve_batch(queue.take_batch(8, timeout_s=0))
    assert seen.answered == ["a1"]  # b1 was not rendered: it went back
    batch = queue.take_batch(8, timeout_s=0)
    assert [(key, type(request).__name__) for key, request in batch] == [
        ("b", "_Decoded"),
        ("new", "str"),
    ]
    decoder._serve_batch(batch)
    assert seen.fed == ["a1", "b1", "n1"]  # b1's text was fed once
    assert seen.answered == ["a1", "b1", "n1"]
    assert isinstance(batch[0][1], _Decoded) and batch[0][1].mark == 2
    assert len(queue) == 0


def test_a_failed_request_fails_the_rest_of_its_reply_in_the_batch(
    model: tuple[TritonPythonModel, Recorder],
) -> None:
    decoder, seen = model

    def bad_text() -> None:
        raise InvalidInput("broken")

    seen.on_answer["a1"] = bad_text
    for request in ("a1", "a2"):  # a reply without audio brings both
        decoder.queue.put("a", request)
    decoder.queue.put("b", "b1")
    decoder._serve_batch(decoder.queue.take_batch(8, timeout_s=0))
    assert seen.failed == [("a1", "InvalidInput"), ("a2", "Unavailable")]
    assert seen.answered == ["b1"]
    assert decoder.queue.take_batch(8, timeout_s=0) is None  # nothing left, nothing held


def test_a_reply_without_audio_takes_no_text_beyond_its_first_chunk(
    model: tuple[TritonPythonModel, Recorder],
) -> None:
    """Its first text group was decoded by an earlier batch, so of the two requests it brings
    the first completes its first chunk's text: the second waits for the next batch instead of
    rendering the reply's second chunk before the other reply's first."""
    decoder, seen = model
    queue = decoder.queue
    seen.completes_first_chunk = {"a2", "b2"}
    seen.silent = {"a1", "b1"}
    queue.put("a", "a1")
    decoder._serve_batch(queue.take_batch(1, timeout_s=0))  # a's first group, alone
    for request in ("a2", "a3"):
        queue.put("a", request)
    for request in ("b1", "b2"):
        queue.put("b", request)
    decoder._serve_batch(queue.take_batch(8, timeout_s=0))
    assert seen.fed == ["a1", "a2", "b1", "b2"]
    assert seen.answered == ["a1", "a2", "b1", "b2"]
    assert queue.take_batch(8, timeout_s=0) == [("a", "a3")]
