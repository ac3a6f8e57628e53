"""`TurnRunner`: one turn for any front door (gRPC, Kafka, the embedded CLI).

It owns what every front door needs and none should write again: admission (draining, the
concurrency limit, the turn's size), the session lease (renewed in short beats, so a dead
holder's lease lapses within seconds), idempotency by turn id (a done turn is replayed from its
stored result; a second call with a turn id this process is already running waits for it), the
engine turn with cancellation and a deadline, the atomic commit of the exchange, and reporting
to a `TurnObserver`. It speaks engine types; front doors convert to and from their wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from iomni.engine.events import AudioChunk, StopReason, TextDelta, TurnDone, Usage
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.errors import (
    DeadlineExceeded,
    InvalidInput,
    IomniError,
    LeaseLost,
    ResourceExhausted,
    SessionBusy,
    Unavailable,
)
from iomni.model.conversation import Message, TextPart
from iomni.model.sampling import SamplingParams
from iomni.parts import SpeechOptions
from iomni.telemetry.tracing import tracer
from iomni.turns.observer import NullObserver, TurnObserver, TurnReport
from iomni.turns.store import DialogueStore, Lease

log = logging.getLogger(__name__)

# What a stored turn result keeps of its usage (the fields every front door reports).
USAGE_FIELDS = (
    "prompt_tokens_reused",
    "prompt_tokens",
    "completion_tokens",
    "image_tokens",
    "audio_tokens",
    "media_cache_hits",
    "history_turns_dropped",
    "speech_tokens",
    "audio_ms",
)
Sent = tuple[float, int] | None  # when a text delta was sent, and its token index
BUSY_POLL_S = 0.5  # how often a turn waiting for its busy session asks for the lease again


@dataclass(frozen=True)
class RunnerLimits:
    max_concurrent_turns: int = 16
    turn_timeout_s: float = 300.0
    max_turn_bytes: int = 32 << 20  # media bytes plus UTF-8 text of one user turn


@dataclass(frozen=True)
class TurnInput:
    tenant: str
    session_id: str
    turn_id: str
    user: Message  # media parts carry their bytes
    params: SamplingParams = field(default_factory=SamplingParams)
    speech: SpeechOptions | None = None


@dataclass
class RunningTurn:
    """The front door's handle on a turn: set `cancel` (barge-in) to stop every stage.

    A `speculative` turn (started before the user's turn was confirmed over) runs at once but
    holds its outputs and is not committed until `confirm()`; `discard()` drops it without a
    trace: nothing emitted, nothing stored.
    """

    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled_at: float | None = None  # perf_counter() of the cancel, for its latency
    speculative: bool = False
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    discarded: bool = False

    def request_cancel(self) -> None:
        if not self.cancel.is_set():
            self.cancelled_at = time.perf_counter()
            self.cancel.set()

    def confirm(self) -> None:
        self.confirmed.set()

    def discard(self) -> None:
        self.discarded = True
        self.request_cancel()
        self.confirmed.set()  # wakes whoever waits for the verdict


class _Gate:
    """Holds a speculative turn's outputs until it is confirmed (then sends them at once, in
    order); drops them if it is discarded."""

    def __init__(self, emit: Emit, running: RunningTurn) -> None:
        self.emit = emit
        self.running = running
        self.held: list[TurnOutput] = []
        self.lock = asyncio.Lock()
        self.released = asyncio.ensure_future(self._release_on_verdict())

    async def __call__(self, output: TurnOutput) -> None:
        async with self.lock:
            if self.running.discarded:
                return
            if not self.running.confirmed.is_set():
                self.held.append(output)
                return
            await self._flush()
            await self.emit(output)

    async def _release_on_verdict(self) -> None:
        await self.running.confirmed.wait()
        async with self.lock:
            if not self.running.discarded:
                await self._flush()

    async def _flush(self) -> None:
        held, self.held = self.held, []
        for output in held:
            await self.emit(output)

    def close(self) -> None:
        self.released.cancel()


class _Measures:
    """What a turn's stream observes. A speculative turn's are held until its verdict: a
    discarded one was never heard, and must not count in the latency histograms."""

    def __init__(self, held: bool) -> None:
        self.held: list[Callable[[], None]] | None = [] if held else None

    def record(self, observe: Callable[..., None], *values: Any) -> None:
        if self.held is None:
            observe(*values)
        else:
            self.held.append(functools.partial(observe, *values))

    def release(self) -> None:
        """The turn was confirmed: what it observed counts."""
        held, self.held = self.held or [], None
        for observe in held:
            observe()


@dataclass(frozen=True)
class TurnFinished:
    """The last event of a turn. A replayed turn (its id was already done) carries the stored
    text and usage; its audio was never stored, so a replay has no audio and no timings."""

    session_id: str
    turn_id: str
    stop_reason: StopReason
    text: str
    usage: Usage
    timings_ms: dict[str, float] = field(default_factory=dict)
    replayed: bool = False


TurnOutput = TextDelta | AudioChunk | TurnFinished
Emit = Callable[[TurnOutput], Awaitable[None]]


class TurnRunner:
    def __init__(
        self,
        engine: TurnEngine,
        store: DialogueStore,
        owner: str,
        limits: RunnerLimits | None = None,
        observer: TurnObserver | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.owner = owner
        self.limits = limits or RunnerLimits()
        self.observer: TurnObserver = observer or NullObserver()
        self.active = 0
        self.draining = False
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}

    @property
    def lease_beat_s(self) -> float:
        """Renew the lease three times per TTL: two beats can be missed before it lapses."""
        return self.store.lease_ttl_ms / 3000

    async def run(
        self,
        turn: TurnInput,
        emit: Emit,
        running: RunningTurn | None = None,
        busy_wait_s: float = 0.0,
    ) -> None:
        """Run `turn`, sending its outputs to `emit`; the last one is a `TurnFinished`.

        A session busy with another turn fails at once with SessionBusy, or, with
        `busy_wait_s`, is asked for again until then (a queued request, whose session's holder
        may have died with a lease yet to lapse). Either way the turn has one outcome."""
        running = running or RunningTurn()
        if self.draining:  # not a failure: the client retries on another replica
            raise Unavailable("this replica is draining for shutdown; retry on another one")
        try:
            self._admit(turn)
        except IomniError as exc:
            self.observer.outcome(exc.code.outcome)
            raise
        key = (turn.session_id, turn.turn_id)
        while (earlier := self._inflight.get(key)) is not None:
            # The same turn id is already running here (a client retrying early): wait for it,
            # then this call replays its stored result or, if it failed, runs it.
            await asyncio.shield(earlier)
        done = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        self.active += 1
        self.observer.turn_started()
        try:
            with tracer().start_as_current_span("turn") as span:
                span.set_attribute("iomni.session_id", turn.session_id)
                span.set_attribute("iomni.turn_id", turn.turn_id)
                self.observer.outcome(await self._run(turn, emit, running, busy_wait_s))
        except asyncio.CancelledError:
            self.observer.outcome("cancelled")  # the client went away (or its front door closed)
            raise
        except IomniError as exc:
            self.observer.outcome(exc.code.outcome)
            raise
        except Exception:
            self.observer.outcome("error")
            raise
        finally:
            self.active -= 1
            self.observer.turn_stopped()
            del self._inflight[key]
            done.set_result(None)

    def _admit(self, turn: TurnInput) -> None:
        if self.active >= self.limits.max_concurrent_turns:
            raise ResourceExhausted(
                f"this replica is running {self.active} turns, its limit; "
                "retry shortly or on another replica"
            )
        size = message_bytes(turn.user)
        if size > self.limits.max_turn_bytes:
            raise InvalidInput(
                f"the turn is {size / (1 << 20):.1f} MiB of media and text; the limit is "
                f"{self.limits.max_turn_bytes / (1 << 20):.0f} MiB"
            )

    async def _run(
        self, turn: TurnInput, emit: Emit, running: RunningTurn, busy_wait_s: float
    ) -> str:
        """The turn under its lease; returns the outcome label."""
        await self.store.get_session(turn.tenant, turn.session_id)
        lease = await self._acquire(turn, busy_wait_s)
        renewer = asyncio.create_task(self._renew(lease, running))
        try:
            record = await self.store.begin_turn(lease, turn.turn_id)
            if record is not None:
                await self._replay(turn, record.result, emit)
                return "replayed"
            request = TurnRequest(
                user=turn.user,
                history=await self.store.history(turn.tenant, turn.session_id),
                params=turn.params,
                speech=turn.speech,
                session_id=turn.session_id,
                turn_id=turn.turn_id,
            )
            gate = _Gate(emit, running) if running.speculative else None
            measures = _Measures(held=running.speculative)
            try:  # one deadline for the reply and, for a speculative turn, its verdict
                async with asyncio.timeout(self.limits.turn_timeout_s):
                    done = await self._stream(request, gate or emit, running, measures)
                    if gate is not None:
                        await running.confirmed.wait()
                        if running.discarded:
                            return "discarded"
                        await gate.released  # everything held went out, in order
                        measures.release()
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"turn {turn.turn_id} exceeded {self.limits.turn_timeout_s:.0f} s"
                ) from exc
            finally:
                if gate is not None:
                    gate.close()
            assert done.record is not None
            await self.store.commit_turn(lease, turn.turn_id, *done.record, stored_result(done))
            await emit(finished(turn, done))
            return "cancelled" if done.stop_reason == "cancelled" else "ok"
        finally:
            renewer.cancel()
            with contextlib.suppress(IomniError):
                await self.store.release_lease(lease)

    async def _acquire(self, turn: TurnInput, busy_wait_s: float) -> Lease:
        deadline = time.monotonic() + busy_wait_s
        while True:
            try:
                return await self.store.acquire_lease(turn.session_id, self.owner, turn.turn_id)
            except SessionBusy:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(BUSY_POLL_S)

    async def _stream(
        self, request: TurnRequest, emit: Emit, running: RunningTurn, measures: _Measures
    ) -> TurnDone:
        """Run the engine turn, forwarding its events; a cancel stops every stage."""
        observer = self.observer
        turn = self.engine.start(request)
        events = turn.events()
        watcher = asyncio.create_task(_cancel_on(running.cancel, turn.cancel))
        started = time.perf_counter()
        first_audio = None
        first_text: Sent = None  # (sent at, token index) of the first text delta
        last_text: Sent = None  # and of the last
        sent_audio_s = 0.0
        try:
            async for event in events:
                now = time.perf_counter()
                if isinstance(event, TextDelta):
                    last_text = (now, event.token_index)
                    if first_text is None:
                        first_text = last_text
                        measures.record(observer.first_token, now - started)
                    await emit(event)
                elif isinstance(event, AudioChunk):
                    if turn.cancelled:
                        continue  # nothing is spoken after a barge-in
                    if first_audio is None:
                        first_audio = now
                        measures.record(observer.first_audio, now - started)
                    elif now - first_audio > sent_audio_s:
                        measures.record(observer.audio_underrun)
                    sent_audio_s += event.duration_ms / 1000
                    await emit(event)
                else:
                    report = _report(event, started, running, first_text, last_text)
                    measures.record(observer.turn_done, report)
                    return event
        finally:
            watcher.cancel()
            # On an error or a client gone, close the turn now: it cancels the LLM stream and
            # discards the speech sequence instead of leaving them to garbage collection.
            turn.cancel()
            await events.aclose()
        raise RuntimeError("the turn ended without TurnDone")

    async def _replay(self, turn: TurnInput, result: dict, emit: Emit) -> None:
        text = str(result.get("text", ""))
        await emit(TextDelta(text, 0))
        await emit(
            TurnFinished(
                turn.session_id,
                turn.turn_id,
                result.get("stop_reason", "eos"),
                text,
                stored_usage(result.get("usage", {})),
                replayed=True,
            )
        )

    async def _renew(self, lease: Lease, running: RunningTurn) -> None:
        beat = self.lease_beat_s
        while True:
            await asyncio.sleep(beat)
            try:
                await self.store.renew_lease(lease)
                continue
            except LeaseLost:
                pass
            except IomniError:
                # A store blip: the lease is still ours until it expires, so keep trying.
                if time.time() + beat < lease.expires_at:
                    continue
            log.warning("lease of session %s lost; stopping its turn", lease.session_id)
            running.request_cancel()
            return


async def _cancel_on(event: asyncio.Event, cancel: Callable[[], None]) -> None:
    await event.wait()
    cancel()


def _report(
    done: TurnDone, started: float, running: RunningTurn, first_text: Sent, last_text: Sent
) -> TurnReport:
    now = time.perf_counter()
    per_token = None
    if first_text and last_text and last_text[1] > first_text[1]:
        per_token = (last_text[0] - first_text[0]) / (last_text[1] - first_text[1])
    return TurnReport(
        seconds=now - started,
        timings_ms=dict(done.timings_ms),
        audio_ms=done.usage.audio_ms,
        prompt_tokens_reused=done.usage.prompt_tokens_reused,
        cancel_latency_s=None if running.cancelled_at is None else now - running.cancelled_at,
        time_per_output_token_s=per_token,
    )


def message_bytes(message: Message) -> int:
    """What a user turn weighs against `max_turn_bytes`: media bytes plus UTF-8 text."""
    size = 0
    for part in message.parts:
        if isinstance(part, TextPart):
            size += len(part.text.encode("utf-8", errors="surrogatepass"))
        elif part.data is not None:
            size += len(part.data)
    return size


def stored_result(done: TurnDone) -> dict:
    assert done.record is not None
    return {
        "text": done.record[1].text,
        "stop_reason": done.stop_reason,
        "usage": {k: getattr(done.usage, k) for k in USAGE_FIELDS},
    }


def stored_usage(raw: dict) -> Usage:
    values = {k: raw[k] for k in USAGE_FIELDS if k in raw}
    values.setdefault("prompt_tokens", 0)
    values.setdefault("completion_tokens", 0)
    return Usage(**values)


def finished(turn: TurnInput, done: TurnDone) -> TurnFinished:
    assert done.record is not None
    return TurnFinished(
        turn.session_id,
        turn.turn_id,
        done.stop_reason,
        done.record[1].text,
        done.usage,
        dict(done.timings_ms),
    )
