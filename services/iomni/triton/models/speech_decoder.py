"""`speech_decoder`: one speech sequence per reply (correlation id = turn id).

Sequence state (a `SpeechSession`) lives in this instance, keyed by correlation id. `execute`
only reads each request and hands it to a `SpeechScheduler` (shared with the embedded engine's
speech worker), whose thread renders: first audio first, replies' text decoded together
(iomni.model.speech.scheduler). Clients pipeline a reply's text (several requests queued); a
discard (END with the `discard` parameter) answers those not yet rendered and stops the
reply's render in progress before its next chunk.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from iomni.errors import Internal, InvalidInput, IomniError
from iomni.model.speech.scheduler import SchedulerHooks, SpeechRequest, SpeechScheduler
from iomni.model.speech.speaker import SpeakerEncoder
from iomni.model.speech.stream import SpeechSession, SpeechSettings
from iomni.triton.backend import (
    input_array,
    load_part,
    model_parameters,
    pb,
    request_parameters,
    server_alive,
    stream_error_response,
)
from iomni.triton.tensors import AUDIO, END, HIDDEN, SPEAKER_WAV, START, TEXT_TOKEN_IDS

# The audio-changing latency settings (docs/speech.md): a model parameter, else the variable
# the Helm chart sets (the same names the embedded engine reads through `Settings`).
SETTINGS = {
    "first_chunk_tokens": "IOMNI_SPEECH_FIRST_CHUNK_TOKENS",
    "flow_steps": "IOMNI_SPEECH_FLOW_STEPS",
}
# Seeds torch.Generator.manual_seed takes as `seed` and as `seed + 1` (the vocoder's).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 2


def speech_settings(params: dict[str, str]) -> SpeechSettings:
    values = {}
    for key, env in SETTINGS.items():
        raw = params.get(key) or os.environ.get(env) or "0"
        try:
            values[key] = int(raw)
        except ValueError:
            raise InvalidInput(
                f"speech decoder {key} ({env}) must be an integer, not {raw!r}"
            ) from None
    return SpeechSettings(**values)


def batch_limit(params: dict[str, str]) -> int:
    """Requests one pass decodes together (model parameter `batch_limit`, default 8)."""
    raw = params.get("batch_limit") or "8"
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInput(f"speech decoder batch_limit must be a whole number >= 1, not {raw!r}")
    return int(raw)


def request_seed(params: dict[str, Any]) -> int:
    """A reply's sampling seed (request parameter `seed`, default 0), read with its request
    so that a bad one is the client's INVALID_ARG rather than INTERNAL when its session opens."""
    raw = params.get("seed", 0)
    try:
        seed = int(raw)
    except (TypeError, ValueError):
        seed = None
    if seed is None or not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidInput(
            f"speech decoder parameter seed must be an integer from {SEED_MIN} to {SEED_MAX}, "
            f"not {raw!r}"
        )
    return seed


def _while_alive(record: Callable[[int], Any]) -> Callable[[int], None]:
    """A metric hook that records nothing once the server is gone (see `server_alive`): the
    idle sweep, every 5 s, would otherwise call into a dead server."""

    def hook(value: int) -> None:
        if server_alive():
            record(value)

    return hook


class TritonAnswer:
    """A request's answers as Triton responses: each chunk, then an empty final response."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.sender = request.get_response_sender()

    def chunk(self, samples: np.ndarray) -> None:
        tensor = pb().Tensor(AUDIO, samples.astype(np.float32).reshape(1, -1))
        self.sender.send(pb().InferenceResponse(output_tensors=[tensor]))

    def complete(self) -> None:
        pb_utils = pb()
        empty = pb_utils.Tensor(AUDIO, np.zeros((1, 0), np.float32))
        self.sender.send(
            pb_utils.InferenceResponse(output_tensors=[empty]),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )

    def fail(self, error: BaseException) -> None:
        final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        self.sender.send(stream_error_response(error), flags=final)

    def cancelled(self) -> bool:
        return bool(self.request.is_cancelled())


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.loaded = load_part(args, "speech")
        self.model = self.loaded.model
        params = model_parameters(args)
        self.settings = speech_settings(params)
        self._speaker: SpeakerEncoder | None = None
        family = pb().MetricFamily
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        # Families must stay referenced or their metrics stop working.
        self._families = [
            family(
                "iomni_speech_open_sequences",
                "Speech sequences holding state in this instance",
                family.GAUGE,
            ),
            family(
                "iomni_speech_decode_batch_replies",
                "Replies whose text one speech-token decode pass took together",
                family.HISTOGRAM,
            ),
            family(
                "iomni_speech_first_chunk_batch_replies",
                "Replies whose first chunks one flow pass rendered together",
                family.HISTOGRAM,
            ),
        ]
        open_gauge = self._families[0].Metric(labels=labels)
        batch_replies = self._families[1].Metric(labels=labels, buckets=[1, 2, 4, 8, 16])
        first_chunk_batch = self._families[2].Metric(labels=labels, buckets=[2, 4, 8])
        hooks = SchedulerHooks(
            decode_batch=_while_alive(batch_replies.observe),
            first_chunk_batch=_while_alive(first_chunk_batch.observe),
            open_sequences=_while_alive(open_gauge.set),
        )
        self.scheduler = SpeechScheduler(
            batch_limit(params), float(params.get("idle_timeout_s") or 60), hooks
        )
        self.scheduler.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            corr = request.correlation_id()
            if self._is_discard(request):
                self.scheduler.discard(corr, TritonAnswer(request))
            else:
                self.scheduler.put(corr, self._speech_request(request))
        return None

    def finalize(self) -> None:
        self.scheduler.stop()

    @staticmethod
    def _is_discard(request: Any) -> bool:
        """A barge-in: END with `discard`, to drop the reply unrendered."""
        try:
            end = bool(input_array(request, END).reshape(-1)[0])
        except InvalidInput:
            return False  # failed in its turn, as a request missing END
        return end and bool(request_parameters(request).get("discard"))

    def _speech_request(self, request: Any) -> SpeechRequest:
        answer = TritonAnswer(request)
        try:
            ids = input_array(request, TEXT_TOKEN_IDS).reshape(-1).tolist()
            hidden = input_array(request, HIDDEN)
            hidden = hidden.reshape(-1, hidden.shape[-1]) if hidden.size else hidden.reshape(0, 0)
            start = bool(input_array(request, START).reshape(-1)[0])
            end = bool(input_array(request, END).reshape(-1)[0])
            seed = request_seed(request_parameters(request)) if start else 0
            speaker = self._voice(request) if start else None
        except IomniError as exc:
            return SpeechRequest(answer, invalid=exc)
        if len(ids) != hidden.shape[0]:
            invalid = InvalidInput(
                f"{TEXT_TOKEN_IDS} has {len(ids)} tokens but {HIDDEN} has {hidden.shape[0]} rows"
            )
            return SpeechRequest(answer, invalid=invalid)
        return SpeechRequest(
            answer,
            token_ids=ids,
            hidden=torch.from_numpy(hidden),
            start=start,
            end=end,
            open=(
                functools.partial(SpeechSession.of_model, self.model, speaker, seed, self.settings)
                if start
                else None
            ),
        )

    def _voice(self, request: Any) -> torch.Tensor | None:
        """The voice of the reply's SPEAKER_WAV (None: the default voice), embedded as its
        request arrives: on the render thread it held every other reply's audio meanwhile."""
        wav = input_array(request, SPEAKER_WAV, optional=True)
        if wav is None or not wav.size or not wav.reshape(-1)[0]:
            return None
        try:
            return self._speaker_encoder().embed(bytes(wav.reshape(-1)[0]))
        except IomniError:
            raise
        except Exception as exc:
            raise Internal(f"embedding {SPEAKER_WAV} failed: {type(exc).__name__}: {exc}") from exc

    def _speaker_encoder(self) -> SpeakerEncoder:
        if self._speaker is None:
            self._speaker = SpeakerEncoder.from_checkpoint(self.loaded.path)
        return self._speaker
