"""The speech decoder's own queue: which reply's request is rendered next.

Triton hands a decoupled model its requests in arrival order, and a speech chunk takes a few
hundred milliseconds of one core, so at 8 concurrent replies a new reply's first chunk used to
wait behind later chunks of replies that already had seconds of audio queued at their clients.
The model therefore only enqueues in `execute` and one thread per instance takes requests from
here, most urgent reply first, each reply's requests in order:

1. requests that free work (a barge-in's discard, a cancelled request): cheap, and the client
   is waiting on them;
2. replies with no audio yet, oldest first: first audio is what a person waits for;
3. replies already playing, least audio left at the client first (seconds sent minus seconds
   since their first audio), so the stream closest to running dry is fed first.

A render cannot be interrupted, so starting a playing reply's chunk just before a new reply's
next text arrives makes that reply's first audio wait a whole chunk. While a reply on this
instance still has no audio, a playing reply with more than `reserve_s` of audio left at its
client therefore waits (the instance idles briefly) until its reserve runs down to `reserve_s`.

`take_batch` takes, with the most urgent request, the next requests of the other replies that
would be served now: the model decodes their text together (the speech-token LM's steps cost
about the same for 8 replies as for one) and renders them most urgent first. A reply still
without audio brings up to two requests, the text its first chunk needs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iomni.errors import Unavailable

URGENT, FIRST_AUDIO, PLAYING = 0, 1, 2


@dataclass
class _Reply:
    arrived: float
    pending: deque[tuple[Any, bool]] = field(default_factory=deque)  # (request, urgent)
    audio_s: float = 0.0
    first_audio_at: float | None = None
    serving: int = 0  # requests taken and not yet done


class SpeechQueue:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, reserve_s: float = 0.75
    ) -> None:
        self._clock = clock
        self.reserve_s = reserve_s
        self._ready = threading.Condition()
        self._replies: dict[Any, _Reply] = {}
        self._closed = False

    def put(self, key: Any, request: Any, urgent: bool = False, discard: bool = False) -> list:
        """Queue `request` for reply `key`. A `discard` (barge-in) goes first and supersedes
        the reply's requests not yet taken: they are returned, for the caller to answer as
        cancelled (a client that pipelines its text has several queued). Raises Unavailable
        once the queue is drained: nothing would take it."""
        with self._ready:
            if self._closed:
                raise Unavailable("the speech decoder is shutting down")
            reply = self._replies.setdefault(key, _Reply(arrived=self._clock()))
            superseded = []
            if discard:
                superseded = [r for r, _ in reply.pending]
                reply.pending.clear()
            reply.pending.append((request, urgent or discard))
            self._ready.notify()
            return superseded

    def take(self, timeout_s: float | None = None) -> tuple[Any, Any] | None:
        """The most urgent reply's next request, as (key, request); None when closed or after
        `timeout_s`. The reply is held until `done(key, ...)`."""
        batch = self.take_batch(1, timeout_s, first_audio_requests=1)
        return batch[0] if batch else None

    def take_batch(
        self, limit: int, timeout_s: float | None = None, first_audio_requests: int = 2
    ) -> list[tuple[Any, Any]] | None:
        """Up to `limit` requests as (key, request), most urgent first: the most urgent reply's
        next request(s) and those of the other replies that are not held back. None when
        closed or after `timeout_s`. Each must be answered with `done(key, ...)`."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        with self._ready:
            while not self._closed:
                keys, hold_s = self._servable(limit)
                if keys:
                    return self._pop(keys, limit, first_audio_requests)
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    return None
                self._ready.wait(hold_s if left is None else min(left, hold_s or left))
            return None

    def _pop(self, keys: list[Any], limit: int, first_audio_requests: int) -> list[tuple[Any, Any]]:
        taken: list[tuple[Any, Any]] = []
        for key in keys:
            reply = self._replies[key]
            count = first_audio_requests if reply.first_audio_at is None else 1
            while reply.pending and count > 0 and len(taken) < limit:
                taken.append((key, reply.pending.popleft()[0]))
                reply.serving += 1
                count -= 1
        return taken

    def done(self, key: Any, audio_s: float, ended: bool) -> None:
        """The request taken for `key` was answered with `audio_s` seconds of audio."""
        with self._ready:
            reply = self._replies.get(key)
            if reply is None:
                return
            reply.serving = max(0, reply.serving - 1)
            if audio_s > 0:
                if reply.first_audio_at is None:
                    reply.first_audio_at = self._clock()
                reply.audio_s += audio_s
            if ended and not reply.pending:
                del self._replies[key]
            self._ready.notify()

    def requeue(self, key: Any, request: Any) -> None:
        """Give back a taken request not served yet, to be taken again first for its reply
        (requeue a reply's requests last to first). Counts as its `done`. Raises Unavailable
        once the queue is drained: nothing would take it again."""
        with self._ready:
            if self._closed:
                raise Unavailable("the speech decoder is shutting down")
            reply = self._replies.get(key)
            if reply is None:
                reply = self._replies[key] = _Reply(arrived=self._clock())
            reply.pending.appendleft((request, False))
            reply.serving = max(0, reply.serving - 1)
            self._ready.notify()

    def first_audio_waiting(self) -> bool:
        """Whether a reply without audio has a request that nobody is serving."""
        with self._ready:
            return any(
                r.first_audio_at is None and r.pending and not r.serving
                for r in self._replies.values()
            )

    def active(self, key: Any) -> bool:
        """Whether reply `key` has requests queued or being served."""
        with self._ready:
            reply = self._replies.get(key)
            return reply is not None and bool(reply.pending or reply.serving)

    def forget(self, key: Any) -> None:
        """Drop an idle reply's bookkeeping (its client vanished without END)."""
        with self._ready:
            reply = self._replies.get(key)
            if reply is not None and not reply.serving and not reply.pending:
                del self._replies[key]

    def drain(self) -> list[Any]:
        """Close the queue; returns the requests never taken (to be answered by the caller)."""
        with self._ready:
            self._closed = True
            left = [r for reply in self._replies.values() for r, _ in reply.pending]
            self._replies.clear()
            self._ready.notify_all()
            return left

    def __len__(self) -> int:
        with self._ready:
            return sum(len(r.pending) for r in self._replies.values())

    def _servable(self, limit: int) -> tuple[list[Any], float | None]:
        """(keys to serve now, most urgent first, None) or ([], seconds to hold the playing
        replies back, or None when there is nothing to serve)."""
        now = self._clock()
        ranked = sorted(  # stable: ties go in arrival order
            (
                (self._rank(reply, now), key)
                for key, reply in self._replies.items()
                if not reply.serving and reply.pending
            ),
            key=lambda ranked_key: ranked_key[0],
        )
        if not ranked:
            return [], None
        if any(r.first_audio_at is None for r in self._replies.values()):
            # Playing replies with more than `reserve_s` left wait for first audio elsewhere.
            held = [(rank, key) for rank, key in ranked if self._held(rank)]
            ranked = [(rank, key) for rank, key in ranked if not self._held(rank)]
            if not ranked:
                return [], held[0][0][1] - self.reserve_s
        return [key for _, key in ranked[:limit]], None

    def _held(self, rank: tuple[int, float]) -> bool:
        return rank[0] == PLAYING and rank[1] > self.reserve_s

    @staticmethod
    def _rank(reply: _Reply, now: float) -> tuple[int, float]:
        if reply.pending[0][1]:
            return URGENT, reply.arrived
        if reply.first_audio_at is None:
            return FIRST_AUDIO, reply.arrived
        return PLAYING, reply.audio_s - (now - reply.first_audio_at)
