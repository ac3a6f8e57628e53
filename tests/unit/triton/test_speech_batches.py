"""The speech decoder's batches: a reply that starts while a batch renders takes over; what
the batch had not rendered goes back to the queue with its text decoded, and is not fed twice."""

from __future__ import annotations

from typing import Any

import pytest

from iomni.triton.models import speech_decoder
from iomni.triton.models.speech_decoder import TritonPythonModel, _Decoded
from iomni.triton.speech_queue import SpeechQueue


def test_a_reply_starting_mid_batch_takes_over(monkeypatch: pytest.MonkeyPatch) -> None:
    model = object.__new__(TritonPythonModel)  # no Triton: the batch logic alone
    model.queue = SpeechQueue()
    model.batch_limit = 8
    monkeypatch.setattr(speech_decoder, "server_alive", lambda: False)
    decoded: list[list[Any]] = []
    monkeypatch.setattr(speech_decoder, "decode_together", decoded.append)
    fed: list[str] = []
    answered: list[str] = []

    def take_text(request: str, corr: str) -> tuple[str, int]:
        fed.append(request)
        return f"session-{corr}", len(fed)

    def answer(request: str, corr: str, session: str, mark: int) -> tuple[float, bool]:
        answered.append(request)
        if request == "a1":
            model.queue.put("new", "n1")  # a person starts talking while "a1" renders
        return 1.0, False

    model._take_text = take_text  # type: ignore[method-assign]
    model._answer = answer  # type: ignore[method-assign]
    model.queue.put("a", "a1")
    model.queue.put("b", "b1")
    model._serve_batch(model.queue.take_batch(8, timeout_s=0))
    assert answered == ["a1"]  # b1 was not rendered: it went back
    assert decoded == [["session-a", "session-b"]]
    batch = model.queue.take_batch(8, timeout_s=0)
    assert [(key, type(request).__name__) for key, request in batch] == [
        ("b", "_Decoded"),
        ("new", "str"),
    ]
    model._serve_batch(batch)
    assert fed == ["a1", "b1", "n1"]  # b1's text was fed once
    assert answered == ["a1", "b1", "n1"]
    assert isinstance(batch[0][1], _Decoded) and batch[0][1].mark == 2
    assert len(model.queue) == 0
