"""Serving many spoken replies on one speech decoder: what is rendered next, and together.

A transport (the Triton speech decoder, the embedded engine's speech worker) turns each call
it receives into a `SpeechRequest` and `put`s it under its reply's key; it answers through the
request's `SpeechAnswer`. One thread renders: it takes a batch of replies' next requests from
a `SpeechQueue` (first audio first), decodes their text to speech tokens together
(`decode_together`), renders the flow of the first chunks that makes ready in one pass
(`render_first_together`), then renders and answers each request, most urgent first.

A reply that starts while a batch renders does not wait for the whole batch: the requests not
rendered yet go back to the queue with their text decoded, and the next batch starts with the
new reply. A `discard` (barge-in) answers the reply's queued requests as cancelled, and a
render of that reply in progress stops before its next chunk.

A reply's state is freed at its end, when one of its requests fails or is cancelled, and
after `idle_timeout_s` without requests (a client that vanished without its end).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from iomni.errors import Cancelled, Internal, InvalidInput, IomniError, Unavailable
from iomni.model.speech.queue import SpeechQueue
from iomni.model.speech.stream import (
    SAMPLE_RATE,
    SpeechSession,
    decode_together,
    render_first_together,
)

log = logging.getLogger(__name__)

# Keys freed for being idle, remembered so that their next request says so (bounded: a
# transport's keys may never repeat).
IDLE_MEMORY = 1024


class SpeechAnswer(Protocol):
    """How a request is answered on its transport: its chunks, then `complete` or `fail`."""

    def chunk(self, samples: np.ndarray) -> None: ...

    def complete(self) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass(eq=False)
class SpeechRequest:
    """One call of a reply: text to speak (with the LLM's hidden state of each token), the
    reply's end, or both. The first request of a reply has `start` and how to `open` it."""

    answer: SpeechAnswer
    token_ids: Sequence[int] = ()
    hidden: torch.Tensor | None = None  # (tokens, hidden size)
    start: bool = False
    end: bool = False
    open: Callable[[], SpeechSession] | None = None  # the reply's session, with `start`
    invalid: IomniError | None = None  # the transport could not read it: failed in its turn
    discard: bool = False  # a barge-in (`SpeechScheduler.discard`)
    # Once its text is in its session (decoded by a batch, or queued for the batch's decode):
    session: SpeechSession | None = field(default=None, repr=False)
    mark: int = 0


@dataclass
class SchedulerHooks:
    """Where a transport's metrics hear about the work (each called on the render thread,
    `open_sequences` under the scheduler's lock)."""

    decode_batch: Callable[[int], None] = lambda replies: None
    first_chunk_batch: Callable[[int], None] = lambda replies: None
    open_sequences: Callable[[int], None] = lambda count: None

    @classmethod
    def reporting(cls, report: Callable[[str, int], None]) -> SchedulerHooks:
        """Hooks that hand each event to `report(event, value)`: "decode_batch",
        "first_chunk_batch" or "open_sequences"."""
        return cls(
            decode_batch=lambda replies: report("decode_batch", replies),
            first_chunk_batch=lambda replies: report("first_chunk_batch", replies),
            open_sequences=lambda count: report("open_sequences", count),
        )


class SpeechScheduler:
    def __init__(
        self,
        batch_limit: int = 8,
        idle_timeout_s: float = 60.0,
        hooks: SchedulerHooks | None = None,
        queue: SpeechQueue | None = None,
    ) -> None:
        """`batch_limit`: requests one pass decodes together (one per reply; two for a
        reply still without audio)."""
        self.batch_limit = batch_limit
        self.idle_timeout_s = idle_timeout_s
        self.hooks = hooks or SchedulerHooks()
        self.queue = queue or SpeechQueue()
        self.sessions: dict[Hashable, tuple[SpeechSession, float]] = {}
        self.lock = threading.Lock()
        self._discarded: set[Hashable] = set()  # discards not yet taken
        self._idle_freed: OrderedDict[Hashable, None] = OrderedDict()
        self._open_count = -1
        # The batch being served's requests not answered and done yet (render thread only).
        self._unsettled: dict[int, tuple[Hashable, SpeechRequest]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the render and idle-sweep threads."""
        for target, name in ((self._render_loop, "speech-render"), (self._sweep_loop, "sweep")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, error: BaseException | None = None) -> None:
        """Stop; the requests never taken are failed with `error` (default: Unavailable)."""
        self._stop.set()
        error = error or Unavailable("the speech decoder is shutting down")
        for request in self.queue.drain():
            _tell(request.answer.fail, error)

    def put(self, key: Hashable, request: SpeechRequest) -> None:
        """Queue a request of reply `key`, rendered after the reply's earlier ones."""
        try:
            self.queue.put(key, request, urgent=request.answer.cancelled())
        except Unavailable as exc:  # stopped
            _tell(request.answer.fail, exc)

    def discard(self, key: Hashable, answer: SpeechAnswer) -> None:
        """A barge-in: the reply's queued requests are answered as cancelled, a render of it in
        progress stops before its next chunk, and `answer` completes once that is done. A
        reply already over (or never started) is answered at once: queued, its discard would
        look like a new reply's first audio waiting and break off the batch being rendered."""
        if not self._known(key) and not self._stop.is_set():
            _tell(answer.complete)
            return
        with self.lock:  # before the free: a request taken meanwhile is told it was discarded
            self._discarded.add(key)
        self._free(key)
        try:
            stale = self.queue.put(key, SpeechRequest(answer, end=True, discard=True), True, True)
        except Unavailable as exc:  # stopped
            _tell(answer.fail, exc)
            return
        for request in stale:
            _tell(request.answer.fail, Cancelled("the reply was discarded (barge-in)"))

    def _known(self, key: Hashable) -> bool:
        """Whether reply `key` has state here or requests queued or being served. Its owner
        is closing it and sends nothing more, so a reply found unknown stays so."""
        if self.queue.active(key):
            return True
        with self.lock:
            return key in self.sessions

    def _render_loop(self) -> None:
        with torch.inference_mode():
            while (batch := self.queue.take_batch(self.batch_limit)) is not None:
                try:
                    self.serve_batch(batch)
                except Exception:  # a bug: the batch's requests were failed; serve the next
                    log.exception("speech decoder: serving a batch failed")

    def serve_batch(self, batch: list[tuple[Hashable, SpeechRequest]]) -> None:
        """Take each request's text (a reply without audio: up to its first chunk's; what is
        beyond goes back to the queue), decode all of it together, render the flow of the
        first chunks it makes ready together, then render and answer each request, most urgent
        first, handing over to a reply that starts meanwhile (call under inference mode).
        Should serving break off, the requests not answered yet are failed: else their
        clients would wait forever and the queue would hold their replies as being served."""
        self._unsettled = {id(request): (key, request) for key, request in batch}
        try:
            self._serve(batch)
        finally:
            left, self._unsettled = list(self._unsettled.values()), {}
            for key, request in left:
                self._fail(key, request, Internal("the speech decoder failed serving this call"))

    def _serve(self, batch: list[tuple[Hashable, SpeechRequest]]) -> None:
        texted: list[tuple[Hashable, SpeechRequest]] = []
        later: list[tuple[Hashable, SpeechRequest]] = []
        for key, request in batch:
            try:
                if request.session is not None:  # decoded by an earlier batch
                    if not self._answered_cancel(key, request):
                        texted.append((key, request))
                elif any(k == key for k, _ in texted) and self._has_first_chunk_text(key):
                    later.append((key, request))
                elif self._take_text(key, request):
                    texted.append((key, request))
            except Exception as exc:
                self._fail(key, request, exc)
        for key, request in reversed(later):
            self._requeue(key, request)
        if not self._decode(texted):
            return
        failed: set[Hashable] = set()  # a reply whose request failed: its later ones fail too
        for index, (key, request) in enumerate(texted):
            if index and self.queue.first_audio_waiting():
                for deferred in reversed(texted[index:]):
                    self._requeue(*deferred)
                return
            audio_s, ended = 0.0, True
            try:
                if key in failed:
                    raise Unavailable(f"an earlier request of speech sequence {key!r} failed")
                audio_s, ended = self._answer(key, request)
            except Exception as exc:
                failed.add(key)
                self._fail(key, request, exc, done=False)
            finally:
                self._done(key, request, audio_s, ended)

    def _decode(self, texted: list[tuple[Hashable, SpeechRequest]]) -> bool:
        """Decode the batch's text and render its first chunks' flow together; on failure
        every request of the batch fails."""
        sessions = list({id(r.session): r.session for _, r in texted if r.session}.values())
        if sessions:
            _notify(self.hooks.decode_batch, len(sessions))
        try:
            decode_together(sessions)
            passes = render_first_together([(r.session, r.mark) for _, r in texted if r.session])
        except Exception as exc:
            for key, request in texted:
                self._fail(key, request, exc)
            return False
        for replies in passes:
            _notify(self.hooks.first_chunk_batch, replies)
        return True

    def _take_text(self, key: Hashable, request: SpeechRequest) -> bool:
        """Queue the request's text on its session (decoded by the batch's pass); False when
        it was answered here already (a discard, or cancelled)."""
        if request.discard:
            self._take_discard(key, request)
            return False
        if self._answered_cancel(key, request):
            return False
        if request.invalid is not None:
            raise request.invalid
        session = self._open(key, request) if request.start else self._session(key)
        hidden = request.hidden if request.hidden is not None else torch.zeros(0, 0)
        if len(request.token_ids) != hidden.shape[0]:
            raise InvalidInput(
                f"{len(request.token_ids)} text tokens came with {hidden.shape[0]} hidden-state "
                "rows: one row per token is required"
            )
        request.session = session
        request.mark = session.add_text(request.token_ids, hidden)
        return True

    def _take_discard(self, key: Hashable, request: SpeechRequest) -> None:
        """A discard reached its turn: the reply's requests before it are answered, so its key
        may open again; nothing of the reply outlives it. Cancelled, it still does this (its key
        would stay discarded forever)."""
        with self.lock:
            self._discarded.discard(key)
        if not self._answered_cancel(key, request):  # that frees the reply too
            self._free(key)
            _tell(request.answer.complete)
            self._done(key, request)

    def _answer(self, key: Hashable, request: SpeechRequest) -> tuple[float, bool]:
        """Render what the request's text made ready, answering each chunk as soon as it is
        rendered, then complete; returns (seconds of audio sent, whether the reply ended)."""
        session = request.session
        assert session is not None
        samples = 0
        for chunk in self._while_held(key, session, request):
            if not _tell(request.answer.chunk, chunk):  # its client is gone: free the reply
                raise Unavailable(f"speech sequence {key!r}: a chunk could not be answered")
            samples += chunk.size
        if request.end:
            self._free(key)
        else:
            self._touch(key, session)
        if not _tell(request.answer.complete):
            raise Unavailable(f"speech sequence {key!r}: its completion could not be answered")
        return samples / SAMPLE_RATE, request.end

    def _while_held(
        self, key: Hashable, session: SpeechSession, request: SpeechRequest
    ) -> Iterator[np.ndarray]:
        """The request's chunks, each rendered only while the reply still holds `session` (a
        discard frees it: the rest is not wanted)."""
        chunks = itertools.chain(
            session.iter_ready(request.mark), session.iter_finish() if request.end else ()
        )
        while self._holds(key, session):
            chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def _answered_cancel(self, key: Hashable, request: SpeechRequest) -> bool:
        """A request its client cancelled frees the reply and is answered CANCELLED."""
        if not request.answer.cancelled():
            return False
        self._fail(key, request, Cancelled("request cancelled"))
        return True

    def _fail(
        self, key: Hashable, request: SpeechRequest, exc: BaseException, done: bool = True
    ) -> None:
        self._free(key)
        _tell(request.answer.fail, exc)
        if done:
            self._done(key, request)

    def _done(
        self, key: Hashable, request: SpeechRequest, audio_s: float = 0.0, ended: bool = True
    ) -> None:
        """The request taken is answered: the queue serves its reply's next one."""
        self._unsettled.pop(id(request), None)
        self.queue.done(key, audio_s, ended)

    def _requeue(self, key: Hashable, request: SpeechRequest) -> None:
        """Give the request taken back to the queue; once it is stopped, fail it instead."""
        self._unsettled.pop(id(request), None)
        try:
            self.queue.requeue(key, request)
        except Unavailable as exc:
            self._fail(key, request, exc, done=False)  # the stop dropped its reply's state

    def _has_first_chunk_text(self, key: Hashable) -> bool:
        """Whether the reply has no audio yet and the text its first chunk needs is in. A
        reply without audio brings two requests, that text; when an earlier batch decoded
        the first, the first of these completes it, and the second would add a decode round
        and render the reply's second chunk before the other replies' first ones."""
        with self.lock:
            entry = self.sessions.get(key)
        return entry is not None and entry[0].first_chunk_text_in()

    def _open(self, key: Hashable, request: SpeechRequest) -> SpeechSession:
        if request.open is None:
            raise InvalidInput(f"speech sequence {key!r}: its start says nothing of its voice")
        session = request.open()
        with self.lock:
            if key in self._discarded:  # discarded while it opened: it must not hold state
                raise Cancelled("the reply was discarded (barge-in)")
            self.sessions[key] = (session, time.monotonic())
            self._idle_freed.pop(key, None)
            self._count_changed()
        return session

    def _session(self, key: Hashable) -> SpeechSession:
        with self.lock:
            entry = self.sessions.get(key)
            if entry is not None:
                return entry[0]
            if key in self._discarded:
                raise Cancelled("the reply was discarded (barge-in)")
            if key in self._idle_freed:
                raise InvalidInput(
                    f"speech sequence {key!r} was idle for more than "
                    f"{self.idle_timeout_s:g} s and was freed"
                )
        raise InvalidInput(f"speech sequence {key!r} is not open (no start, or it ended)")

    def _holds(self, key: Hashable, session: SpeechSession) -> bool:
        with self.lock:
            entry = self.sessions.get(key)
        return entry is not None and entry[0] is session

    def _touch(self, key: Hashable, session: SpeechSession) -> None:
        with self.lock:
            if (entry := self.sessions.get(key)) is not None and entry[0] is session:
                self.sessions[key] = (session, time.monotonic())

    def _free(self, key: Hashable) -> None:
        with self.lock:
            self.sessions.pop(key, None)
            self._count_changed()

    def _count_changed(self) -> None:
        """Under `self.lock`: tell the hook the open count, only when it changed."""
        if len(self.sessions) != self._open_count:
            self._open_count = len(self.sessions)
            _notify(self.hooks.open_sequences, self._open_count)

    def sweep(self) -> list[Hashable]:
        """Free the replies that had no request for longer than `idle_timeout_s` (one being
        rendered or with requests queued is not idle); returns their keys."""
        deadline = time.monotonic() - self.idle_timeout_s
        with self.lock:
            quiet = [key for key, (_, seen) in self.sessions.items() if seen < deadline]
        quiet = [key for key in quiet if not self.queue.active(key)]
        with self.lock:
            stale = [
                key for key in quiet if key in self.sessions and self.sessions[key][1] < deadline
            ]
            for key in stale:
                del self.sessions[key]
                self._idle_freed[key] = None
            while len(self._idle_freed) > IDLE_MEMORY:
                self._idle_freed.popitem(last=False)
            self._count_changed()
        for key in stale:
            self.queue.forget(key)
            log.warning("speech sequence %r idle for %g s: freed", key, self.idle_timeout_s)
        return stale

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(5.0, self.idle_timeout_s)):
            self.sweep()


def _tell(answer: Callable[..., None], *args: object) -> bool:
    """Answer a request; False when its transport failed (a vanished client), which is
    logged: it must not leave the other requests of the batch unanswered."""
    try:
        answer(*args)
    except Exception:
        log.exception("speech scheduler: answering a request failed")
        return False
    return True


def _notify(hook: Callable[[int], None], value: int) -> None:
    """Call a metric hook; one that fails must not leave the requests it interrupted unanswered."""
    try:
        hook(value)
    except Exception:
        log.exception("speech scheduler: a metric hook failed")
