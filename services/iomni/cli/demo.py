"""`make demo`: a 3-turn audio-visual conversation, in-process, on a generated checkpoint.

Turn 1 shows an image, turn 2 a short video, turn 3 asks a spoken question (synthesised with
espeak-ng). Each reply is printed with its per-stage timings and time to first audio, and its
speech is written to reply-N.wav. The weights are random, so the replies are pseudo-words and
the speech is noise: the demo shows the pipeline, not the model's knowledge.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from iomni.engine.cache import MemoryMediaStore
from iomni.engine.events import AudioChunk, TextDelta, TurnDone
from iomni.engine.parts import InProcessParts, SpeechOptions
from iomni.engine.turn import TurnEngine, TurnRequest
from iomni.model.checkpoint import load_checkpoint
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.media import write_test_video
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams

QUESTION = "What was on the table in the picture, and what moved in the video?"


def make_assets(workdir: Path) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "table.png"
    canvas = Image.new("RGB", (800, 600), (236, 226, 208))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 420, 800, 600), fill=(120, 84, 52))
    draw.ellipse((180, 250, 360, 430), fill=(200, 40, 40))
    draw.rectangle((480, 280, 600, 430), fill=(40, 90, 200))
    canvas.save(image)
    video = workdir / "motion.mp4"
    write_test_video(video, seconds=2.0, fps=8)
    speech = workdir / "question.wav"
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed; run `make setup` (it installs it)")
    subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(speech), QUESTION], check=True)
    return {"image": image, "video": video, "audio": speech}


async def converse(model: Path, assets: dict[str, Path], seed: int, workdir: Path) -> None:
    parts = InProcessParts(load_checkpoint(model))
    parts.prepare_speech()
    engine = TurnEngine(parts, Processor.from_checkpoint(model), media=MemoryMediaStore())
    turns = [
        [
            MediaPart.from_bytes("image", assets["image"].read_bytes()),
            TextPart("Describe this picture."),
        ],
        [
            MediaPart.from_bytes("video", assets["video"].read_bytes(), num_frames=8),
            TextPart("What happens in this video?"),
        ],
        [MediaPart.from_bytes("audio", assets["audio"].read_bytes())],
    ]
    history: list[Message] = []
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=32, seed=seed)
    for number, parts in enumerate(turns, start=1):
        kinds = ", ".join(p.type for p in parts)
        print(f"\n--- turn {number} (user sends: {kinds})")
        print("assistant: ", end="", flush=True)
        request = TurnRequest(
            user=Message("user", tuple(parts)),
            history=history,
            params=params,
            speech=SpeechOptions(seed=seed),
            session_id="demo",
        )
        audio: list[bytes] = []
        async for event in engine.start(request).events():
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, AudioChunk):
                audio.append(event.pcm)
            elif isinstance(event, TurnDone):
                history += list(event.record)
                wav = workdir / f"reply-{number}.wav"
                sf.write(wav, np.frombuffer(b"".join(audio), dtype="<i2"), 24000, subtype="PCM_16")
                _print_done(event, wav)


def _print_done(done: TurnDone, wav: Path) -> None:
    u = done.usage
    print(
        f"\n  [{done.stop_reason}] prompt {u.prompt_tokens} tokens (image {u.image_tokens}, "
        f"audio {u.audio_tokens}), generated {u.completion_tokens}, media encoded "
        f"{u.media_encoded}, from cache {u.media_cache_hits}"
    )
    first_audio = done.timings_ms.get("first_audio")
    ttfa = f"{first_audio:.0f} ms" if first_audio is not None else "n/a"
    print(
        f"  speech: {u.audio_ms / 1000:.2f} s ({u.speech_tokens} speech tokens) -> {wav}; "
        f"time to first audio {ttfa}"
    )
    order = [
        "vision_encode",
        "audio_encode",
        "prefill",
        "first_token",
        "first_audio",
        "speech",
        "decode",
        "total",
    ]
    stages = "  ".join(f"{k} {done.timings_ms[k]:.0f} ms" for k in order if k in done.timings_ms)
    print(f"  timings: {stages}")


def kafka_turn(bootstrap: str, session_id: str, workdir: Path) -> None:
    """A fourth turn of the same session, through Kafka and the turn worker."""
    import time

    from iomni.streams.client import TurnFollower, submit, turn_request
    from iomni.streams.topics import StreamSettings
    from iomni.v1 import dialogue_pb2 as pb

    settings = StreamSettings(bootstrap=bootstrap)
    request = turn_request(
        "dev",
        session_id,
        [pb.Part(text="And one more, via Kafka.")],
        sampling=pb.SamplingOptions(max_new_tokens=24, temperature=0.8),
        output=pb.OutputOptions(speech=True),
    )
    print(f"\n--- turn 4 (user sends: text, via Kafka {bootstrap} and the turn worker)")
    print("assistant: ", end="", flush=True)
    follower = TurnFollower(settings)
    audio, first_audio, sent = bytearray(), None, time.perf_counter()
    try:
        submit(settings, request)
        for event in follower.events(request.turn_id, 180):
            if follower.restarted:  # a worker died mid-turn: keep only the new attempt
                audio.clear()
                print("\n  (restarted by another worker) ", end="")
            kind = event.WhichOneof("payload")
            if kind == "text":
                print(event.text.text, end="", flush=True)
            elif kind == "audio":
                audio.extend(event.audio.pcm)
                first_audio = first_audio or (time.perf_counter() - sent) * 1000
            elif kind == "failed":
                raise SystemExit(f"\nturn failed: {event.failed.code}: {event.failed.message}")
    finally:
        follower.close()
    wav = workdir / "reply-4.wav"
    sf.write(wav, np.frombuffer(bytes(audio), dtype="<i2"), 24000, subtype="PCM_16")
    ttfa = f"{first_audio:.0f} ms" if first_audio is not None else "n/a"
    print(f"\n  speech -> {wav}; request to first audio (Kafka, client side) {ttfa}")


def converse_remote(
    server: str, assets: dict[str, Path], seed: int, workdir: Path, kafka: str = ""
) -> None:
    """The same three turns through the gateway over gRPC (Chat, one session)."""
    import time
    import uuid

    from iomni.client import DialogueClient, Reply, chat_request, find_api_key
    from iomni.v1 import dialogue_pb2 as pb

    client = DialogueClient(server, find_api_key())
    session_id = ""
    turns = [
        {"images": [assets["image"].read_bytes()], "text": "Describe this picture."},
        {"video": assets["video"].read_bytes(), "text": "What happens in this video?"},
        {"audio": assets["audio"].read_bytes()},
    ]
    sampling = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_new_tokens": 32, "seed": seed}
    try:
        for number, turn in enumerate(turns, start=1):
            kinds = ", ".join(k.rstrip("s") for k in turn if k != "text") or "text"
            print(f"\n--- turn {number} (user sends: {kinds}, via gateway {server})")
            print("assistant: ", end="", flush=True)
            request = chat_request(session_id, uuid.uuid4().hex, speech=True, **turn, **sampling)
            reply, sent, first_audio = Reply(), time.perf_counter(), None
            for response in client.chat_stream(request):
                reply.add(response)
                kind = response.WhichOneof("payload")
                if kind == "text":
                    print(response.text.text, end="", flush=True)
                elif kind == "audio" and first_audio is None:
                    first_audio = (time.perf_counter() - sent) * 1000
            session_id = reply.session_id
            wav = workdir / f"reply-{number}.wav"
            sf.write(wav, np.frombuffer(bytes(reply.audio), dtype="<i2"), 24000, subtype="PCM_16")
            done = reply.done
            ttfa = f"{first_audio:.0f} ms" if first_audio is not None else "n/a"
            print(
                f"\n  [{pb.StopReason.Name(done.stop_reason)}] prompt {done.usage.prompt_tokens} "
                f"tokens ({done.usage.prompt_tokens_reused} from the llm's KV cache), generated "
                f"{done.usage.completion_tokens}, media from cache "
                f"{done.usage.media_cache_hits}"
            )
            print(
                f"  speech: {done.usage.audio_ms / 1000:.2f} s -> {wav}; time to first audio "
                f"(client side) {ttfa}"
            )
            stages = "  ".join(
                f"{k} {v:.0f} ms" for k, v in done.timings_ms.items() if k != "reused_tokens"
            )
            print(f"  timings: {stages}")
        print(f"\nsession {session_id}: {client.get_session(session_id).turns} turns stored")
        if kafka:
            kafka_turn(kafka, session_id, workdir)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="checkpoint: run in-process")
    parser.add_argument("--server", help="gateway host:port: run through gRPC")
    parser.add_argument("--kafka", default="", help="also send a turn through this broker")
    parser.add_argument(
        "--live", action="store_true", help="also a live turn and a barge-in (with --server)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    assets = make_assets(args.workdir)
    print(f"assets: {', '.join(str(p) for p in assets.values())}")
    if args.server:
        converse_remote(args.server, assets, args.seed, args.workdir, args.kafka)
        if args.live:
            from iomni.cli.demo_live import live_demo

            asyncio.run(live_demo(args.server, args.workdir))
    elif args.model:
        asyncio.run(converse(args.model, assets, args.seed, args.workdir))
    else:
        parser.error("give --server HOST:PORT or --model DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
