"""`speech_decoder`: one speech sequence per reply (correlation id = turn id).

Sequence state (a `SpeechSession`) lives in this instance, keyed by correlation id. It is freed
at END, when a request of the sequence is cancelled, and after `idle_timeout_s` without
requests (a client that vanished without END). `execute` only enqueues: one thread renders,
taking a batch of replies' next requests from a `SpeechQueue` (first audio first): their text
is decoded to speech tokens together, the flow of the first chunks it makes ready is rendered
in one pass, then each is rendered and answered, most urgent first.
Clients pipeline a reply's text (several requests queued); a discard answers those not yet
rendered.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iomni.errors import Cancelled, InvalidInput, Unavailable
from iomni.model.speech.speaker import SpeakerEncoder
from iomni.model.speech.stream import (
    SAMPLE_RATE,
    SpeechSession,
    SpeechSettings,
    decode_together,
    render_first_together,
)
from iomni.triton.backend import (
    input_array,
    load_part,
    model_parameters,
    pb,
    request_parameters,
    server_alive,
    stream_error_response,
)
from iomni.triton.speech_queue import SpeechQueue
from iomni.triton.tensors import AUDIO, END, HIDDEN, SPEAKER_WAV, START, TEXT_TOKEN_IDS

log = logging.getLogger(__name__)

# The audio-changing latency settings (docs/speech.md): a model parameter, else the variable
# the Helm chart sets (the same names the embedded engine reads through `Settings`).
SETTINGS = {
    "first_chunk_tokens": "IOMNI_SPEECH_FIRST_CHUNK_TOKENS",
    "flow_steps": "IOMNI_SPEECH_FLOW_STEPS",
}


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


@dataclass(frozen=True)
class _Decoded:
    """A request whose text its session has taken (`mark`: `SpeechSession.add_text`'s); given
    back to the queue this way when a batch hands over before rendering it."""

    request: Any
    session: SpeechSession
    mark: int

    def get_response_sender(self) -> Any:  # what the queue's other takers answer through
        return self.request.get_response_sender()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.loaded = load_part(args, "speech")
        self.model = self.loaded.model
        params = model_parameters(args)
        self.idle_timeout_s = float(params.get("idle_timeout_s") or 60)
        self.settings = speech_settings(params)
        # Requests decoded together (one per reply; two for a reply still without audio).
        self.batch_limit = batch_limit(params)
        self.sessions: dict[Any, tuple[SpeechSession, float]] = {}
        self.lock = threading.Lock()
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
        self._open_gauge = self._families[0].Metric(labels=labels)
        self._batch_replies = self._families[1].Metric(labels=labels, buckets=[1, 2, 4, 8, 16])
        self._first_chunk_batch = self._families[2].Metric(labels=labels, buckets=[2, 4, 8])
        self._gauge_value = -1
        self.queue = SpeechQueue()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, daemon=True)
        self._sweeper.start()
        self._renderer = threading.Thread(target=self._render_loop, daemon=True)
        self._renderer.start()

    def execute(self, requests: list[Any]) -> None:
        final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            discard = self._is_discard(request)
            urgent = discard or request.is_cancelled()
            for stale in self.queue.put(request.correlation_id(), request, urgent, discard):
                error = stream_error_response(Cancelled("the reply was discarded (barge-in)"))
                stale.get_response_sender().send(error, flags=final)
        return None

    def finalize(self) -> None:
        self._stop.set()
        final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in self.queue.drain():
            error = stream_error_response(Unavailable("the speech decoder is shutting down"))
            request.get_response_sender().send(error, flags=final)

    @staticmethod
    def _is_discard(request: Any) -> bool:
        """A barge-in: END with `discard`, to drop the reply unrendered."""
        end = bool(input_array(request, END).reshape(-1)[0])
        return end and bool(request_parameters(request).get("discard"))

    def _render_loop(self) -> None:
        while (batch := self.queue.take_batch(self.batch_limit)) is not None:
            try:
                self._serve_batch(batch)
            except Exception:  # answering failed (a vanished client): keep rendering the rest
                log.exception("speech decoder: answering a batch failed")

    @property
    def open_sequences(self) -> int:
        return len(self.sessions)

    def _serve_batch(self, batch: list[tuple[Any, Any]]) -> None:
        """Take each request's text (a reply without audio: up to its first chunk's; what
        is beyond goes back to the queue), decode all of it together (`decode_together`), render
        the flow of the first chunks it makes ready together (`render_first_together`), then
        render and answer each request, most urgent first. A reply that starts meanwhile
        does not wait for the whole batch: the requests not rendered yet go back to the
        queue, their text decoded (`_Decoded`), and the next batch starts with the new one."""
        texted: list[tuple[Any, _Decoded]] = []
        later: list[tuple[Any, Any]] = []
        for corr, request in batch:
            try:
                if isinstance(request, _Decoded):
                    if not self._answered_cancel(request.request, corr):
                        texted.append((corr, request))
                elif any(key == corr for key, _ in texted) and self._has_first_chunk_text(corr):
                    later.append((corr, request))
                elif (decoded := self._take_text(request, corr)) is not None:
                    texted.append((corr, decoded))
            except Exception as exc:
                self._fail(corr, request, exc)
        for corr, request in reversed(later):
            self.queue.requeue(corr, request)
        sessions = list({id(d.session): d.session for _, d in texted}.values())
        if sessions and server_alive():
            self._batch_replies.observe(len(sessions))
        try:
            with torch.inference_mode():
                decode_together(sessions)
                passes = render_first_together([(d.session, d.mark) for _, d in texted])
        except Exception as exc:
            for corr, decoded in texted:
                self._fail(corr, decoded, exc)
            return
        if server_alive():
            for replies in passes:
                self._first_chunk_batch.observe(replies)
        failed: set[Any] = set()  # a reply whose request failed: its later ones fail too
        for index, (corr, decoded) in enumerate(texted):
            if index and self.queue.first_audio_waiting():
                for deferred in reversed(texted[index:]):
                    self.queue.requeue(*deferred)
                return
            audio_s, ended = 0.0, True
            try:
                if corr in failed:
                    raise Unavailable(f"an earlier request of speech sequence {corr!r} failed")
                audio_s, ended = self._answer(decoded, corr)
            except Exception as exc:
                failed.add(corr)
                self._fail(corr, decoded, exc, done=False)
            finally:
                self.queue.done(corr, audio_s, ended)

    def _fail(self, corr: Any, request: Any, exc: BaseException, done: bool = True) -> None:
        self._free(corr)
        final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        request.get_response_sender().send(stream_error_response(exc), flags=final)
        if done:
            self.queue.done(corr, 0.0, True)

    def _answered_cancel(self, request: Any, corr: Any) -> bool:
        """A request its client cancelled frees the sequence and is answered CANCELLED."""
        if not request.is_cancelled():
            return False
        self._free(corr)
        error = stream_error_response(Cancelled("request cancelled"))
        request.get_response_sender().send(error, flags=pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.queue.done(corr, 0.0, True)
        return True

    def _has_first_chunk_text(self, corr: Any) -> bool:
        """Whether the reply has no audio yet and the text its first chunk needs is in. A
        reply without audio brings two requests, that text; when an earlier batch decoded
        the first, the first of these completes it, and the second would add a decode round
        and render the reply's second chunk before the other replies' first ones."""
        with self.lock:
            entry = self.sessions.get(corr)
        return entry is not None and entry[0].first_chunk_text_in()

    def _take_text(self, request: Any, corr: Any) -> _Decoded | None:
        """Queue the request's text on its session (decoded by the batch's pass); None when
        the request was answered here already (cancelled, or a discard)."""
        pb_utils = pb()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sender = request.get_response_sender()
        if self._answered_cancel(request, corr):
            return None
        start = bool(input_array(request, START).reshape(-1)[0])
        if self._is_discard(request):
            # Barge-in: drop the sequence without rendering what is left.
            self._free(corr)
            empty = pb_utils.Tensor(AUDIO, np.zeros((1, 0), np.float32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[empty]), flags=final)
            self.queue.done(corr, 0.0, True)
            return None
        session = self._open(request, corr) if start else self._session(corr)
        ids = input_array(request, TEXT_TOKEN_IDS).reshape(-1).tolist()
        hidden = input_array(request, HIDDEN)
        hidden = hidden.reshape(-1, hidden.shape[-1]) if hidden.size else hidden.reshape(0, 0)
        if len(ids) != hidden.shape[0]:
            raise InvalidInput(
                f"{TEXT_TOKEN_IDS} has {len(ids)} tokens but {HIDDEN} has {hidden.shape[0]} rows"
            )
        with torch.inference_mode():
            return _Decoded(request, session, session.add_text(ids, torch.from_numpy(hidden)))

    def _answer(self, decoded: _Decoded, corr: Any) -> tuple[float, bool]:
        """Render what the request's text made ready, sending each chunk as soon as it is
        rendered, then an empty final response; returns (seconds of audio sent, whether the
        sequence ended)."""
        request, session = decoded.request, decoded.session
        pb_utils = pb()
        end = bool(input_array(request, END).reshape(-1)[0])
        sender = request.get_response_sender()
        samples = 0
        with torch.inference_mode():
            chunks = session.iter_ready(decoded.mark)
            for chunk in itertools.chain(chunks, session.iter_finish() if end else ()):
                tensor = pb_utils.Tensor(AUDIO, chunk.astype(np.float32).reshape(1, -1))
                sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]))
                samples += chunk.size
        if end:
            self._free(corr)
        else:
            self._touch(corr, session)
        empty = pb_utils.Tensor(AUDIO, np.zeros((1, 0), np.float32))
        sender.send(
            pb_utils.InferenceResponse(output_tensors=[empty]),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )
        return samples / SAMPLE_RATE, end

    def _open(self, request: Any, corr: Any) -> SpeechSession:
        wav = input_array(request, SPEAKER_WAV, optional=True)
        speaker = None
        if wav is not None and wav.size and wav.reshape(-1)[0]:
            speaker = self._speaker_encoder().embed(bytes(wav.reshape(-1)[0]))
        seed = int(request_parameters(request).get("seed", 0))
        session = SpeechSession.of_model(self.model, speaker, seed, self.settings)
        self._touch(corr, session)
        return session

    def _session(self, corr: Any) -> SpeechSession:
        with self.lock:
            entry = self.sessions.get(corr)
        if entry is None:
            raise InvalidInput(
                f"speech sequence {corr!r} is not open (no START, or it ended or timed out)"
            )
        return entry[0]

    def _touch(self, corr: Any, session: SpeechSession) -> None:
        with self.lock:
            self.sessions[corr] = (session, time.monotonic())
            self._update_gauge()

    def _free(self, corr: Any) -> None:
        with self.lock:
            self.sessions.pop(corr, None)
            self._update_gauge()

    def _update_gauge(self) -> None:
        """Under `self.lock`. Only on change, and not once the server is gone (see
        `server_alive`): the sweeper would otherwise call into a dead server every 5 s."""
        if len(self.sessions) != self._gauge_value and server_alive():
            self._gauge_value = len(self.sessions)
            self._open_gauge.set(self._gauge_value)

    def _speaker_encoder(self) -> SpeakerEncoder:
        if self._speaker is None:
            self._speaker = SpeakerEncoder.from_checkpoint(self.loaded.path)
        return self._speaker

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(5.0, self.idle_timeout_s)):
            deadline = time.monotonic() - self.idle_timeout_s
            with self.lock:
                stale = [c for c, (_, seen) in self.sessions.items() if seen < deadline]
                for corr in stale:
                    del self.sessions[corr]
                self._update_gauge()
            for corr in stale:
                self.queue.forget(corr)
                log.warning("speech sequence %r idle for %.0f s: freed", corr, self.idle_timeout_s)
