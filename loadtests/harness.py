"""What every benchmark and suite in loadtests/ starts with: its command line, the generated
checkpoint it runs on, a throwaway Redis, percentiles, one timed in-process turn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from iomni.client import AsyncDialogueClient
from iomni.engine.events import AudioChunk, TextDelta, TurnDone
from iomni.engine.parts import GenerationRequest, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.model.conversation import Message, TextPart
from iomni.model.generate import make_checkpoint
from iomni.model.sampling import SamplingParams
from iomni.parts import ModelParts
from iomni.v1 import dialogue_pb2 as pb


def parser(description: str | None) -> argparse.ArgumentParser:
    """--out (where results are written) and --checkpoints (where generated ones live)."""
    parsed = argparse.ArgumentParser(description=description)
    parsed.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parsed.add_argument("--checkpoints", type=Path, default=Path(".cache/checkpoints"))
    return parsed


def checkpoint(args: argparse.Namespace, size: str = "small") -> Path:
    """The generated checkpoint of this size, made if missing; transformers kept quiet."""
    import transformers

    transformers.logging.set_verbosity_error()
    path = args.checkpoints / size
    if not (path / "config.json").exists():
        make_checkpoint(size, path)
    return path


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A scratch directory for one run's servers and logs: removed when the run ends well,
    kept and named on stderr when it fails (an exception, or SystemExit from a failed
    verdict), so that its logs can be read."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


def redis_command(port: int, *options: str) -> list[str]:
    """redis-server on loopback without snapshots (options add to or override that)."""
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *options]


def start_redis(port: int) -> subprocess.Popen:
    return subprocess.Popen(redis_command(port, "--appendonly", "no"), stdout=subprocess.DEVNULL)


def scrape(url: str, name: str) -> float:
    """The sum of a Prometheus series over all its labels (0 when absent)."""
    with urllib.request.urlopen(url) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith((f"{name} ", f"{name}{{"))
    )


def silence_heard(chunks: list[tuple[float, float]]) -> float:
    """Seconds of silence a client hears when it plays a reply from its first chunk on, in
    real time: `chunks` are (arrival time, audio seconds) in order. A chunk that arrives
    after the audio before it has played out leaves a hole of the difference."""
    if not chunks:
        return 0.0
    played_until, silence = chunks[0][0], 0.0
    for arrived, seconds in chunks:
        if arrived > played_until:
            silence += arrived - played_until
            played_until = arrived
        played_until += seconds
    return silence


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class TurnClock:
    """When a turn's text and audio reached the caller, in ms from its start: the first
    token, the 10th (a spoken reply's first chunk needs its first two groups of 5), the last,
    and the first audio (nan: none)."""

    TENTH = 9  # token index

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._marks: dict[str, float] = {}

    def _now(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def text(self, token_index: int) -> None:
        now = self._now()
        self._marks.setdefault("first_token_ms", now)
        if token_index >= self.TENTH:
            self._marks.setdefault("tenth_token_ms", now)
        self._marks["last_token_ms"] = now

    def audio(self) -> None:
        self._marks.setdefault("first_audio_ms", self._now())

    @property
    def marks(self) -> dict[str, float]:
        return {"first_audio_ms": float("nan"), **self._marks}


async def inprocess_turn(
    engine: TurnEngine, text: str, max_new_tokens: int, speech: bool = True
) -> dict[str, float]:
    """One greedy turn (spoken unless `speech` is False): its `TurnClock` marks and the
    prompt's token count. The turn is read to its end: one left at its first audio would
    still be rendering its next chunks when the next one starts."""
    request = TurnRequest(
        user=Message("user", (TextPart(text),)),
        speech=SpeechOptions() if speech else None,
        params=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
    )
    clock, prompt_tokens = TurnClock(), 0
    async for event in engine.start(request).events():
        if isinstance(event, TextDelta):
            clock.text(event.token_index)
        elif isinstance(event, AudioChunk):
            clock.audio()
        elif isinstance(event, TurnDone):
            prompt_tokens = event.usage.prompt_tokens
    return {**clock.marks, "prompt_tokens": prompt_tokens}


@dataclass(frozen=True)
class BargeIn:
    """A spoken reply cancelled during its audio, as a client saw it."""

    session_id: str
    to_last_audio_ms: float  # cancel sent -> the last audio byte received (0: none after)
    to_done_ms: float  # cancel sent -> the turn's `done`


async def barge_in(
    client: AsyncDialogueClient, session_id: str = "", text: str = "talk", after_s: float = 0.0
) -> BargeIn:
    """One Converse turn of session `session_id` (empty: a new one) asking for a long spoken
    reply, cancelled (a barge-in) `after_s` after its first audio chunk arrived: with a
    delay the cancel lands while a later chunk renders, not only between chunks. The cancel
    is timed when it goes to the stream."""
    queue: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
    cancel = pb.ConverseRequest(cancel=pb.Cancel())
    config = pb.SessionConfig(
        session_id=session_id,
        output=pb.OutputOptions(speech=True),
        sampling=pb.SamplingOptions(temperature=0.0, max_new_tokens=200),
    )
    for request in (
        pb.ConverseRequest(config=config),
        pb.ConverseRequest(text=pb.UserText(text=text)),
        pb.ConverseRequest(end_of_turn=pb.EndOfTurn()),
    ):
        queue.put_nowait(request)

    cancelled_at: float | None = None

    async def requests() -> AsyncIterator[pb.ConverseRequest]:
        nonlocal cancelled_at
        while (item := await queue.get()) is not None:
            if item is cancel:
                cancelled_at = time.perf_counter()
            yield item

    asked = last_audio = done_at = None
    async for response in client.converse(requests()):
        kind = response.WhichOneof("payload")
        now = time.perf_counter()
        if kind == "audio":
            last_audio = now
            if asked is None:
                asked = asyncio.get_running_loop().call_later(after_s, queue.put_nowait, cancel)
        elif kind == "done":
            session_id, done_at = response.session_id, now
            queue.put_nowait(None)
    if asked is not None:
        asked.cancel()  # the reply ended first (then there was nothing to cancel)
    if cancelled_at is None or done_at is None or last_audio is None:
        raise RuntimeError("the reply ended without audio or without done: nothing to cancel")
    return BargeIn(
        session_id,
        max(0.0, last_audio - cancelled_at) * 1000,
        (done_at - cancelled_at) * 1000,
    )


def cell(value: object) -> str:
    """A figure for a table: one decimal from 10 up, three significant digits below."""
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def metric_table(results: dict[str, dict]) -> list[str]:
    """Markdown rows: one per metric (sorted), one column per result set; `errors` left out."""
    keys = sorted({k for r in results.values() for k in r if k != "errors"})
    lines = ["| metric | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for key in keys:
        cells = [cell(r[key]) if key in r else "" for r in results.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


async def decode_rate(
    parts: ModelParts,
    streams: int,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    return_hidden: bool = False,
) -> dict[str, float]:
    """`streams` greedy generations at once: tokens / wall time from the start, prefill
    included, and the slowest stream's own rate after its first token."""

    async def one(seed: int) -> tuple[int, float]:
        request = GenerationRequest(
            input_ids=[1000 + seed] * prompt_tokens,
            media={},
            stop_ids=[],
            params=SamplingParams(temperature=0.0, max_new_tokens=new_tokens),
            return_hidden=return_hidden,
        )
        first, count = 0.0, 0
        async for _ in parts.generate(request):
            count += 1
            if count == 1:
                first = time.perf_counter()
        return count, (count - 1) / max(time.perf_counter() - first, 1e-9)

    started = time.perf_counter()
    runs = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - started
    return {
        "tokens_per_s": sum(count for count, _ in runs) / wall,
        "slowest_stream_tokens_per_s": min(rate for _, rate in runs),
    }


def publish(out: Path, name: str, lines: list[str]) -> None:
    """Write a result page (docs/benchmarks/NAME.md) and show it."""
    text = "\n".join(lines)
    (out / f"{name}.md").write_text(text + "\n")
    print(text)
