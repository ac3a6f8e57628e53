"""What the turn core reports while it runs turns. Prometheus is one implementation
(`iomni.telemetry.metrics.TurnMetrics`); `NullObserver` reports nowhere."""

from __future__ import annotations

from typing import Protocol

from iomni.engine.events import TurnDone


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

    def turn_done(self, done: TurnDone, seconds: float, cancel_latency_s: float | None) -> None:
        """The engine finished a turn: its stage timings, usage, and (after a cancel) how long
        the cancel took to stop it."""

    def affinity(self, result: str) -> None:
        """An llm replica was chosen for a session: "hit" (it holds the KV cache) or "miss"."""


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

    def turn_done(self, done: TurnDone, seconds: float, cancel_latency_s: float | None) -> None:
        pass

    def affinity(self, result: str) -> None:
        pass
