"""Prometheus metrics of the turn core, per front door. Names follow Prometheus conventions
(base units, `_total` counters) and are checked with `promtool check metrics` in the tests.

`TurnMetrics` is the turn core's observer; the gateway serves it as `iomni_gateway_*` and the
Kafka worker as `iomni_worker_*`, with the same series, so a dashboard panel works for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TurnReport(Protocol):
    """The fields of `iomni.turns.observer.TurnReport` read here (telemetry imports no room)."""

    seconds: float
    timings_ms: Mapping[str, float]
    audio_ms: float
    prompt_tokens_reused: int
    cancel_latency_s: float | None
    time_per_output_token_s: float | None


LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5)
STAGES = ("vision_encode", "audio_encode", "prefill", "decode", "speech")


class TurnMetrics:
    """A `TurnObserver` that records into Prometheus under `prefix`."""

    def __init__(self, prefix: str = "iomni_gateway", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, prefix
        self.time_to_first_audio = Histogram(
            f"{p}_time_to_first_audio_seconds",
            "From end of the user's turn to the first audio chunk sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{p}_time_to_first_token_seconds",
            "From end of the user's turn to the first text token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.turn_duration = Histogram(
            f"{p}_turn_duration_seconds",
            "Whole turn, end of user turn to done",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            f"{p}_time_per_output_token_seconds",
            "Mean time between a turn's text tokens after the first, as sent to the client",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.real_time_factor = Histogram(
            f"{p}_speech_real_time_factor",
            "Time to produce the reply's speech divided by its duration (below 1 keeps up)",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.audio_underruns = Counter(
            f"{p}_audio_underruns_total",
            "Audio chunks sent after the audio before them had finished playing",
            registry=r,
        )
        self.audio_seconds = Counter(f"{p}_audio_seconds_total", "Speech audio sent", registry=r)
        self.active_turns = Gauge(f"{p}_active_turns", "Turns running in this process", registry=r)
        self.turns = Counter(f"{p}_turns_total", "Turns by outcome", ["outcome"], registry=r)
        self.cancel_latency = Histogram(
            f"{p}_cancel_latency_seconds",
            "From a cancel (barge-in) received to the turn stopped; no audio follows",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
            registry=r,
        )
        self.stage_duration = Histogram(
            f"{p}_stage_duration_seconds",
            "Time per stage of a turn",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_affinity = Counter(
            f"{p}_kv_affinity_total",
            "LLM replica choices: hit = the replica holding the session's KV cache",
            ["result"],
            registry=r,
        )
        self.llm_prompt_tokens_reused = Counter(
            f"{p}_llm_prompt_tokens_reused_total",
            "Prompt tokens the llm served from its KV cache",
            registry=r,
        )
        # The embedded engine's speech decoders, under the Triton speech decoder's own names
        # (no prefix), so that one dashboard panel shows either.
        self.speech_open_sequences = Gauge(
            "iomni_speech_open_sequences",
            "Speech sequences holding state in this instance",
            ["instance"],
            registry=r,
        )
        self.speech_decode_batch = Histogram(
            "iomni_speech_decode_batch_replies",
            "Replies whose text one speech-token decode pass took together",
            ["instance"],
            buckets=(1, 2, 4, 8, 16),
            registry=r,
        )
        self.speech_first_chunk_batch = Histogram(
            "iomni_speech_first_chunk_batch_replies",
            "Replies whose first chunks one flow pass rendered together",
            ["instance"],
            buckets=(2, 4, 8),
            registry=r,
        )

    # -- TurnObserver -----------------------------------------------------------------------

    def turn_started(self) -> None:
        self.active_turns.inc()

    def turn_stopped(self) -> None:
        self.active_turns.dec()

    def outcome(self, label: str) -> None:
        self.turns.labels(label).inc()

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def first_audio(self, seconds: float) -> None:
        self.time_to_first_audio.observe(seconds)

    def audio_underrun(self) -> None:
        self.audio_underruns.inc()

    def turn_done(self, report: TurnReport) -> None:
        self.turn_duration.observe(report.seconds)
        if report.cancel_latency_s is not None:
            self.cancel_latency.observe(report.cancel_latency_s)
        if report.time_per_output_token_s is not None:
            self.time_per_output_token.observe(report.time_per_output_token_s)
        for stage, ms in report.timings_ms.items():
            if stage in STAGES:
                self.stage_duration.labels(stage).observe(ms / 1000)
        if report.audio_ms:
            self.audio_seconds.inc(report.audio_ms / 1000)
            speech_ms = report.timings_ms.get("speech", 0.0)
            self.real_time_factor.observe(speech_ms / report.audio_ms)
        if report.prompt_tokens_reused:
            self.llm_prompt_tokens_reused.inc(report.prompt_tokens_reused)

    # -- the llm router ---------------------------------------------------------------------

    def affinity(self, result: str) -> None:
        self.kv_affinity.labels(result).inc()

    # -- the embedded engine's speech decoders ----------------------------------------------

    def speech_scheduler(self, event: str, value: int, instance: str) -> None:
        if event == "open_sequences":
            self.speech_open_sequences.labels(instance).set(value)
        elif event == "decode_batch":
            self.speech_decode_batch.labels(instance).observe(value)
        elif event == "first_chunk_batch":
            self.speech_first_chunk_batch.labels(instance).observe(value)


class GatewayMetrics(TurnMetrics):
    """The turn metrics plus what only a front door with client streams has: open streams and
    live conversations (a `LiveObserver`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("iomni_gateway", registry)
        r = self.registry
        self.active_streams = Gauge(
            "iomni_gateway_active_streams",
            "Open client streams (Converse, Chat, Realtime WebSocket sessions)",
            registry=r,
        )
        self.live_speech_to_first_audio = Histogram(
            "iomni_gateway_live_speech_to_first_audio_seconds",
            "Live mode: from the end of the user's speech to the reply's first audio",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.live_commits = Counter(
            "iomni_gateway_live_turns_committed_total",
            "Live mode: user turns committed (vad: by silence; forced: length cap; client)",
            ["how"],
            registry=r,
        )
        self.live_barge_ins = Counter(
            "iomni_gateway_live_barge_ins_total",
            "Replies interrupted, by the user's voice or by a client cancel",
            ["by"],
            registry=r,
        )
        self.live_speculative = Counter(
            "iomni_gateway_live_speculative_turns_total",
            "Turns started early at end of speech: started, confirmed, discarded",
            ["result"],
            registry=r,
        )
        self.live_vad_seconds = Counter(
            "iomni_gateway_live_vad_seconds_total",
            "Time spent on voice activity detection",
            registry=r,
        )
        self.live_audio_seconds = Counter(
            "iomni_gateway_live_input_audio_seconds_total",
            "Live input audio received (VAD seconds per audio second = the VAD's cost)",
            registry=r,
        )
        self.live_warnings = Counter(
            "iomni_gateway_live_input_dropped_total",
            "Live input dropped with a warning, by outcome (invalid, rejected, ...)",
            ["outcome"],
            registry=r,
        )

    # -- LiveObserver -----------------------------------------------------------------------

    def speech_to_first_audio(self, seconds: float) -> None:
        self.live_speech_to_first_audio.observe(seconds)

    def committed(self, how: str) -> None:
        self.live_commits.labels(how).inc()

    def barge_in(self, by: str) -> None:
        self.live_barge_ins.labels(by).inc()

    def speculative(self, result: str) -> None:
        self.live_speculative.labels(result).inc()

    def vad_time(self, processing_s: float, audio_s: float) -> None:
        self.live_vad_seconds.inc(processing_s)
        self.live_audio_seconds.inc(audio_s)

    def warning(self, outcome: str) -> None:
        self.live_warnings.labels(outcome).inc()
