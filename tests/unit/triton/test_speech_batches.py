"""The speech decoder's batches: a reply that starts while a batch renders takes over; what
the batch had not rendered goes back to the queue with its text decoded, and is not fed twice;
a reply whose request fails does not go on with the rest of its batch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from iomni.errors import InvalidInput
from iomni.triton.models import speech_decoder
from iomni.triton.models.speech_decoder import TritonPythonModel, _Answer, _Decoded
from iomni.triton.speech_queue import SpeechQueue


class Recorder:
    """Stands in for the Triton-facing steps of one model: what was fed, answered, failed."""

    def __init__(self, model: TritonPythonModel) -> None:
        self.model = model
        self.fed: list[str] = []
        self.answered: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.on_answer: dict[str, Any] = {}

    def take_text(self, request: str, corr: str) -> _Decoded:
        self.fed.append(request)
        return _Decoded(request, f"session-{corr}", len(self.fed))  # type: ignore[arg-type]

    def answer(self, decoded: _Decoded, corr: str) -> tuple[float, bool]:
        request = decoded.request
        if request in self.on_answer:
            self.on_answer[request]()
        self.answered.append(request)
        return _Answer(1.0, False)

    def fail(self, corr: str, request: Any, exc: BaseException, done: bool = True) -> None:
        self.failed.append((getattr(request, "request", request), type(exc).__name__))
        if done:
            self.model.queue.done(corr, 0.0, True)


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> tuple[TritonPythonModel, Recorder]:
    model = object.__new__(TritonPythonModel)  # no Triton: the batch logic alone
    model.queue = SpeechQueue()
    model.batch_limit = 8
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


class Sender:
    def __init__(self, name: str, log: list[str], on_send: Any = None) -> None:
        self.name, self.log, self.on_send = name, log, on_send

    def send(self, response: Any, flags: int = 0) -> None:
        audio = response.output_tensors[0].array
        self.log.append(f"{self.name}:{'final' if flags else audio.size}")
        if self.on_send is not None:
            self.on_send()
            self.on_send = None


class Request:
    def __init__(self, sender: Sender, end: bool) -> None:
        self.sender, self.end = sender, end

    def get_response_sender(self) -> Sender:
        return self.sender


class Session:
    """Chunks ready to render, rendered one per step (resumable, as `SpeechSession`)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def iter_ready(self, mark: int) -> Any:
        while self.sizes:
            yield np.zeros(self.sizes.pop(0), np.float32)

    def iter_finish(self) -> Any:
        return iter(())


@pytest.fixture
def rendering(monkeypatch: pytest.MonkeyPatch) -> TritonPythonModel:
    """A model with the real `_answer` over fake sessions and a fake Triton API."""
    model = object.__new__(TritonPythonModel)
    model.queue = SpeechQueue()
    model.batch_limit = 8
    model.sessions_by_corr = {}
    fake_pb = SimpleNamespace(
        Tensor=lambda name, array: SimpleNamespace(array=array),
        InferenceResponse=lambda output_tensors: SimpleNamespace(output_tensors=output_tensors),
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
    )
    monkeypatch.setattr(speech_decoder, "pb", lambda: fake_pb)
    monkeypatch.setattr(speech_decoder, "server_alive", lambda: False)
    monkeypatch.setattr(speech_decoder, "decode_together", lambda sessions: None)
    monkeypatch.setattr(speech_decoder, "render_first_together", lambda marked: [])
    monkeypatch.setattr(
        speech_decoder, "input_array", lambda request, name: np.array([request.end])
    )
    model._take_text = lambda request, corr: _Decoded(request, model.sessions_by_corr[corr], 0)  # type: ignore[method-assign]
    model._answered_cancel = lambda request, corr: False  # type: ignore[method-assign]
    model._touch = lambda corr, session: None  # type: ignore[method-assign]
    model._free = lambda corr: None  # type: ignore[method-assign]
    return model


def test_a_reply_without_audio_takes_over_between_two_chunks_of_one_request(
    rendering: TritonPythonModel,
) -> None:
    """A request that renders several chunks (a reply's tail) hands over after the chunk in
    progress when a reply with no audio yet is waiting, then resumes where it stopped."""
    log: list[str] = []
    queue = rendering.queue
    rendering.sessions_by_corr.update(playing=Session([24000] * 3), new=Session([4800]))
    new = Request(Sender("new", log), end=True)
    starts = Sender("playing", log, on_send=lambda: queue.put("new", new))
    queue.put("playing", Request(starts, end=True))
    rendering._serve_batch(queue.take_batch(8, timeout_s=0))
    assert log == ["playing:24000"]  # one chunk, then the new reply's turn
    rendering._serve_batch(queue.take_batch(8, timeout_s=0))
    assert log[1:] == ["new:4800", "new:final"]
    while len(queue):
        rendering._serve_batch(queue.take_batch(8, timeout_s=2))
    assert log[3:] == ["playing:24000", "playing:24000", "playing:final"]
