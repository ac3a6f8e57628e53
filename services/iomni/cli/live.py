"""`iomni chat --live`: a live conversation in this process, no servers. A recording (or raw
PCM16 on stdin) is streamed as a microphone would stream it; the server side decides the turns.

The replies are not played aloud: the command assumes each is heard at real time from its first
audio, which is what it reports as the playback position when the user's speech interrupts one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

from iomni.engine.events import AudioChunk, TextDelta
from iomni.errors import InvalidInput
from iomni.live.detector import SpeechStarted, SpeechStopped
from iomni.live.session import (
    Interrupted,
    LiveSession,
    LiveSettings,
    LiveWarning,
    ReplyTruncated,
    TurnCommitted,
)
from iomni.turns.runner import TurnFinished

RATE = 24000
CHUNK_MS = 40
TRAILING_SILENCE_S = 2.0  # after the recording, so its last turn ends


def read_audio(source: Path) -> np.ndarray:
    """A recording (any format soundfile reads) or `-` (raw PCM16 mono 16 kHz on stdin), as
    float32 at 24 kHz."""
    import soundfile as sf
    import soxr

    if str(source) == "-":
        samples, rate = np.frombuffer(sys.stdin.buffer.read(), "<i2") / 32768.0, 16000
    else:
        try:
            samples, rate = sf.read(str(source), dtype="float32", always_2d=True)
        except Exception as exc:
            raise InvalidInput(f"--audio {source}: not an audio file soundfile can read") from exc
        samples = samples.mean(axis=1)
    return soxr.resample(samples.astype(np.float32), rate, RATE).astype(np.float32)


class Printer:
    """Writes what happens, as it happens; keeps each reply's audio."""

    def __init__(self, out: Path | None, started: float) -> None:
        self.out = out
        self.started = started
        self.audio: dict[str, list[bytes]] = {}
        self.first_audio: dict[str, float] = {}
        self.replies: list[str] = []
        self.reported: set[str] = set()  # interrupted replies whose playback was reported
        self.finished = 0

    def _at(self) -> str:
        return f"[{time.monotonic() - self.started:6.2f}s]"

    async def __call__(self, turn_id: str, event: object) -> None:
        if isinstance(event, SpeechStarted):
            what = "resumed" if event.resumed else "started"
            print(f"\n{self._at()} speech {what} at {event.audio_start_ms} ms", flush=True)
        elif isinstance(event, SpeechStopped):
            print(f"{self._at()} speech stopped at {event.audio_end_ms} ms", flush=True)
        elif isinstance(event, TurnCommitted):
            self.replies.append(turn_id)
            print(f"{self._at()} turn committed ({event.frames} frames); assistant: ", end="")
        elif isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, AudioChunk):
            self.first_audio.setdefault(turn_id, time.monotonic())
            self.audio.setdefault(turn_id, []).append(event.pcm)
        elif isinstance(event, TurnFinished):
            self.finished += 1
            self._write(turn_id)
            print(f"\n{self._at()} reply done ({event.stop_reason})", flush=True)
        elif isinstance(event, Interrupted):
            print(f"\n{self._at()} reply interrupted by the {event.by}", flush=True)
        elif isinstance(event, ReplyTruncated):
            print(f"{self._at()} stored reply cut to what was heard: {event.text!r}", flush=True)
        elif isinstance(event, LiveWarning):
            print(f"{self._at()} warning: {event.message}", file=sys.stderr, flush=True)

    def played_ms(self, turn_id: str) -> int:
        started = self.first_audio.get(turn_id)
        sent = sum(len(p) for p in self.audio.get(turn_id, [])) / 2 / RATE * 1000
        return 0 if started is None else int(min(sent, (time.monotonic() - started) * 1000))

    def _write(self, turn_id: str) -> None:
        if self.out is None or turn_id not in self.audio:
            return
        import soundfile as sf

        number = self.replies.index(turn_id) + 1 if turn_id in self.replies else 0
        path = self.out.with_name(f"{self.out.stem}-{number}{self.out.suffix or '.wav'}")
        pcm = np.frombuffer(b"".join(self.audio[turn_id]), dtype="<i2")
        sf.write(path, pcm, RATE, subtype="PCM_16")
        print(f"\n  speech -> {path}", end="")


async def run_live(args: argparse.Namespace, runtime, store, params, speech) -> int:  # type: ignore[no-untyped-def]
    """Stream `args.audio` into a live session on `runtime` and print the conversation."""
    from iomni.cli.session_file import LOCAL_TENANT

    if args.audio is None:
        raise InvalidInput("--live needs --audio FILE (or - for raw PCM16 16 kHz on stdin)")
    samples = read_audio(args.audio)
    samples = np.concatenate([samples, np.zeros(int(TRAILING_SILENCE_S * RATE), np.float32)])
    printer = Printer(args.out, time.monotonic())
    live = LiveSession(
        runtime.runner,
        LOCAL_TENANT,
        store.session_id,
        params,
        speech,
        LiveSettings(),
        printer,
    )
    for image in args.image:
        await live.push_frame(image.read_bytes())
    step = RATE * CHUNK_MS // 1000
    speed = max(args.speed, 0.01)
    started = time.monotonic()
    for index, start in enumerate(range(0, len(samples), step)):
        chunk = (np.clip(samples[start : start + step], -1, 1) * 32767).astype("<i2")
        await live.push_audio(chunk.tobytes(), RATE)
        await _report_playback(live, printer)
        delay = started + (index + 1) * CHUNK_MS / 1000 / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    while live.reply is not None and not live.reply.finished:
        await asyncio.sleep(0.05)
    await _report_playback(live, printer)
    await asyncio.sleep(0.2)  # a truncation in flight lands
    await live.close()
    print(f"\n{printer.finished} turn(s); the dialogue is in {args.session}")
    return 0


async def _report_playback(live: LiveSession, printer: Printer) -> None:
    """After an interruption, tell the session how much of that reply was heard (once)."""
    for reply in live.replies:
        if reply.interrupted and reply.turn_id not in printer.reported:
            printer.reported.add(reply.turn_id)
            await live.playback(reply.turn_id, printer.played_ms(reply.turn_id))
