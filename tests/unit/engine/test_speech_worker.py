"""The embedded engine's speech decoder in a child process (`SpeechWorker`): the same audio as
the in-thread path, barge-in, and what happens when the child fails or its parent dies."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iomni.engine import speech_worker
from iomni.engine.events import AudioChunk, TextDelta
from iomni.engine.parts import InProcessParts, InProcessSpeech
from iomni.engine.speech_worker import SpeechWorker, WorkerSpec, WorkerSpeech, _picklable
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.errors import CheckpointError, Internal, InvalidInput, SessionBusy, Unavailable
from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.conversation import Message, TextPart
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.model.speech.speaker import SpeakerEncoder
from iomni.model.speech.stream import SpeechSession, SpeechSettings
from iomni.parts import SpeechOptions, SpeechStream
from iomni.testing.speech import wav_bytes


def voice(seconds: float = 2.0, rate: int = 16000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tremolo = 1 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return wav_bytes(0.3 * np.sin(2 * np.pi * 180 * t) * tremolo, rate)


def spec_of(parts: InProcessParts) -> WorkerSpec:
    assert parts._worker_spec is not None
    return parts._worker_spec


async def speak(stream: SpeechStream, tiny: LoadedCheckpoint) -> list[np.ndarray]:
    """Six groups of text as the engine sends them, then the reply's end. The rows are fixed:
    an LLM's hidden states can differ in the last bits between a process's first turn and
    the next, which would hide what this compares."""
    chunks = []
    for group in range(6):
        chunks += await stream.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5, seed=group))
    return chunks + await stream.finish()


def assert_same_audio(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(expected) >= 4 and len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


async def test_the_worker_speaks_exactly_as_the_thread_did(tiny: LoadedCheckpoint) -> None:
    in_thread = InProcessParts(tiny, speech_process=False)
    in_child = InProcessParts(tiny)
    assert in_thread._worker_spec is None and in_child._worker_spec is not None  # CPU default
    options = SpeechOptions(seed=3)
    expected = await speak(await in_thread.open_speech(options), tiny)
    assert_same_audio(await speak(await in_child.open_speech(options), tiny), expected)


async def test_a_cloned_voice_reaches_the_worker_exactly(tiny: LoadedCheckpoint) -> None:
    """One embedding for both sides: CAM++ on onnxruntime is not bit-reproducible run to run
    (its reductions are threaded), so each side embedding the reference would differ anyway."""
    speaker = SpeakerEncoder.from_checkpoint(tiny.path).embed(voice())
    model = tiny.model
    session = SpeechSession(model.voicelm, model.flow, model.hifigan, speaker, seed=3)
    expected = await speak(in_thread(tiny, session), tiny)
    spec = spec_of(InProcessParts(tiny))
    assert_same_audio(await speak(WorkerSpeech(spec, speaker, seed=3), tiny), expected)


def in_thread(tiny: LoadedCheckpoint, session: SpeechSession) -> InProcessSpeech:
    """A reply that renders `session` in this process."""
    return InProcessSpeech(
        InProcessParts(tiny, speech_process=False).speech_scheduler(), lambda: session
    )


def stop_workers(spec: WorkerSpec, replicas: int) -> None:
    for replica in range(replicas):
        if (worker := SpeechWorker.running(spec, replica)) is not None:
            worker.stop()


def hidden_rows(tiny: LoadedCheckpoint, count: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, tiny.config.llm_config.hidden_size, generator=generator)


async def test_a_closed_reply_renders_nothing_more(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    spec = spec_of(InProcessParts(tiny))
    whole = WorkerSpeech(spec, None, seed=1)
    groups = [whole.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5)) for _ in range(8)]
    rendered = sum(len(chunks) for chunks in await asyncio.gather(*groups))
    assert rendered >= 2

    barged = WorkerSpeech(spec, None, seed=1)
    groups = [
        asyncio.ensure_future(barged.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5)))
        for _ in range(8)
    ]
    await asyncio.sleep(0)  # the calls are sent, and the close right behind them
    await barged.close()
    after_close = await asyncio.wait_for(asyncio.gather(*groups), 30)
    assert sum(len(chunks) for chunks in after_close) < rendered
    assert await barged.push_text([11], hidden_rows(tiny, 1)) == []
    assert await barged.finish() == []


async def test_a_reply_closed_while_it_renders_stops_at_the_next_chunk(
    tiny: LoadedCheckpoint,
) -> None:
    spec = spec_of(InProcessParts(tiny))
    ids, rows = list(range(11, 91)), hidden_rows(tiny, 80)  # one call, many chunks
    whole = await WorkerSpeech(spec, None, seed=1).push_text(ids, rows)
    assert len(whole) >= 8

    reply = WorkerSpeech(spec, None, seed=1)
    closing: list[asyncio.Task] = []
    chunks = await reply.push_text(
        ids, rows, on_chunk=lambda _: closing.append(asyncio.ensure_future(reply.close()))
    )
    assert 1 <= len(chunks) < len(whole) // 2  # the close reaches the child within a chunk or two
    await asyncio.gather(*closing)


async def test_a_render_that_fails_fails_its_turn_and_the_worker_serves_on(
    tiny: LoadedCheckpoint,
) -> None:
    spec = spec_of(InProcessParts(tiny))
    broken = WorkerSpeech(spec, None, seed=1)
    with pytest.raises(RuntimeError):  # hidden rows of the wrong width
        await broken.push_text([11, 12, 13, 14, 15], torch.zeros(5, 3))
    unopenable = WorkerSpeech(spec, torch.zeros(3), seed=1)  # a voice vector of 3, not 192
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        await unopenable.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    healthy = WorkerSpeech(spec, None, seed=1)
    for _ in range(4):
        await healthy.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    assert await healthy.finish()
    assert healthy.worker is broken.worker and healthy.worker.alive


async def test_a_worker_that_dies_fails_the_reply_and_the_next_reply_starts_another(
    tiny: LoadedCheckpoint,
) -> None:
    # A spec of its own: its worker is not the one the other tests share.
    spec = spec_of(InProcessParts(tiny, speech=SpeechSettings(flow_steps=3)))
    reply = WorkerSpeech(spec, None, seed=1)
    await reply.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))  # starts the worker
    worker = reply.worker
    assert worker is not None
    worker._process.kill()
    with pytest.raises(Unavailable, match="speech decoder's process exited"):
        for _ in range(4):
            await asyncio.wait_for(reply.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5)), 30)
    successor = WorkerSpeech(spec, None, seed=1)
    await successor.push_text(list(range(11, 21)), hidden_rows(tiny, 10))
    assert successor.worker is not worker and successor.worker.alive  # type: ignore[union-attr]
    assert await successor.finish()
    successor.worker.stop()  # type: ignore[union-attr]


async def test_text_sent_while_the_worker_starts_goes_out_in_order(
    tiny: LoadedCheckpoint,
) -> None:
    """The engine sends each group without awaiting the one before: the first reply of a
    process queues them all while its worker starts, and they must render as if sent one by
    one."""
    settings = SpeechSettings(flow_steps=2)  # a worker of its own, not started yet
    spec = spec_of(InProcessParts(tiny, speech=settings))
    assert SpeechWorker.running(spec) is None
    model = tiny.model
    session = SpeechSession(
        model.voicelm,
        model.flow,
        model.hifigan,
        model.default_speaker_embedding.detach(),
        seed=3,
        settings=settings,
    )
    expected = await speak(in_thread(tiny, session), tiny)
    reply = WorkerSpeech(spec, None, seed=3)
    calls = [
        asyncio.ensure_future(reply.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5, seed=g)))
        for g in range(6)
    ]
    calls.append(asyncio.ensure_future(reply.finish()))
    got = [chunk for chunks in await asyncio.gather(*calls) for chunk in chunks]
    assert_same_audio(got, expected)
    reply.worker.stop()  # type: ignore[union-attr]


async def test_a_turns_text_does_not_wait_for_the_worker_to_start(
    tiny: LoadedCheckpoint, processor: Processor
) -> None:
    parts = InProcessParts(tiny, speech=SpeechSettings(flow_steps=4))  # a worker of its own
    spec = spec_of(parts)
    assert SpeechWorker.running(spec) is None
    request = TurnRequest(
        user=Message("user", (TextPart("Hello"),)),
        params=SamplingParams(temperature=0.0, max_new_tokens=24),
        speech=SpeechOptions(seed=1),
    )
    running_at_first_text, audio = None, 0
    async for event in TurnEngine(parts, processor).start(request).events():
        if isinstance(event, TextDelta) and running_at_first_text is None:
            running_at_first_text = SpeechWorker.running(spec) is not None
        audio += isinstance(event, AudioChunk)
    assert running_at_first_text is False  # the worker takes seconds to start; text took ms
    assert audio >= 2  # and the reply was still spoken, once it was up
    stop_workers(spec, parts.speech_workers)


def test_a_checkpoint_the_worker_cannot_load_is_a_clear_error(tiny: LoadedCheckpoint) -> None:
    spec = spec_of(InProcessParts(tiny))
    missing = WorkerSpec(**{**spec.__dict__, "checkpoint": "/nonexistent/checkpoint"})
    with pytest.raises(CheckpointError, match="/nonexistent/checkpoint does not exist"):
        SpeechWorker(missing)


def test_the_worker_exits_when_its_parent_is_killed(tiny: LoadedCheckpoint) -> None:
    spec = spec_of(InProcessParts(tiny))
    script = (
        "import sys, time\n"
        "from iomni.engine.speech_worker import SpeechWorker, WorkerSpec\n"
        "worker = SpeechWorker(WorkerSpec.from_json(sys.argv[1]))\n"
        "print(worker._process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    services = str(Path(__file__).resolve().parents[3] / "services")
    env = {**os.environ, "PYTHONPATH": services}
    parent = subprocess.Popen(
        [sys.executable, "-c", script, spec.to_json()], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break  # exited; a zombie until init reaps it
            time.sleep(0.1)
        else:
            assert not Path(f"/proc/{child}").exists(), "the speech worker outlived its parent"
    finally:
        parent.kill()


def test_the_runtime_renders_in_a_worker_unless_it_runs_one_turn(tiny_dir: Path) -> None:
    """A one-shot `iomni chat` would wait seconds for the worker to start to save ~40 ms."""
    from iomni.runtime.build import build_runner
    from iomni.runtime.settings import Settings

    settings = Settings(model=tiny_dir, transport="inprocess", redis_url="memory")
    serving = build_runner(settings, role="test").parts
    one_turn = build_runner(settings, role="test", speech_process=False).parts
    assert isinstance(serving, InProcessParts) and isinstance(one_turn, InProcessParts)
    assert serving._worker_spec is not None
    assert one_turn._worker_spec is None and one_turn.prepare_speech() is None
    assert serving.speech_workers == min(2, len(os.sched_getaffinity(0)))
    one_worker = build_runner(replace(settings, speech_workers=1), role="test").parts
    assert isinstance(one_worker, InProcessParts) and one_worker.speech_workers == 1


async def test_a_reply_left_idle_is_freed_and_its_next_call_says_so(tiny: LoadedCheckpoint) -> None:
    """A reply its engine neither finished nor closed does not hold the worker's memory."""
    spec = spec_of(InProcessParts(tiny))
    spec = WorkerSpec(**{**spec.__dict__, "idle_timeout_s": 0.5})  # a worker of its own
    forgotten = WorkerSpeech(spec, None, seed=1)
    await forgotten.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    lively = WorkerSpeech(spec, None, seed=1)
    await lively.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    for _ in range(12):  # over 1.2 s, a group 0.1 s after the last one rendered: never idle
        await asyncio.sleep(0.1)
        await lively.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    with pytest.raises(InvalidInput, match="was idle for more than .* and was freed"):
        await forgotten.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    assert await lively.finish()
    lively.worker.stop()  # type: ignore[union-attr]


@pytest.mark.parametrize("in_worker", [True, False], ids=["worker", "thread"])
async def test_a_new_replys_first_audio_does_not_wait_for_anothers_queued_text(
    tiny: LoadedCheckpoint, in_worker: bool
) -> None:
    """Both embedded paths serve through the speech scheduler: a reply with audio in hand waits
    while a reply that started after it gets its first chunk (in arrival order, the new reply's
    first audio came after every chunk of the text queued before it)."""
    arrivals: list[str] = []
    if in_worker:
        spec = spec_of(InProcessParts(tiny))
        playing, starting = WorkerSpeech(spec, None, seed=1), WorkerSpeech(spec, None, seed=2)
    else:
        parts = InProcessParts(tiny, speech_process=False)
        playing = await parts.open_speech(SpeechOptions(seed=1))  # type: ignore[assignment]
        starting = await parts.open_speech(SpeechOptions(seed=2))  # type: ignore[assignment]
    await playing.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))  # the worker is up
    queued = [
        asyncio.ensure_future(
            playing.push_text(
                [11, 12, 13, 14, 15],
                hidden_rows(tiny, 5, seed=group),
                on_chunk=lambda _: arrivals.append("playing"),
            )
        )
        for group in range(8)
    ]
    await asyncio.sleep(0)  # sent: they are queued ahead of the new reply's text
    first = [
        starting.push_text(
            [11, 12, 13, 14, 15],
            hidden_rows(tiny, 5, seed=group),
            on_chunk=lambda _: arrivals.append("starting"),
        )
        for group in range(2)
    ]
    await asyncio.gather(*queued, *first)
    assert arrivals.count("playing") >= 3
    assert arrivals.index("starting") < len(arrivals) - arrivals[::-1].index("playing") - 1
    assert arrivals.index("starting") <= 2  # after at most the chunks already in progress
    await asyncio.gather(playing.close(), starting.close())


async def test_concurrent_replies_are_spread_over_the_workers(tiny: LoadedCheckpoint) -> None:
    """As Triton spreads sequences over its speech-decoder instances: each worker renders on
    a core of its own, and a reply opens on the one with the fewest replies open."""
    parts = InProcessParts(tiny, speech=SpeechSettings(flow_steps=3), speech_workers=2)
    spec = spec_of(parts)
    starting = parts.prepare_speech()
    assert starting is not None
    await asyncio.to_thread(starting.join)
    replies = [await parts.open_speech(SpeechOptions(seed=seed)) for seed in range(4)]
    for reply in replies:  # each opens at its first text
        await reply.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    workers = [reply.worker for reply in replies]  # type: ignore[attr-defined]
    assert len({id(worker) for worker in workers}) == 2
    assert [workers.count(worker) for worker in workers] == [2, 2, 2, 2]
    for reply in replies[:3]:
        await reply.close()
    assert sorted(worker.replies for worker in {id(w): w for w in workers}.values()) == [0, 1]
    late = await parts.open_speech(SpeechOptions(seed=9))
    await late.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5))
    assert late.worker is not replies[3].worker  # type: ignore[attr-defined]
    await asyncio.gather(late.close(), replies[3].close())
    stop_workers(spec, 2)


@pytest.mark.parametrize("in_worker", [True, False], ids=["worker", "thread"])
async def test_the_speech_schedulers_report_what_they_do(
    tiny: LoadedCheckpoint, in_worker: bool
) -> None:
    """What the Triton speech decoder's metrics show, the embedded paths report too: replies
    open, and how many replies each speech-LM pass took."""
    reports: list[tuple[str, int, str]] = []
    parts = InProcessParts(
        tiny,
        speech=SpeechSettings(flow_steps=2),  # workers of their own
        speech_process=in_worker,
        speech_workers=1,
        on_speech_metric=lambda event, value, instance: reports.append((event, value, instance)),
    )
    reply = await parts.open_speech(SpeechOptions(seed=1))
    for group in range(4):
        await reply.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5, seed=group))
    assert await reply.finish()
    await reply.close()
    instance = "worker-0" if in_worker else "thread"
    for _ in range(50):  # the last report crosses the pipe after the answer
        if reports and reports[-1][0] == "open_sequences" and reports[-1][1] == 0:
            break
        await asyncio.sleep(0.05)
    assert ("open_sequences", 1, instance) in reports
    assert reports[-1] == ("open_sequences", 0, instance)
    assert sum(1 for event, value, _ in reports if event == "decode_batch" and value == 1) >= 4
    if in_worker:
        stop_workers(spec_of(parts), 1)
    await parts.close()


@pytest.mark.parametrize("in_worker", [True, False], ids=["worker", "thread"])
async def test_a_failing_metric_listener_does_not_stop_the_replies(
    tiny: LoadedCheckpoint, in_worker: bool
) -> None:
    """The worker's reader thread and the in-thread scheduler call the listener; one that
    raises must end neither (the replies' answers come through the same threads)."""

    def broken(event: str, value: int, instance: str) -> None:
        raise RuntimeError("a broken metrics backend")

    parts = InProcessParts(
        tiny,
        speech=SpeechSettings(flow_steps=4),
        speech_process=in_worker,
        speech_workers=1,
        on_speech_metric=broken,
    )
    reply = await parts.open_speech(SpeechOptions(seed=1))
    for group in range(3):
        await asyncio.wait_for(
            reply.push_text([11, 12, 13, 14, 15], hidden_rows(tiny, 5, seed=group)), 60
        )
    assert await asyncio.wait_for(reply.finish(), 60)
    await reply.close()
    if in_worker:
        stop_workers(spec_of(parts), 1)
    await parts.close()


class TwoArguments(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


@pytest.mark.parametrize(
    "error", [SessionBusy("s1", "t1"), TwoArguments(1, 2)], ids=["SessionBusy", "TwoArguments"]
)
def test_an_error_the_parent_could_not_unpickle_crosses_as_internal(error: Exception) -> None:
    """Such errors pickle, but rebuilding them calls __init__ with the message alone."""
    crossed = pickle.loads(pickle.dumps(_picklable(error)))
    assert isinstance(crossed, Internal)
    assert str(crossed) == f"speech decoder: {type(error).__name__}: {error}"
    invalid = InvalidInput("no such voice")
    assert _picklable(invalid) is invalid  # what can cross, crosses as it is


# A child that answers text with an error that pickles but does not unpickle (as the speech
# decoder did before `_picklable` checked both ways) and exits on "stop".
UNREADABLE_CHILD = """
import sys
from multiprocessing.connection import Connection
from iomni.errors import SessionBusy
conn = Connection(int(sys.argv[1]))
conn.send(("ready", 0, None))
while (message := conn.recv())[0] != "stop":
    if message[0] == "text":
        conn.send(("error", message[2], SessionBusy("s1", "t1")))
"""


async def test_an_answer_the_parent_cannot_read_fails_the_calls_and_retires_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whose call it answered is unknown: the calls in flight fail rather than wait forever,
    and the worker is no longer alive, so the next reply starts another."""
    popen = subprocess.Popen

    def unreadable_child(args: list[str], **kwargs: Any) -> subprocess.Popen:
        pipe_fd = args[3]
        return popen([sys.executable, "-c", UNREADABLE_CHILD, pipe_fd], **kwargs)

    monkeypatch.setattr(speech_worker.subprocess, "Popen", unreadable_child)
    worker = SpeechWorker(WorkerSpec("unused", "unused", "float32", "cpu", 1))
    try:
        session_id = worker.open(None, seed=1)
        call = worker.submit(session_id, [11], torch.zeros(1, 4), None)
        with pytest.raises(Unavailable, match="what it sent could not be read"):
            await asyncio.wait_for(call, 30)  # without the fix: it never ends
        assert not worker.alive
    finally:
        worker.stop()


def test_a_replica_that_fails_to_start_is_not_started_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each start loads torch and the checkpoint on the cores that render audio: a replica
    that cannot start (no memory for another copy) is not relaunched for every reply."""
    tries: list[int] = []

    def failing(cls, spec, replica: int = 0):  # type: ignore[no-untyped-def]
        tries.append(replica)
        raise Unavailable("the speech decoder's process did not start (failed, exit code 1)")

    monkeypatch.setattr(SpeechWorker, "shared", classmethod(failing))
    failed_at: dict = {}
    monkeypatch.setattr(SpeechWorker, "_failed_at", failed_at)
    spec = object()
    SpeechWorker.start(spec, 2).join(10)  # type: ignore[arg-type]
    SpeechWorker.start(spec, 2).join(10)  # type: ignore[arg-type]
    assert sorted(tries) == [0, 1]
    for replica in failed_at:  # the backoff is over
        failed_at[replica] -= speech_worker.RESTART_BACKOFF_S + 1
    SpeechWorker.start(spec, 2).join(10)  # type: ignore[arg-type]
    assert sorted(tries) == [0, 0, 1, 1]  # tried again once the backoff is over
