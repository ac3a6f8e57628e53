"""What a live session reports (Prometheus: `iomni.telemetry.metrics.GatewayMetrics`)."""

from __future__ import annotations

from typing import Literal, Protocol


class LiveObserver(Protocol):
    def speech_to_first_audio(self, seconds: float) -> None:
        """From the end of the user's speech to the reply's first audio."""

    def committed(self, how: Literal["vad", "forced", "client"]) -> None:
        """A user turn was committed: by its silence (vad), at the length cap (forced), or by
        the client (end_of_turn, input_audio_buffer.commit)."""

    def barge_in(self, by: Literal["voice", "client"]) -> None: ...

    def speculative(self, result: Literal["started", "confirmed", "discarded"]) -> None: ...

    def vad_time(self, processing_s: float, audio_s: float) -> None:
        """Time spent detecting voice activity on `audio_s` seconds of input."""

    def warning(self, outcome: str) -> None:
        """Input dropped with a warning (the error table's outcome label)."""


class NullLiveObserver:
    def speech_to_first_audio(self, seconds: float) -> None:
        pass

    def committed(self, how: Literal["vad", "forced", "client"]) -> None:
        pass

    def barge_in(self, by: Literal["voice", "client"]) -> None:
        pass

    def speculative(self, result: Literal["started", "confirmed", "discarded"]) -> None:
        pass

    def vad_time(self, processing_s: float, audio_s: float) -> None:
        pass

    def warning(self, outcome: str) -> None:
        pass
