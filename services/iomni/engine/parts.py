"""The in-process transport: the model parts called directly, no servers.

`InProcessParts` calls the PyTorch modules directly; a Triton transport implements the same
protocol over the network. Nothing above this interface knows which one it talks to. The LLM
runs in the same continuous batcher as the `llm` Triton model (its own thread: concurrent
turns share decode steps, a session's KV cache is reused on its next turn, and decoding goes
on while the speech decoder renders). On CPU the speech decoder renders in child processes
(`speech_worker`): in one process the two threads' Python took turns on the interpreter lock.
Wherever it renders, a `SpeechScheduler` decides what (iomni.model.speech.scheduler).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import torch

from iomni.engine.speech_worker import (
    UNANSWERED,
    CallAnswer,
    MetricListener,
    PendingCall,
    SpeechWorker,
    WorkerSpec,
    WorkerSpeech,
)
from iomni.errors import InvalidInput
from iomni.model.batcher import ContinuousBatcher, SequenceRequest, StepEvent
from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.speech.scheduler import SchedulerHooks, SpeechRequest, SpeechScheduler
from iomni.model.speech.speaker import SpeakerEncoder
from iomni.model.speech.stream import SpeechSession, SpeechSettings
from iomni.parts import (
    ChunkCallback,
    GenerationRequest,
    LLMStep,
    ModelParts,
    SpeechOptions,
    SpeechStream,
)


class InProcessParts:
    """PyTorch modules called directly. A lock serialises the encoders' forwards; the LLM has
    its batcher's thread, and speech its scheduler's (here, or in the workers)."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        max_batch: int = 16,
        kv_cache_tokens: int = 65536,
        speech: SpeechSettings | None = None,
        speech_process: bool | None = None,
        speech_workers: int | None = None,
        on_speech_metric: MetricListener | None = None,
    ) -> None:
        """`speech_process`: render speech in child processes (`SpeechWorker`); None: on CPU
        (on an accelerator the thread's Python waits less, and the child would hold a second
        copy of the speech parts on the device). `speech_workers`: how many (None: 2, or 1 on
        one core), each on its share of this process's half of the cores, as the Triton CPU
        profile runs two speech-decoder instances; a reply stays on the one that opened it.
        `on_speech_metric(event, value, instance)`: what the speech schedulers report."""
        # The batcher's thread and the speech decoder work side by side; with all cores each,
        # their intra-op threads oversubscribe the machine (2 cores: TTFA 1080 ms at 2 threads
        # each, 955 ms at 1). Torch's thread count is per process: half the cores each.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.model_id = checkpoint.fingerprint
        self.speech_settings = speech or SpeechSettings()
        self._lock = threading.Lock()  # one encoder forward at a time
        self._scheduler_lock = threading.Lock()
        self._speaker: SpeakerEncoder | None = None
        self._batcher_options = {"max_batch": max_batch, "kv_cache_tokens": kv_cache_tokens}
        self._batcher: ContinuousBatcher | None = None
        self._scheduler: SpeechScheduler | None = None
        self._on_speech_metric = on_speech_metric
        flow = getattr(checkpoint.model, "flow", None)  # absent when loaded without speech
        if speech_process is None:
            speech_process = flow is not None and next(flow.parameters()).device.type == "cpu"
        cores = len(os.sched_getaffinity(0))
        self.speech_workers = min(2, cores) if speech_workers is None else speech_workers
        if self.speech_workers < 1:
            raise InvalidInput(f"speech_workers must be at least 1, not {self.speech_workers}")
        threads = max(1, torch.get_num_threads() // self.speech_workers)
        self._worker_spec = (
            WorkerSpec.of(checkpoint, self.speech_settings, threads)
            if speech_process and flow is not None
            else None
        )

    def prepare_speech(self) -> threading.Thread | None:
        """Start the speech decoder's processes in the background (new interpreters importing
        torch: seconds), so that the first spoken turn's audio does not wait for all of it.
        Returns the starting thread (join it to wait), None where speech renders in process."""
        if self._worker_spec is None:
            return None
        return SpeechWorker.start(self._worker_spec, self.speech_workers)

    def _llm(self) -> ContinuousBatcher:
        if self._batcher is None:
            batcher = ContinuousBatcher(self.model.language_model, **self._batcher_options)
            batcher.start()
            self._batcher = batcher
        return self._batcher

    async def close(self) -> None:
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.stop)
            self._batcher = None
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None

    def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        with self._lock, torch.inference_mode():
            return fn(*args)

    async def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return await asyncio.to_thread(self._run, self.model.encode_images, pixel_values)

    async def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        return await asyncio.to_thread(self._run, self.model.encode_audio, windows)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StepEvent] = asyncio.Queue()
        closed = threading.Event()

        def emit(event: StepEvent) -> None:  # on the batcher's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        self._llm().submit(
            SequenceRequest(
                input_ids=list(request.input_ids),
                media=request.media,
                params=request.params,
                stop_ids=request.stop_ids,
                emit=emit,
                is_cancelled=closed.is_set,
                session_id=request.session_id,
                return_hidden=request.return_hidden,
            )
        )
        try:
            while True:
                event = await events.get()
                if event.error is not None:
                    raise event.error
                if event.token_id < 0:  # cancelled before a token
                    return
                timings = {"prefill": event.prefill_ms} if event.prefill_ms else {}
                yield LLMStep(event.token_id, event.hidden, timings, event.reused_tokens)
                if event.finish_reason:
                    return
        finally:
            closed.set()  # the batcher drops the sequence before its next step

    async def open_speech(self, options: SpeechOptions) -> SpeechStream:
        speaker = None
        if options.speaker_wav is not None:
            encoder = await asyncio.to_thread(self._speaker_encoder)
            speaker = await asyncio.to_thread(encoder.embed, options.speaker_wav)
        if self._worker_spec is not None:
            spec, replicas = self._worker_spec, self.speech_workers
            return WorkerSpeech(spec, speaker, options.seed, replicas, self._on_speech_metric)
        return InProcessSpeech(
            self.speech_scheduler(),
            functools.partial(
                SpeechSession.of_model, self.model, speaker, options.seed, self.speech_settings
            ),
        )

    def speech_scheduler(self) -> SpeechScheduler:
        """Where speech renders when it renders in this process (started on first use)."""
        with self._scheduler_lock:
            if self._scheduler is None:
                hooks = None
                if (report := self._on_speech_metric) is not None:
                    hooks = SchedulerHooks.reporting(lambda event, n: report(event, n, "thread"))
                self._scheduler = SpeechScheduler(hooks=hooks)
                self._scheduler.start()
            return self._scheduler

    def _speaker_encoder(self) -> SpeakerEncoder:
        if self._speaker is None:
            self._speaker = SpeakerEncoder.from_checkpoint(self.checkpoint.path)
        return self._speaker


class InProcessSpeech:
    """One reply rendered on this process's `SpeechScheduler` thread (the workers' and the
    Triton speech decoder's scheduling: first audio first, concurrent replies decoded
    together). Calls may overlap (the engine pipelines a reply's text): each is queued when
    it is made, so they render in the order made."""

    _keys = itertools.count(1)

    def __init__(self, scheduler: SpeechScheduler, open_session: Callable[[], SpeechSession]):
        self.scheduler = scheduler
        self.key = f"reply-{next(self._keys)}"
        self._open: Callable[[], SpeechSession] | None = open_session  # at the first call
        self._closed = False

    async def push_text(
        self,
        token_ids: Sequence[int],
        hidden: torch.Tensor,
        on_chunk: ChunkCallback | None = None,
    ) -> list[np.ndarray]:
        return await self._call(token_ids, hidden, on_chunk, end=False)

    async def finish(self, on_chunk: ChunkCallback | None = None) -> list[np.ndarray]:
        return await self._call((), None, on_chunk, end=True)

    async def _call(
        self,
        token_ids: Sequence[int],
        hidden: torch.Tensor | None,
        on_chunk: ChunkCallback | None,
        end: bool,
    ) -> list[np.ndarray]:
        if self._closed:
            return []
        loop = asyncio.get_running_loop()
        call = PendingCall(loop, loop.create_future(), on_chunk)
        opener, self._open = self._open, None
        start = opener is not None
        answer = CallAnswer.on_loop(call)
        request = SpeechRequest(answer, token_ids, hidden, start=start, end=end, open=opener)
        self.scheduler.put(self.key, request)
        return await call.future

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.discard(self.key, UNANSWERED)


__all__ = [
    "GenerationRequest",
    "InProcessParts",
    "InProcessSpeech",
    "LLMStep",
    "ModelParts",
    "SpeechOptions",
    "SpeechStream",
]
