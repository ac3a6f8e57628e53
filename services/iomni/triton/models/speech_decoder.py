"""`speech_decoder`: one speech sequence per reply (correlation id = turn id).

Sequence state (a `SpeechSession`) lives in this instance, keyed by correlation id. It is freed
at END, when a request of the sequence is cancelled, and after `idle_timeout_s` without
requests (a client that vanished without END). `execute` only enqueues: one thread renders,
taking the most urgent reply's next request from a `SpeechQueue` (first audio first). Clients
pipeline a reply's text (several requests queued); a discard answers those not yet rendered.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np
import torch

from iomni.errors import Cancelled, InvalidInput, Unavailable
from iomni.model.speech.speaker import SpeakerEncoder
from iomni.model.speech.stream import SAMPLE_RATE, SpeechSession, SpeechSettings
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


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.loaded = load_part(args, "speech")
        self.model = self.loaded.model
        params = model_parameters(args)
        self.idle_timeout_s = float(params.get("idle_timeout_s") or 60)
        self.settings = speech_settings(params)
        self.sessions: dict[Any, tuple[SpeechSession, float]] = {}
        self.lock = threading.Lock()
        self._speaker: SpeakerEncoder | None = None
        family = pb().MetricFamily
        self._family = family(
            "iomni_speech_open_sequences",
            "Speech sequences holding state in this instance",
            family.GAUGE,
        )
        self._open_gauge = self._family.Metric(
            labels={"model": args["model_name"], "instance": args["model_instance_name"]}
        )
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
        final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        while (taken := self.queue.take()) is not None:
            corr, request = taken
            sender = request.get_response_sender()
            audio_s, ended = 0.0, True
            try:
                audio_s, ended = self._serve(request, sender, corr)
            except Exception as exc:
                self._free(corr)
                sender.send(stream_error_response(exc), flags=final)
            finally:
                self.queue.done(corr, audio_s, ended)

    @property
    def open_sequences(self) -> int:
        return len(self.sessions)

    def _serve(self, request: Any, sender: Any, corr: Any) -> tuple[float, bool]:
        """Answer one request; returns (seconds of audio sent, whether the sequence ended)."""
        pb_utils = pb()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if request.is_cancelled():
            self._free(corr)
            sender.send(stream_error_response(Cancelled("request cancelled")), flags=final)
            return 0.0, True
        start = bool(input_array(request, START).reshape(-1)[0])
        end = bool(input_array(request, END).reshape(-1)[0])
        if end and request_parameters(request).get("discard"):
            # Barge-in: drop the sequence without rendering what is left.
            self._free(corr)
            empty = pb_utils.Tensor(AUDIO, np.zeros((1, 0), np.float32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[empty]), flags=final)
            return 0.0, True
        session = self._open(request, corr) if start else self._session(corr)
        ids = input_array(request, TEXT_TOKEN_IDS).reshape(-1).tolist()
        hidden = input_array(request, HIDDEN)
        hidden = hidden.reshape(-1, hidden.shape[-1]) if hidden.size else hidden.reshape(0, 0)
        if len(ids) != hidden.shape[0]:
            raise InvalidInput(
                f"{TEXT_TOKEN_IDS} has {len(ids)} tokens but {HIDDEN} has {hidden.shape[0]} rows"
            )
        with torch.inference_mode():
            chunks = session.push_text(ids, torch.from_numpy(hidden)) if ids else []
            if end:
                chunks += session.finish()
                self._free(corr)
            else:
                self._touch(corr, session)
        if not chunks:
            chunks = [np.zeros(0, np.float32)]
        for index, chunk in enumerate(chunks):
            tensor = pb_utils.Tensor(AUDIO, chunk.astype(np.float32).reshape(1, -1))
            sender.send(
                pb_utils.InferenceResponse(output_tensors=[tensor]),
                flags=final if index == len(chunks) - 1 else 0,
            )
        return sum(c.size for c in chunks) / SAMPLE_RATE, end

    def _open(self, request: Any, corr: Any) -> SpeechSession:
        wav = input_array(request, SPEAKER_WAV, optional=True)
        if wav is not None and wav.size and wav.reshape(-1)[0]:
            speaker = self._speaker_encoder().embed(bytes(wav.reshape(-1)[0]))
        else:
            speaker = self.model.default_speaker_embedding.detach()
        seed = int(request_parameters(request).get("seed", 0))
        m = self.model
        session = SpeechSession(
            m.voicelm, m.flow, m.hifigan, speaker, seed=seed, settings=self.settings
        )
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
