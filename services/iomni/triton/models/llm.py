"""`llm`: decoupled token streaming with continuous batching and session KV reuse."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from iomni.errors import InvalidInput
from iomni.model.sampling import SamplingParams
from iomni.model.tokenizer import IncrementalDecoder, Tokenizer
from iomni.triton.backend import (
    drain_deadline,
    error_response,
    input_array,
    load_part,
    model_parameters,
    pb,
    request_parameters,
)
from iomni.triton.llm_batcher import BatcherMetrics, ContinuousBatcher, SequenceRequest, StepEvent
from iomni.triton.tensors import (
    AUDIO_EMBEDS,
    BATCH_SIZE,
    FINISH_REASON,
    HIDDEN,
    IMAGE_EMBEDS,
    INPUT_IDS,
    REUSED_TOKENS,
    TEXT,
    TOKEN_ID,
)

log = logging.getLogger(__name__)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")


class TritonMetrics(BatcherMetrics):
    """The batcher's counters, also exported on Triton's metrics endpoint."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        pb_utils = pb()
        labels = {"model": model_name}
        family = pb_utils.MetricFamily
        # Families must stay referenced or their metrics stop working.
        self._families = [
            family(
                "iomni_llm_step_sequences", "Sequences sharing one decode step", family.HISTOGRAM
            ),
            family("iomni_llm_generated_tokens_total", "Tokens generated", family.COUNTER),
            family("iomni_llm_cancelled_total", "Requests cancelled by clients", family.COUNTER),
            family(
                "iomni_llm_kv_cache_hits_total",
                "Turns that reused their session's KV cache",
                family.COUNTER,
            ),
            family(
                "iomni_llm_kv_cache_misses_total", "Turns with no reusable KV cache", family.COUNTER
            ),
            family(
                "iomni_llm_kv_cache_reused_tokens_total",
                "Prompt tokens served from cache",
                family.COUNTER,
            ),
            family(
                "iomni_llm_time_to_first_token_ms",
                "Admission to first token (prefill)",
                family.HISTOGRAM,
            ),
        ]
        steps, tokens, cancelled, hits, misses, reused, ttft = self._families
        self._steps = steps.Metric(labels=labels, buckets=[1, 2, 4, 8, 16, 32])
        self._tokens = tokens.Metric(labels=labels)
        self._cancelled = cancelled.Metric(labels=labels)
        self._hits = hits.Metric(labels=labels)
        self._misses = misses.Metric(labels=labels)
        self._reused = reused.Metric(labels=labels)
        self._ttft = ttft.Metric(
            labels=labels, buckets=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
        )

    def on_step(self, batch: int) -> None:
        super().on_step(batch)
        self._steps.observe(batch)

    def on_token(self) -> None:
        super().on_token()
        self._tokens.increment(1)

    def on_cancel(self) -> None:
        super().on_cancel()
        self._cancelled.increment(1)

    def on_kv(self, reused: int) -> None:
        super().on_kv(reused)
        (self._hits if reused else self._misses).increment(1)
        if reused:
            self._reused.increment(reused)

    def on_first_token(self, ms: float) -> None:
        self._ttft.observe(ms)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        loaded = load_part(args, "llm")
        params = model_parameters(args)
        self.tokenizer = Tokenizer.from_dir(loaded.path)
        self.special = self.tokenizer.special
        self.metrics = TritonMetrics(args["model_name"])
        self.batcher = ContinuousBatcher(
            loaded.model.language_model,
            max_batch=int(params.get("max_batch") or 16),
            kv_cache_tokens=int(params.get("kv_cache_tokens") or 65536),
            metrics=self.metrics,
            drain_deadline=drain_deadline,
        )
        self.hidden_size = loaded.config.llm_hidden_size
        self.device = next(loaded.model.parameters()).device
        self.batcher.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.batcher.submit(self._sequence(request, sender))
            except Exception as exc:
                sender.send(error_response(exc), flags=pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self) -> None:
        self.batcher.stop()

    def _sequence(self, request: Any, sender: Any) -> SequenceRequest:
        params = request_parameters(request)
        ids = input_array(request, INPUT_IDS).reshape(-1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.batcher.lm.config.vocab_size:
            raise InvalidInput(f"{INPUT_IDS} must be non-empty token ids below the vocabulary")
        media = {}
        for name, token in (
            (IMAGE_EMBEDS, self.special.img_context),
            (AUDIO_EMBEDS, self.special.audio_context),
        ):
            rows = self._media(request, name, int((ids == token).sum()))
            if rows is not None:
                media[token] = rows
        sampling = SamplingParams(**{k: params[k] for k in SAMPLING_KEYS if k in params})
        return SequenceRequest(
            input_ids=ids.tolist(),
            media=media,
            params=sampling.validate(),
            stop_ids=self.special.stop_ids,
            emit=_Emitter(self.tokenizer, sender),
            is_cancelled=request.is_cancelled,
            session_id=str(params.get("session_id", "")),
            return_hidden=bool(params.get("return_hidden", True)),
        )

    def _media(self, request: Any, name: str, placeholders: int) -> torch.Tensor | None:
        rows = input_array(request, name, optional=True)
        count = 0 if rows is None else rows.shape[0]
        if count != placeholders:
            raise InvalidInput(
                f"the prompt has {placeholders} placeholders for {name} but "
                f"{count} embedding rows were sent"
            )
        if rows is None or count == 0:
            return None
        if rows.ndim != 2 or rows.shape[1] != self.hidden_size:
            raise InvalidInput(f"{name} must be (rows, {self.hidden_size}), got {rows.shape}")
        return torch.from_numpy(rows).to(self.device)


class _Emitter:
    """Turns batcher events into Triton responses for one request (runs on the loop thread)."""

    def __init__(self, tokenizer: Tokenizer, sender: Any) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.sender = sender
        self.lock = threading.Lock()

    def __call__(self, event: StepEvent) -> None:
        pb_utils = pb()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if event.error:
            self.sender.send(
                pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(event.error, pb_utils.TritonError.INTERNAL)
                ),
                flags=final,
            )
            return
        if event.finish_reason == "cancelled" and event.token_id < 0:
            self.sender.send(
                pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
                ),
                flags=final,
            )
            return
        text = self.decoder.push(event.token_id)
        if event.finish_reason:
            text += self.decoder.flush()
        hidden = event.hidden.cpu().numpy() if event.hidden is not None else np.zeros(0, np.float32)
        outputs = [
            pb_utils.Tensor(TOKEN_ID, np.array([event.token_id], dtype=np.int64)),
            pb_utils.Tensor(TEXT, np.array([text.encode()], dtype=np.object_)),
            pb_utils.Tensor(HIDDEN, hidden.astype(np.float32)),
            pb_utils.Tensor(BATCH_SIZE, np.array([event.batch_size], dtype=np.int32)),
            pb_utils.Tensor(REUSED_TOKENS, np.array([event.reused_tokens], dtype=np.int32)),
            pb_utils.Tensor(
                FINISH_REASON, np.array([(event.finish_reason or "").encode()], dtype=np.object_)
            ),
        ]
        self.sender.send(
            pb_utils.InferenceResponse(output_tensors=outputs),
            flags=final if event.finish_reason else 0,
        )
