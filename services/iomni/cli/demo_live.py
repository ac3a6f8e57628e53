"""The live part of `make demo`: a recorded question streamed at real time as a microphone
would send it, the server detecting its end; then the user speaks over the reply (barge-in)
and the stored reply is cut to what was heard."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from iomni.client import AsyncDialogueClient, LiveStream, find_api_key
from iomni.testing.speech import spoken
from iomni.v1 import dialogue_pb2 as pb

RATE = 24000  # the microphone's rate
CHUNK_S = 0.04
FIRST = "Hello! Can you tell me what you see on my desk right now?"
SECOND = "Wait, stop, that is enough. Tell me something shorter."


def speech(text: str, workdir: Path, name: str) -> np.ndarray:
    samples = spoken(text, RATE)
    sf.write(workdir / f"{name}.wav", samples, RATE, subtype="PCM_16")
    return samples


class Microphone:
    """Sends audio at real time; silence in between, as a live microphone does."""

    def __init__(self, stream: LiveStream) -> None:
        self.stream = stream
        self.sent_s = 0.0
        self.started = time.monotonic()

    async def say(self, samples: np.ndarray) -> float:
        """Stream `samples`; returns the monotonic time its last chunk was sent."""
        step = int(RATE * CHUNK_S)
        for start in range(0, len(samples), step):
            chunk = np.clip(samples[start : start + step], -1, 1)
            self.stream.send_audio((chunk * 32767).astype("<i2").tobytes(), RATE)
            self.sent_s += CHUNK_S
            delay = self.started + self.sent_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return time.monotonic()

    async def silence(self, seconds: float) -> None:
        await self.say(np.zeros(int(seconds * RATE), np.float32))


async def live_demo(server: str, workdir: Path) -> None:
    first, second = speech(FIRST, workdir, "live-1"), speech(SECOND, workdir, "live-2")
    async with AsyncDialogueClient(server, find_api_key()) as client:
        stream = client.live(temperature=0.8, max_new_tokens=48, speech=True)
        log = Transcript()
        reader = asyncio.create_task(log.read(stream))
        mic = Microphone(stream)
        print("\n--- live turn (a microphone stream; no end_of_turn: the server hears the end)")
        spoken_until = await mic.say(first)
        silence = asyncio.create_task(mic.silence(6.0))
        await log.wait("audio")
        print(
            f"\n  end of speech -> first audio (client side): "
            f"{(log.first_audio_at - spoken_until) * 1000:.0f} ms"
        )
        await asyncio.sleep(1.0)  # the user listens for a second, then speaks over the reply
        silence.cancel()
        print("\n--- barge-in: the user speaks over the reply")
        speaking = asyncio.create_task(mic.say(second))
        await log.wait("interrupted")
        # The client stopped playing when the server said so: that much was heard.
        heard_ms = int((log.interrupted_at - log.first_audio_at) * 1000)
        stream.playback(log.first_turn, heard_ms)
        await speaking
        await mic.silence(2.0)
        await log.wait("truncated")
        await log.wait("done", 2)
        stream.close()
        await asyncio.wait_for(reader, 30)
        session = await client.get_session(log.session_id)
        print(
            f"\n  stored: {session.turns} turns; the interrupted reply as kept in the history: "
            f"{session.history[1].parts[0].text!r}"
        )


class Transcript:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.first_audio_at = 0.0
        self.interrupted_at = 0.0
        self.first_turn = ""
        self.session_id = ""

    async def read(self, stream: LiveStream) -> None:
        async for response in stream:
            kind = response.WhichOneof("payload")
            self.seen[kind] = self.seen.get(kind, 0) + 1
            self.session_id = response.session_id or self.session_id
            self.show(kind, response)

    def show(self, kind: str, response: pb.ConverseResponse) -> None:
        now = time.monotonic()
        if kind == "speech_started":
            print(f"  server: speech started at {response.speech_started.audio_start_ms} ms")
        elif kind == "speech_stopped":
            print(f"  server: speech stopped at {response.speech_stopped.audio_end_ms} ms")
        elif kind == "committed":
            self.first_turn = self.first_turn or response.turn_id
            print("  server: turn committed; assistant: ", end="", flush=True)
        elif kind == "text":
            print(response.text.text, end="", flush=True)
        elif kind == "audio" and not self.first_audio_at:
            self.first_audio_at = now
        elif kind == "interrupted":
            self.interrupted_at = now
            print("\n  server: reply interrupted by the user's voice")
        elif kind == "truncated":
            print(f"  server: stored reply cut to what was heard: {response.truncated.text!r}")
        elif kind == "done":
            reason = pb.StopReason.Name(response.done.stop_reason)
            print(f"\n  server: reply done [{reason}]")
        elif kind == "warning":
            print(f"  server warning: {response.warning.message}")

    async def wait(self, kind: str, count: int = 1, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.seen.get(kind, 0) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"live demo: no {kind!r} from the server in {timeout_s:.0f} s")
            await asyncio.sleep(0.02)
