"""The embedded engine's speech decoder, in a child process of its own.

In one process the LLM's batcher thread and the speech decoder's thread both run Python
between their torch ops, and each waits for the other's interpreter lock: on `small`, 2 cores,
a spoken turn's first audio came 266-306 ms after the turn began while the LLM went on
decoding the reply's remaining text beside the first chunk's render, 222-267 ms when it had
stopped at the 10th token (docs/engine.md). The platform renders in the speech decoder's own
process and did not pay this, so the embedded engine was no faster than the platform despite
having no network in between.

`SpeechWorker` is that process for `InProcessParts`: it loads the checkpoint's speech parts
and serves replies as the Triton speech decoder does, through the same `SpeechScheduler`
(first audio first, concurrent replies' text decoded and their first chunks rendered
together; each reply's calls in order). Text and the LLM's hidden states go in, and each
rendered chunk comes back as soon as it exists. A reply closed by a barge-in has its queued
calls answered empty at once, and the render in progress stops before its next chunk.

The child is started with `python -m`, not `multiprocessing`, so that nothing re-imports the
caller's main module. It exits when its pipe closes (the parent exited, even killed). A
process keeps `replicas` workers (as Triton keeps speech-decoder instances) for every
`InProcessParts` that loads the same checkpoint with the same settings; a reply opens on the
one with the fewest replies open. They live until the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from iomni.errors import Cancelled, Internal, IomniError, Unavailable
from iomni.model.checkpoint import LoadedCheckpoint, load_checkpoint
from iomni.model.speech.scheduler import SchedulerHooks, SpeechRequest, SpeechScheduler
from iomni.model.speech.stream import SpeechSession, SpeechSettings
from iomni.parts import ChunkCallback

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 300.0  # a 4b checkpoint's speech parts from a slow disk
# After a replica failed to start, replies do not start it again in the background for this
# long (a reply that needs it still tries, and reports why it cannot).
RESTART_BACKOFF_S = 30.0
# (event, value, instance): what a speech decoder's scheduler reports (SchedulerHooks.reporting)
MetricListener = Callable[[str, int, str], None]


@dataclass(frozen=True)
class WorkerSpec:
    """What the child loads: one worker per distinct spec in a process."""

    checkpoint: str
    fingerprint: str
    dtype: str  # torch dtype name, e.g. "float32"
    device: str
    threads: int
    settings: SpeechSettings = field(default_factory=SpeechSettings)
    idle_timeout_s: float = 60.0  # a reply not heard from for this long is freed

    @classmethod
    def of(cls, checkpoint: LoadedCheckpoint, settings: SpeechSettings, threads: int) -> WorkerSpec:
        """The speech parts of a loaded checkpoint as they were loaded."""
        weight = next(checkpoint.model.flow.parameters())
        return cls(
            checkpoint=str(Path(checkpoint.path).resolve()),
            fingerprint=checkpoint.fingerprint,
            dtype=str(weight.dtype).removeprefix("torch."),
            device=str(weight.device),
            threads=threads,
            settings=settings,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))  # the settings too, as a dict

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        fields = json.loads(text)
        return cls(**{**fields, "settings": SpeechSettings(**fields["settings"])})


@dataclass
class PendingCall:
    """One push_text or finish awaiting its chunks, on the event loop that made it."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[np.ndarray]]
    on_chunk: ChunkCallback | None
    chunks: list[np.ndarray] = field(default_factory=list)

    def deliver(self, kind: str, value: Any) -> None:  # on self.loop
        if self.future.done():
            return
        if kind == "chunk":
            self.chunks.append(value)
            if self.on_chunk is not None:
                self.on_chunk(value)
        elif kind == "done":
            self.future.set_result(self.chunks)
        else:
            self.future.set_exception(value)

    def deliver_from(self, kind: str, value: Any) -> None:
        """`deliver`, from any thread."""
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
            self.loop.call_soon_threadsafe(self.deliver, kind, value)


class SpeechWorker:
    """One child process. A process keeps `replicas` of them per spec (as Triton keeps
    instances of its speech decoder: each renders on one core), and a reply stays on the one
    that opened it."""

    _shared: ClassVar[dict[tuple[WorkerSpec, int], SpeechWorker]] = {}
    _starting: ClassVar[dict[tuple[WorkerSpec, int], threading.Lock]] = {}
    _failed_at: ClassVar[dict[tuple[WorkerSpec, int], float]] = {}  # last failed start
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def shared(cls, spec: WorkerSpec, replica: int = 0) -> SpeechWorker:
        """The process's worker `replica` for `spec`, started (blocking, seconds) if there is
        none or the last one exited."""
        with cls._shared_lock:
            starting = cls._starting.setdefault((spec, replica), threading.Lock())
        with starting:  # replicas start side by side; one replica starts once
            worker = cls._shared.get((spec, replica))
            if worker is None or not worker.alive:
                worker = cls._shared[(spec, replica)] = cls(spec, f"worker-{replica}")
            return worker

    @classmethod
    def running(cls, spec: WorkerSpec, replica: int = 0) -> SpeechWorker | None:
        """The process's worker `replica` for `spec` if it is up, without waiting."""
        worker = cls._shared.get((spec, replica))
        return worker if worker is not None and worker.alive else None

    @classmethod
    def start(cls, spec: WorkerSpec, replicas: int) -> threading.Thread:
        """Start the replicas that are neither up nor starting, side by side, in the
        background; returns the thread that waits for them (join it to wait)."""

        def start_one(replica: int) -> None:
            try:
                cls.shared(spec, replica)
            except IomniError as exc:  # a reply that needs it tries again and reports it
                cls._failed_at[(spec, replica)] = time.monotonic()
                log.warning("speech decoder process %d: %s", replica, exc)

        def start_all() -> None:
            starting = []
            for replica in range(replicas):
                lock = cls._starting.get((spec, replica))
                failed = cls._failed_at.get((spec, replica), -RESTART_BACKOFF_S)
                if time.monotonic() - failed < RESTART_BACKOFF_S:
                    continue  # each try loads torch and the checkpoint on the rendering cores
                if cls.running(spec, replica) is None and not (lock and lock.locked()):
                    starting.append(threading.Thread(target=start_one, args=(replica,)))
                    starting[-1].start()
            for thread in starting:
                thread.join()

        thread = threading.Thread(target=start_all, name="speech-workers", daemon=True)
        thread.start()
        return thread

    @classmethod
    def least_busy(cls, spec: WorkerSpec, replicas: int) -> int | None:
        """The running replica with the fewest open replies; None when none is up."""
        up = [(r, w) for r in range(replicas) if (w := cls.running(spec, r)) is not None]
        return min(up, key=lambda replica_worker: replica_worker[1].replies)[0] if up else None

    def __init__(self, spec: WorkerSpec, name: str = "worker-0") -> None:
        self.spec = spec
        self.name = name  # the `instance` its metrics carry
        self.listeners: list[MetricListener] = []
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), spec.to_json()],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=_child_env(),
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._calls: dict[int, PendingCall] = {}
        self._ids = itertools.count(1)
        self.replies = 0  # opened and not closed
        self._send_lock = threading.Lock()
        self._exited: str | None = None
        self._await_ready()
        self._reader = threading.Thread(target=self._read, name="speech-worker", daemon=True)
        self._reader.start()
        atexit.register(self.stop)

    def _await_ready(self) -> None:
        try:
            ready = self._conn.poll(LOAD_TIMEOUT_S)
            kind, _, detail = self._conn.recv() if ready else ("timeout", 0, None)
        except (EOFError, OSError):
            kind, detail = "exited", None
        if kind == "ready":
            return
        self.stop()
        if kind == "failed":
            raise detail
        raise Unavailable(
            f"the speech decoder's process did not start ({kind}, exit code "
            f"{self._process.returncode}); its error is above in this process's stderr"
        )

    @property
    def alive(self) -> bool:
        return self._exited is None and self._process.poll() is None

    def open(self, speaker: torch.Tensor | None, seed: int) -> int:
        """A new reply; `speaker` None uses the checkpoint's default voice."""
        session_id = next(self._ids)
        vector = None if speaker is None else speaker.detach().float().cpu().numpy()
        self._send(("open", session_id, vector, seed))
        self.replies += 1
        return session_id

    def submit(
        self,
        session_id: int,
        token_ids: Sequence[int] | None,
        hidden: torch.Tensor | None,
        on_chunk: ChunkCallback | None,
    ) -> asyncio.Future[list[np.ndarray]]:
        """Text for a reply (token_ids None: the reply's end), sent now; the future has its
        chunks once rendered."""
        loop = asyncio.get_running_loop()
        call_id = next(self._ids)
        call = PendingCall(loop, loop.create_future(), on_chunk)
        self._calls[call_id] = call
        call.future.add_done_callback(lambda _: self._calls.pop(call_id, None))
        try:
            if token_ids is None:
                self._send(("finish", session_id, call_id))
            else:
                rows = hidden.detach().float().cpu().numpy()  # type: ignore[union-attr]
                self._send(("text", session_id, call_id, list(token_ids), rows))
        except Unavailable:
            call.future.cancel()
            raise
        return call.future

    def _report(self, event: str, value: int) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, value, self.name)
            except Exception:  # a metric must never stop the replies' answers
                log.exception("speech worker metric listener failed")

    def listen(self, listener: MetricListener) -> None:
        """Have `listener(event, value, name)` hear this worker's scheduler (see
        `SchedulerHooks.reporting`), on the reader's thread."""
        if listener not in self.listeners:
            self.listeners.append(listener)

    def close(self, session_id: int) -> None:
        self.replies -= 1
        with contextlib.suppress(Unavailable):
            self._send(("close", session_id))

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if self._exited is not None:
                raise Unavailable(self._exited)
            try:
                self._conn.send(message)
            except OSError as exc:
                raise Unavailable(f"the speech decoder's process is gone ({exc})") from exc

    def _read(self) -> None:
        while True:
            try:
                kind, call_id, value = self._conn.recv()
            except (EOFError, OSError):
                self._fail_all()
                return
            except Exception:  # a message it cannot read (unpickling failed)
                self._unreadable()
                return
            if kind == "metric":
                self._report(*value)
                continue
            call = self._calls.get(call_id)
            if call is not None:
                call.deliver_from(kind, value)

    def _unreadable(self) -> None:
        """The process sent what cannot be read (an error that pickles but does not unpickle):
        whose call it answered is unknown, so every call in flight fails, and the process is
        stopped so that the next reply starts a new one (else those calls would wait forever
        on a worker still counted alive)."""
        log.exception("speech decoder process %s sent what could not be read", self.name)
        self.stop()
        self._fail_all("was stopped: what it sent could not be read")

    def _fail_all(self, why: str = "exited") -> None:
        code = self._process.wait()
        with self._send_lock:
            self._exited = (
                f"the speech decoder's process {why} (code {code}); the next reply starts a new one"
            )
        if code not in (0, -signal.SIGTERM):
            log.error("%s", self._exited)
        for call in list(self._calls.values()):
            call.deliver_from("error", Unavailable(self._exited))

    def stop(self) -> None:
        with contextlib.suppress(OSError, Unavailable):
            self._send(("stop", 0))
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()


class WorkerSpeech:
    """One reply's `SpeechStream` rendered by the `SpeechWorker` for `spec`. The reply opens
    at its first text, so that a turn's text never waits for the worker to start (seconds, on
    the first spoken turn of a process that did not `prepare_speech`)."""

    def __init__(
        self,
        spec: WorkerSpec,
        speaker: torch.Tensor | None,
        seed: int,
        replicas: int = 1,
        on_metric: MetricListener | None = None,
    ) -> None:
        self.spec = spec
        self.replicas = replicas
        self.on_metric = on_metric
        self.speaker = speaker
        self.seed = seed
        self.worker: SpeechWorker | None = None
        self.session_id = 0
        self._order = asyncio.Lock()
        self._closed = False

    async def push_text(
        self, token_ids: Sequence[int], hidden: torch.Tensor, on_chunk: ChunkCallback | None = None
    ) -> list[np.ndarray]:
        return await self._render(token_ids, hidden, on_chunk)

    async def finish(self, on_chunk: ChunkCallback | None = None) -> list[np.ndarray]:
        return await self._render(None, None, on_chunk)

    async def _render(
        self,
        token_ids: Sequence[int] | None,
        hidden: torch.Tensor | None,
        on_chunk: ChunkCallback | None,
    ) -> list[np.ndarray]:
        async with self._order:  # first come, first sent, also while the worker starts
            worker = self.worker or await self._open()
            if self._closed:
                return []
            rendered = worker.submit(self.session_id, token_ids, hidden, on_chunk)
        return await rendered

    async def _open(self) -> SpeechWorker:
        """The least busy worker that is up (else the first, started), with this reply opened
        on it; replicas that are down start in the background."""
        replica = SpeechWorker.least_busy(self.spec, self.replicas)
        if any(SpeechWorker.running(self.spec, r) is None for r in range(self.replicas)):
            SpeechWorker.start(self.spec, self.replicas)
        worker = None if replica is None else SpeechWorker.running(self.spec, replica)
        if worker is None:
            worker = await asyncio.to_thread(SpeechWorker.shared, self.spec, 0)
        self.worker = worker
        if self.on_metric is not None:
            worker.listen(self.on_metric)
        if not self._closed:  # closed while the worker started: nothing to open, or to close
            self.session_id = worker.open(self.speaker, self.seed)
        return worker

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.worker is not None:
                self.worker.close(self.session_id)


def _child_env() -> dict[str, str]:
    """The parent's environment, with the directory `iomni` was imported from first on the
    path (the parent may have found it through sys.path rather than PYTHONPATH)."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, path) if p)}


# ---- the child ---------------------------------------------------------------------------


class _Outbox:
    """The child's side of the pipe: the render thread's chunks and the reader's answers."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._lock:
            self.conn.send(message)


class CallAnswer:
    """A `SpeechAnswer` that hands each answer to `deliver(kind, value)`: ("chunk", samples),
    ("done", None) or ("error", exception), as `PendingCall.deliver` takes them. A call its
    reply's close superseded is answered empty, as the close promises."""

    def __init__(self, deliver: Callable[[str, Any], None]) -> None:
        self.deliver = deliver

    @classmethod
    def on_loop(cls, call: PendingCall) -> CallAnswer:
        """Answers for a call awaited on its event loop, from any thread."""
        return cls(call.deliver_from)

    def chunk(self, samples: np.ndarray) -> None:
        self.deliver("chunk", samples)

    def complete(self) -> None:
        self.deliver("done", None)

    def fail(self, error: BaseException) -> None:
        if isinstance(error, Cancelled):
            self.complete()
        else:
            self.deliver("error", error)

    def cancelled(self) -> bool:
        return False  # a reply is cancelled whole, by its close


UNANSWERED = CallAnswer(lambda kind, value: None)  # a close: nobody waits for its answer


class _Renderer:
    """The child: this thread reads the parent's messages and hands each call to a
    `SpeechScheduler`, whose thread renders (the Triton speech decoder's scheduling: first
    audio first, concurrent replies' text decoded together)."""

    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        loaded = load_checkpoint(
            spec.checkpoint, dtype=getattr(torch, spec.dtype), device=spec.device, parts=("speech",)
        )
        self.model = loaded.model
        self.spec = spec
        self.conn = conn
        self.outbox = _Outbox(conn)
        self.scheduler = SpeechScheduler(
            idle_timeout_s=spec.idle_timeout_s, hooks=SchedulerHooks.reporting(self._report)
        )
        self.opening: dict[int, Callable[[], SpeechSession]] = {}  # opened, no call yet

    def serve(self) -> None:
        self.scheduler.start()
        self.outbox.send(("ready", 0, None))
        while True:
            self._handle(self.conn.recv())

    def _handle(self, message: tuple) -> None:
        kind, session_id = message[0], message[1]
        if kind == "open":
            speaker, seed = message[2:]
            self.opening[session_id] = functools.partial(self._session, speaker, seed)
        elif kind == "text":
            call_id, token_ids, rows = message[2:]
            hidden = torch.from_numpy(rows).to(self.spec.device, getattr(torch, self.spec.dtype))
            self._put(session_id, self._answer(call_id), token_ids, hidden)
        elif kind == "finish":
            self._put(session_id, self._answer(message[2]), (), None, end=True)
        elif kind == "close":
            self.opening.pop(session_id, None)
            self.scheduler.discard(session_id, UNANSWERED)
        elif kind == "stop":
            raise SystemExit(0)

    def _put(
        self,
        session_id: int,
        answer: CallAnswer,
        token_ids: Sequence[int],
        hidden: torch.Tensor | None,
        end: bool = False,
    ) -> None:
        opener = self.opening.pop(session_id, None)  # the reply's first call opens it
        request = SpeechRequest(
            answer, token_ids, hidden, start=opener is not None, end=end, open=opener
        )
        self.scheduler.put(session_id, request)

    def _report(self, event: str, value: int) -> None:
        self.outbox.send(("metric", 0, (event, value)))

    def _answer(self, call_id: int) -> CallAnswer:
        """Answers to the parent's call `call_id`, over the pipe."""

        def deliver(kind: str, value: Any) -> None:
            self.outbox.send((kind, call_id, _picklable(value) if kind == "error" else value))

        return CallAnswer(deliver)

    def _session(self, speaker: np.ndarray | None, seed: int) -> SpeechSession:
        vector = None if speaker is None else torch.from_numpy(speaker)
        return SpeechSession.of_model(self.model, vector, seed, self.spec.settings)


def _picklable(exc: Exception) -> Exception:
    """`exc`, if the parent can rebuild it from a pickle (an error whose __init__ takes other
    arguments than its message pickles but fails to unpickle); else an Internal error that
    says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return Internal(f"speech decoder: {type(exc).__name__}: {exc}")
    return exc


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; Ctrl-C reaches both
    logging.basicConfig(level=logging.WARNING)
    conn = Connection(int(argv[0]))
    spec = WorkerSpec.from_json(argv[1])
    torch.set_num_threads(spec.threads)
    try:
        renderer = _Renderer(conn, spec)
    except Exception as exc:
        error = exc if isinstance(exc, IomniError) else Internal(f"{type(exc).__name__}: {exc}")
        conn.send(("failed", 0, _picklable(error)))
        return
    with contextlib.suppress(EOFError, OSError), torch.inference_mode():
        renderer.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
