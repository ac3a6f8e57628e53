"""The LLM model's responses leave on a thread of their own, in order, and a failed send does
not stop the ones after it."""

from __future__ import annotations

import threading

import pytest

from iomni.triton.backend import Responder


def test_sends_run_off_the_caller_in_order_and_close_flushes_them() -> None:
    sent: list[tuple[int, str]] = []
    gate = threading.Event()
    responder = Responder("test-responses")
    responder.submit(lambda: gate.wait(5))  # the first send is slow: the caller must not wait
    for index in range(50):
        responder.submit(lambda index=index: sent.append((index, threading.current_thread().name)))
    assert sent == []  # submit returned while the slow send still runs
    gate.set()
    responder.close()
    assert [index for index, _ in sent] == list(range(50))
    assert {name for _, name in sent} == {"test-responses"}


def test_a_failed_send_is_logged_and_the_next_ones_still_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[int] = []

    def vanished_client() -> None:
        raise RuntimeError("client gone")

    responder = Responder("test-responses")
    responder.submit(lambda: sent.append(1))
    responder.submit(vanished_client)
    responder.submit(lambda: sent.append(2))
    responder.close()
    assert sent == [1, 2]
    assert "sending a response failed" in caplog.text
