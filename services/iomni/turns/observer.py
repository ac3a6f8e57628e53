"""What the turn core reports while it runs turns. Prometheus is one implementation
(`iomni.telemetry.metrics.TurnMetrics`); `NullObserver` reports nowhere."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TurnReport:
    """What a finished engine turn tells an observer (plain values: observers need no engine)."""

    seconds: float  # end of the user's turn to the engine's last event
    timings_ms: Mapping[str, float]  # per stage: vision_encode, audio_encode, prefill, ...
    audio_ms: float  # speech produced
    prompt_tokens_reused: int  # served from the llm's KV cache
    cancel_latency_s: float | None = None  # a cancel to the turn stopped, when cancelled
    # Mean time between the text tokens after the first, as the front door sent them (decode
    # speed as the client sees it); None with fewer than two tokens.
    time_per_output_token_s: float | None = None


class TurnObserver(Protocol):
    def turn_started(self) -> None:
        """A turn was admitted (it counts as active until `turn_stopped`)."""

    def turn_stopped(self) -> None: ...

    def outcome(self, label: str) -> None:
        """A turn ended: ok, cancelled, replayed, or a failure's `ErrorCode.outcome`."""

    def first_token(self, seconds: float) -> None: ...

    def first_audio(self, seconds: float) -> None: ...

    def audio_underrun(self) -> None:
        """An audio chunk left after the audio before it had finished playing."""

    def turn_done(self, report: TurnReport) -> None:
        """The engine finished a turn (before its commit)."""

    def affinity(self, result: str) -> None:
        """An llm replica was chosen for a session: "hit" (it holds the KV cache) or "miss"."""

    def speech_scheduler(self, event: str, value: int, instance: str) -> None:
        """The embedded engine's speech decoder `instance` (a worker process, or the thread)
        reports: "open_sequences" (replies holding state), "decode_batch" (replies one
        speech-LM pass took), "first_chunk_batch" (first chunks one flow pass rendered)."""


class NullObserver:
    def turn_started(self) -> None:
        pass

    def turn_stopped(self) -> None:
        pass

    def outcome(self, label: str) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def first_audio(self, seconds: float) -> None:
        pass

    def audio_underrun(self) -> None:
        pass

    def turn_done(self, report: TurnReport) -> None:
        pass

    def affinity(self, result: str) -> None:
        pass

    def speech_scheduler(self, event: str, value: int, instance: str) -> None:
        pass
