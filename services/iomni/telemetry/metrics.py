"""The gateway's Prometheus metrics. Names follow Prometheus conventions (base units, `_total`
counters) and are checked with `promtool check metrics` in the tests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60)
RTF_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.time_to_first_audio = Histogram(
            "iomni_gateway_time_to_first_audio_seconds",
            "From end of the user's turn to the first audio chunk sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "iomni_gateway_time_to_first_token_seconds",
            "From end of the user's turn to the first text token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.turn_duration = Histogram(
            "iomni_gateway_turn_duration_seconds",
            "Whole turn, end of user turn to done",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.real_time_factor = Histogram(
            "iomni_gateway_speech_real_time_factor",
            "Time to produce the reply's speech divided by its duration (below 1 keeps up)",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.audio_underruns = Counter(
            "iomni_gateway_audio_underruns_total",
            "Audio chunks sent after the audio before them had finished playing",
            registry=r,
        )
        self.audio_seconds = Counter(
            "iomni_gateway_audio_seconds_total", "Speech audio sent", registry=r
        )
        self.active_streams = Gauge(
            "iomni_gateway_active_streams", "Open Converse/Chat streams", registry=r
        )
        self.active_turns = Gauge(
            "iomni_gateway_active_turns", "Turns running in this gateway", registry=r
        )
        self.turns = Counter(
            "iomni_gateway_turns_total", "Turns by outcome", ["outcome"], registry=r
        )
        self.cancel_latency = Histogram(
            "iomni_gateway_cancel_latency_seconds",
            "From a cancel (barge-in) received to the turn stopped; no audio follows",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
            registry=r,
        )
        self.stage_duration = Histogram(
            "iomni_gateway_stage_duration_seconds",
            "Time per stage of a turn",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_affinity = Counter(
            "iomni_gateway_kv_affinity_total",
            "LLM replica choices: hit = the replica holding the session's KV cache",
            ["result"],
            registry=r,
        )
        self.llm_prompt_tokens_reused = Counter(
            "iomni_gateway_llm_prompt_tokens_reused_total",
            "Prompt tokens the llm served from its KV cache",
            registry=r,
        )
