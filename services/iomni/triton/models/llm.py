"""`llm`: decoupled token streaming with continuous batching and session KV reuse."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from iomni.errors import Cancelled, InvalidInput
from iomni.model.batcher import BatcherMetrics, ContinuousBatcher, SequenceRequest, StepEvent
from iomni.model.sampling import SamplingParams
from iomni.model.tokenizer import Tokenizer
from iomni.triton.backend import (
    Responder,
    drain_deadline,
    input_array,
    load_part,
    model_parameters,
    pb,
    request_parameters,
    server_alive,
    stream_error_response,
)
from iomni.triton.tensors import (
    AUDIO_EMBEDS,
    FINISH_REASON,
    HIDDEN,
    IMAGE_EMBEDS,
    INPUT_IDS,
    PREFILL_MS,
    REUSED_TOKENS,
    TOKEN_ID,
)

log = logging.getLogger(__name__)
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")


class TritonMetrics(BatcherMetrics):
    """The batcher's counters, also exported on Triton's metrics endpoint. Called from the
    batcher's thread, so never once the server is gone (see `server_alive`)."""

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
        if server_alive():
            self._steps.observe(batch)

    def on_tokens(self, count: int) -> None:
        super().on_tokens(count)
        if server_alive():
            self._tokens.increment(count)

    def on_cancel(self) -> None:
        super().on_cancel()
        if server_alive():
            self._cancelled.increment(1)

    def on_kv(self, reused: int) -> None:
        super().on_kv(reused)
        if not server_alive():
            return
        (self._hits if reused else self._misses).increment(1)
        if reused:
            self._reused.increment(reused)

    def on_first_token(self, ms: float) -> None:
        if server_alive():
            self._ttft.observe(ms)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        loaded = load_part(args, "llm")
        params = model_parameters(args)
        self.special = Tokenizer.from_dir(loaded.path).special
        self.metrics = TritonMetrics(args["model_name"])
        self.batcher = ContinuousBatcher(
            loaded.model.language_model,
            max_batch=int(params.get("max_batch") or 16),
            kv_cache_tokens=int(params.get("kv_cache_tokens") or 65536),
            prefill_chunk=int(params.get("prefill_chunk") or 0) or None,
            metrics=self.metrics,
            drain_deadline=drain_deadline,
        )
        self.hidden_size = loaded.config.llm_hidden_size
        self.device = next(loaded.model.parameters()).device
        self.responder = Responder("llm-responses")
        self.batcher.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.batcher.submit(self._sequence(request, _Emitter(sender, self.responder)))
            except Exception as exc:
                final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
                sender.send(stream_error_response(exc), flags=final)
        return None

    def finalize(self) -> None:
        self.batcher.stop()
        self.responder.close()

    def _sequence(self, request: Any, emit: _Emitter) -> SequenceRequest:
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
            stop_ids=self._stop_ids(params),
            emit=emit,
            is_cancelled=request.is_cancelled,
            session_id=str(params.get("session_id", "")),
            return_hidden=bool(params.get("return_hidden", True)),
        )

    def _stop_ids(self, params: dict[str, Any]) -> tuple[int, ...]:
        """The request's stop tokens ("1,2": Triton parameters carry no lists; "": none), or
        the tokenizer's own when the request does not say."""
        if "stop_ids" not in params:
            return tuple(self.special.stop_ids)
        text = str(params["stop_ids"])
        if not text:
            return ()
        try:
            ids = tuple(int(token) for token in text.split(","))
        except ValueError:
            raise InvalidInput(
                f"stop_ids must be comma-separated token ids, got {text!r}"
            ) from None
        if min(ids) < 0 or max(ids) >= self.batcher.lm.config.vocab_size:
            raise InvalidInput(f"stop_ids must be token ids below the vocabulary, got {text!r}")
        return ids

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
    """Turns batcher events into Triton responses for one request. Called on the loop thread,
    it only hands the event to the model's `Responder`, which builds and sends the response.

    Per token it sends what the client reads every step (TOKEN_ID, HIDDEN); the first response
    adds PREFILL_MS and REUSED_TOKENS, the last FINISH_REASON. Text is the client's business.
    """

    def __init__(self, sender: Any, responder: Responder) -> None:
        self.sender = sender
        self.responder = responder

    def __call__(self, event: StepEvent) -> None:
        self.responder.submit(lambda: self._send(event))

    def _send(self, event: StepEvent) -> None:
        pb_utils = pb()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if event.error is not None:
            self.sender.send(stream_error_response(event.error), flags=final)
            return
        if event.finish_reason == "cancelled" and event.token_id < 0:
            self.sender.send(stream_error_response(Cancelled("request cancelled")), flags=final)
            return
        hidden = event.hidden.cpu().numpy() if event.hidden is not None else np.zeros(0, np.float32)
        outputs = [
            pb_utils.Tensor(TOKEN_ID, np.array([event.token_id], dtype=np.int64)),
            pb_utils.Tensor(HIDDEN, hidden.astype(np.float32)),
        ]
        if event.prefill_ms:
            outputs += [
                pb_utils.Tensor(PREFILL_MS, np.array([event.prefill_ms], dtype=np.float32)),
                pb_utils.Tensor(REUSED_TOKENS, np.array([event.reused_tokens], dtype=np.int32)),
            ]
        if event.finish_reason:
            reason = np.array([event.finish_reason.encode()], dtype=np.object_)
            outputs.append(pb_utils.Tensor(FINISH_REASON, reason))
        self.sender.send(
            pb_utils.InferenceResponse(output_tensors=outputs),
            flags=final if event.finish_reason else 0,
        )
