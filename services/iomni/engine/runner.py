"""Run one turn for a front door (the gRPC gateway or the Kafka worker): session lease,
idempotency by turn id, the engine turn, streaming, and the atomic commit of the result.

Events go out as `iomni.v1` messages (`ConverseResponse`), the API's own types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from iomni.engine.events import AudioChunk, TextDelta, TurnDone
from iomni.engine.parts import SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.errors import DeadlineExceeded, InvalidInput, IomniError, ResourceExhausted, Unavailable
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.sampling import SamplingParams
from iomni.telemetry.metrics import GatewayMetrics
from iomni.telemetry.tracing import tracer
from iomni.v1 import dialogue_pb2 as pb

log = logging.getLogger(__name__)
Emit = Callable[[pb.ConverseResponse], Awaitable[None]]
# Failed turns by cause, for iomni_gateway_turns_total{outcome}: the client's fault, a busy
# session, or the platform's (error), which the error-rate alert watches.
FAILURE_OUTCOMES = {
    "INVALID_ARGUMENT": "invalid",
    "NOT_FOUND": "invalid",
    "UNAUTHENTICATED": "invalid",
    "ABORTED": "busy",
    "DEADLINE_EXCEEDED": "timeout",
    "RESOURCE_EXHAUSTED": "rejected",
    "UNAVAILABLE": "error",
    "INTERNAL": "error",
}

STOP_REASONS = {
    "eos": pb.STOP_REASON_EOS,
    "length": pb.STOP_REASON_LENGTH,
    "cancelled": pb.STOP_REASON_CANCELLED,
}


@dataclass
class RunnerLimits:
    max_concurrent_turns: int = 16
    turn_timeout_s: float = 300.0
    max_turn_bytes: int = 64 << 20


@dataclass
class RunningTurn:
    cancel: asyncio.Event
    cancelled_at: float | None = None


class TurnRunner:
    """One turn end to end: lease, idempotency, engine, streaming, atomic commit."""

    def __init__(
        self,
        engine: TurnEngine,
        state,
        metrics: GatewayMetrics,  # type: ignore[no-untyped-def]
        limits: RunnerLimits,
        owner: str,
    ) -> None:
        self.engine = engine
        self.state = state
        self.metrics = metrics
        self.limits = limits
        self.owner = owner
        self.active = 0
        self.draining = False
        # Optional event log: (session id, turn id) -> an object whose `emit` also receives
        # every response (the gateway publishes interactive turns to Kafka this way).
        self.event_log: Callable[[str, str], Any] | None = None

    async def run(
        self,
        tenant: str,
        session_id: str,
        turn_id: str,
        user: Message,
        params: SamplingParams,
        speech: SpeechOptions | None,
        emit: Emit,
        running: RunningTurn,
    ) -> None:
        if self.draining:
            raise Unavailable("the gateway is draining for shutdown; retry on another replica")
        if self.active >= self.limits.max_concurrent_turns:
            self.metrics.turns.labels("rejected").inc()
            raise ResourceExhausted(
                f"the gateway is running {self.active} turns, its limit; "
                "retry shortly or on another replica"
            )
        self.active += 1
        self.metrics.active_turns.inc()
        try:
            with tracer().start_as_current_span("turn") as span:
                span.set_attribute("iomni.session_id", session_id)
                span.set_attribute("iomni.turn_id", turn_id)
                await self._run(
                    tenant,
                    session_id,
                    turn_id,
                    user,
                    params,
                    speech,
                    self._logged(emit, session_id, turn_id),
                    running,
                )
        except IomniError as exc:
            self.metrics.turns.labels(FAILURE_OUTCOMES.get(exc.code, "error")).inc()
            raise
        except Exception:
            self.metrics.turns.labels("error").inc()
            raise
        finally:
            self.active -= 1
            self.metrics.active_turns.dec()

    def _logged(self, emit: Emit, session_id: str, turn_id: str) -> Emit:
        if self.event_log is None:
            return emit
        log_turn = self.event_log(session_id, turn_id)

        async def both(response: pb.ConverseResponse) -> None:
            try:
                await log_turn.emit(response)
            except Exception:  # the log must never break a live dialogue
                log.exception("could not publish turn %s to the event log", turn_id)
            await emit(response)

        return both

    async def _run(self, tenant, session_id, turn_id, user, params, speech, emit, running):  # type: ignore[no-untyped-def]
        await self.state.get_session(tenant, session_id)
        lease = await self.state.acquire_lease(session_id, self.owner, turn_id)
        renewer = asyncio.create_task(self._renew(lease, running))
        try:
            record = await self.state.begin_turn(lease, turn_id)
            if record is not None:
                await self._replay(session_id, turn_id, record.result, emit)
                return
            history = await self.state.history(tenant, session_id)
            request = TurnRequest(
                user=user,
                history=history,
                params=params,
                speech=speech,
                session_id=session_id,
                turn_id=turn_id,
            )
            done = await asyncio.wait_for(
                self._stream(request, emit, running), timeout=self.limits.turn_timeout_s
            )
            result = _result(done)
            await self.state.commit_turn(lease, turn_id, *done.record, result)
            await emit(_done_response(session_id, turn_id, done, replayed=False))
            # Counted once committed; a failed commit is counted by run() as a failure.
            outcome = "cancelled" if done.stop_reason == "cancelled" else "ok"
            self.metrics.turns.labels(outcome).inc()
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"turn {turn_id} exceeded {self.limits.turn_timeout_s:.0f} s"
            ) from exc
        finally:
            renewer.cancel()
            with contextlib.suppress(IomniError):
                await self.state.release_lease(lease)

    async def _stream(self, request: TurnRequest, emit: Emit, running: RunningTurn) -> TurnDone:
        """Run the engine turn, forwarding its events; a cancel stops every stage."""
        turn = self.engine.start(request)
        events = turn.events()
        watcher = asyncio.create_task(_cancel_on(running.cancel, turn.cancel))
        started = time.perf_counter()
        sent_audio_s = 0.0
        first_audio: float | None = None
        session_id, turn_id = request.session_id, request.turn_id
        try:
            async for event in events:
                now = time.perf_counter()
                if isinstance(event, TextDelta):
                    if event.token_index == 0 or event.token_index < 1:
                        self.metrics.time_to_first_token.observe(now - started)
                    await emit(
                        pb.ConverseResponse(
                            session_id=session_id,
                            turn_id=turn_id,
                            text=pb.TextDelta(text=event.text, token_index=event.token_index),
                        )
                    )
                elif isinstance(event, AudioChunk):
                    if turn.cancelled:
                        continue  # nothing is spoken after a barge-in
                    if first_audio is None:
                        first_audio = now
                        self.metrics.time_to_first_audio.observe(now - started)
                    elif now - first_audio > sent_audio_s:
                        self.metrics.audio_underruns.inc()
                    sent_audio_s += event.duration_ms / 1000
                    await emit(
                        pb.ConverseResponse(
                            session_id=session_id,
                            turn_id=turn_id,
                            audio=pb.AudioChunk(
                                pcm=event.pcm,
                                sequence=event.sequence,
                                sample_rate_hz=event.sample_rate,
                            ),
                        )
                    )
                else:
                    self._observe(event, started, running)
                    return event
        finally:
            watcher.cancel()
            # On an error or a client gone, close the turn now: it cancels the LLM stream and
            # discards the speech sequence instead of leaving them to garbage collection.
            turn.cancel()
            await events.aclose()
        raise RuntimeError("the turn ended without TurnDone")

    def _observe(self, done: TurnDone, started: float, running: RunningTurn) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.turn_duration.observe(elapsed)
        if running.cancelled_at is not None:
            self.metrics.cancel_latency.observe(time.perf_counter() - running.cancelled_at)
        for stage, ms in done.timings_ms.items():
            if stage in ("vision_encode", "audio_encode", "prefill", "decode", "speech"):
                self.metrics.stage_duration.labels(stage).observe(ms / 1000)
        if done.usage.audio_ms:
            self.metrics.audio_seconds.inc(done.usage.audio_ms / 1000)
            self.metrics.real_time_factor.observe(
                done.timings_ms.get("speech", 0.0) / done.usage.audio_ms
            )
        if done.usage.prompt_tokens_reused:
            self.metrics.llm_prompt_tokens_reused.inc(done.usage.prompt_tokens_reused)

    async def _replay(self, session_id: str, turn_id: str, result: dict, emit: Emit) -> None:
        self.metrics.turns.labels("replayed").inc()
        await emit(
            pb.ConverseResponse(
                session_id=session_id,
                turn_id=turn_id,
                text=pb.TextDelta(text=result.get("text", "")),
            )
        )
        done = pb.TurnDone(
            stop_reason=STOP_REASONS.get(result.get("stop_reason", ""), 0),
            replayed=True,
            text=result.get("text", ""),
            usage=pb.Usage(**result.get("usage", {})),
        )
        await emit(pb.ConverseResponse(session_id=session_id, turn_id=turn_id, done=done))

    async def _renew(self, lease, running: RunningTurn) -> None:  # type: ignore[no-untyped-def]
        interval = self.state.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.state.renew_lease(lease)
                continue
            except IomniError as exc:
                # ABORTED is the store saying the lease is gone. Anything else is a Redis
                # blip: the lease is still ours until it expires, so retry until then.
                if exc.code != "ABORTED" and time.time() + interval < lease.expires_at:
                    continue
            log.warning("lease of session %s lost; stopping its turn", lease.session_id)
            running.cancel.set()
            return


async def _cancel_on(event: asyncio.Event, cancel: Callable[[], None]) -> None:
    await event.wait()
    cancel()


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


def _result(done: TurnDone) -> dict:
    return {
        "text": done.record[1].text,
        "stop_reason": done.stop_reason,
        "usage": {k: getattr(done.usage, k) for k in USAGE_FIELDS},
    }


def _done_response(
    session_id: str, turn_id: str, done: TurnDone, replayed: bool
) -> pb.ConverseResponse:
    usage = pb.Usage(**{k: getattr(done.usage, k) for k in USAGE_FIELDS})
    return pb.ConverseResponse(
        session_id=session_id,
        turn_id=turn_id,
        done=pb.TurnDone(
            stop_reason=STOP_REASONS[done.stop_reason],
            usage=usage,
            timings_ms={k: float(v) for k, v in done.timings_ms.items()},
            replayed=replayed,
            text=done.record[1].text,
        ),
    )


def sampling_params(options: pb.SamplingOptions) -> SamplingParams:
    defaults = SamplingParams()
    values = {
        "temperature": options.temperature
        if options.HasField("temperature")
        else defaults.temperature,
        "top_p": options.top_p if options.HasField("top_p") else defaults.top_p,
        "top_k": options.top_k if options.HasField("top_k") else defaults.top_k,
        "max_new_tokens": options.max_new_tokens
        if options.HasField("max_new_tokens")
        else defaults.max_new_tokens,
        "seed": options.seed if options.HasField("seed") else None,
    }
    return SamplingParams(**values).validate()


def speech_options(output: pb.OutputOptions) -> SpeechOptions | None:
    if not output.speech:
        return None
    return SpeechOptions(speaker_wav=output.speaker_wav or None, seed=output.speech_seed)


def chat_message(parts: list[pb.Part]) -> Message:
    out: list[TextPart | MediaPart] = []
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "text":
            out.append(TextPart(part.text))
        elif kind in ("image", "audio", "video"):
            frames = (part.video_frames or None) if kind == "video" else None
            out.append(MediaPart.from_bytes(kind, getattr(part, kind), num_frames=frames))
        else:
            raise InvalidInput(
                f"unsupported part {kind!r} in a Chat request; send text, image, audio or video"
            )
    return Message("user", tuple(out))
