"""`iomni` subcommands: make-checkpoint, inspect-checkpoint, chat."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from iomni.errors import ErrorCode, IomniError
from iomni.runtime.settings import add_settings_flags

log = logging.getLogger("iomni")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iomni", description="InteractiveOmni serving platform")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint")
    make.add_argument("--size", required=True, choices=["tiny", "small", "4b", "8b"])
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--max-shard-gb", type=float, default=None)

    inspect = sub.add_parser("inspect-checkpoint", help="parameters per part and key report")
    inspect.add_argument("path", type=Path)

    triton = sub.add_parser("triton", help="the Triton model repository and server")
    triton_sub = triton.add_subparsers(dest="triton_command", required=True)
    serve = triton_sub.add_parser("serve", help="run tritonserver on loopback until SIGTERM")
    serve.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    serve.add_argument("--repository", type=Path, default=Path("model_repository"))
    serve.add_argument("--work", type=Path, default=Path(".cache/triton"))
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--ready-timeout", type=float, default=300)
    serve.add_argument(
        "--grace", type=float, default=10, help="seconds live streams get to finish on SIGTERM"
    )
    serve.add_argument("--models", nargs="+", default=None, help="subset of models to load")
    render = triton_sub.add_parser("render", help="write the repository for a profile")
    render.add_argument("--profile", required=True, choices=["cpu", "gpu"])
    render.add_argument("--out", required=True, type=Path)
    render.add_argument("--repository", type=Path, default=Path("model_repository"))

    gateway = sub.add_parser("gateway", help="the gRPC dialogue gateway")
    add_settings_flags(gateway, "gateway")
    worker = sub.add_parser("worker", help="Kafka turn worker (consumer group)")
    add_settings_flags(worker, "worker")

    submit = sub.add_parser("submit", help="send one turn through Kafka and follow its events")
    submit.add_argument("--bootstrap", default="127.0.0.1:9092")
    submit.add_argument("--tenant", default="dev")
    submit.add_argument("--session", required=True, help="session id")
    submit.add_argument("--turn-id", default="")
    submit.add_argument("--text", default="")
    submit.add_argument("--image", action="append", type=Path, default=[])
    submit.add_argument("--audio", type=Path)
    submit.add_argument("--video", type=Path)
    submit.add_argument("--max-new-tokens", type=int, default=64)
    submit.add_argument("--temperature", type=float, default=0.7)
    submit.add_argument("--out", type=Path, help="write the spoken reply here (speech on)")
    submit.add_argument("--timeout", type=float, default=300)

    export = sub.add_parser("export", help="export the encoders for TensorRT")
    export_sub = export.add_subparsers(dest="export_format", required=True)
    onnx = export_sub.add_parser("onnx", help="ONNX with dynamic batch (vision, audio)")
    onnx.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    onnx.add_argument("--out", required=True, type=Path)

    chat = sub.add_parser("chat", help="one turn of a conversation kept in a session file")
    chat.add_argument("--model", type=Path, help="checkpoint directory (in-process)")
    chat.add_argument("--server", help="gateway host:port instead of running in-process")
    chat.add_argument("--api-key", help="default: $IOMNI_API_KEY, else .run/api_key")
    chat.add_argument("--tls-ca", type=Path, help="CA bundle to verify the gateway (TLS)")
    chat.add_argument("--session", required=True, type=Path, help="JSON file with the history")
    chat.add_argument("--image", action="append", type=Path, default=[])
    chat.add_argument("--video", type=Path)
    chat.add_argument("--video-frames", type=int, default=8)
    chat.add_argument("--audio", type=Path)
    chat.add_argument("--text", default="")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--top-k", type=int, default=50)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--out", type=Path, help="speak the reply and write it to this WAV file")
    chat.add_argument("--speaker", type=Path, help="reference WAV to clone the voice from")
    chat.add_argument("--timings", action="store_true", help="print per-stage timings to stderr")
    chat.add_argument(
        "--live",
        action="store_true",
        help="live conversation: stream --audio (a recording, or - for PCM16 16 kHz on stdin) "
        "as a microphone; the server side detects turns and barge-in",
    )
    chat.add_argument("--speed", type=float, default=1.0, help="--live: times real time")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _quiet_libraries()
    try:
        if args.command == "make-checkpoint":
            return _make_checkpoint(args)
        if args.command == "inspect-checkpoint":
            return _inspect(args)
        if args.command == "triton":
            return _triton(args)
        if args.command == "export":
            return _export(args)
        if args.command == "gateway":
            return _gateway(args)
        if args.command == "worker":
            return _worker(args)
        if args.command == "submit":
            return _submit(args)
        if args.command == "chat" and args.server:
            return _chat_remote(args)
        return asyncio.run(_chat(args))
    except IomniError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2 if exc.code is ErrorCode.INVALID_INPUT else 1
    except KeyboardInterrupt:
        return 130


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def _make_checkpoint(args: argparse.Namespace) -> int:
    from iomni.model.generate import describe, make_checkpoint

    shard = int(args.max_shard_gb * (1 << 30)) if args.max_shard_gb else None
    make_checkpoint(args.size, args.out, seed=args.seed, max_shard_bytes=shard)
    info = describe(args.out)
    print(
        f"wrote {args.size} checkpoint to {args.out}: {info['total_bytes'] / 1e6:.1f} MB "
        f"in {info['shards']} shard(s)"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from iomni.model.checkpoint import (
        key_report,
        meta_model,
        part_parameter_counts,
        stored_shapes,
    )
    from iomni.model.config import InteractiveOmniConfig

    config = InteractiveOmniConfig.from_file(args.path / "config.json")
    stored = stored_shapes(args.path)
    report = key_report(meta_model(config), stored)
    total = 0
    print(f"checkpoint: {args.path}")
    print(f"{'prefix':<16}{'part':<34}{'parameters':>16}")
    for prefix, name, count in part_parameter_counts(stored):
        total += count
        print(f"{prefix:<16}{name:<34}{count:>16,}")
    print(f"{'total':<50}{total:>16,}")
    for line in report.lines():
        print(line)
    return 1 if report.missing else 0


def _triton(args: argparse.Namespace) -> int:
    if args.triton_command == "render":
        from iomni.triton.repository import render

        for path in render(args.repository, args.out, args.profile):
            print(path)
        return 0
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from iomni.triton.server import TritonPorts, TritonServer

    if not (args.model / "config.json").exists():
        from iomni.errors import CheckpointError

        raise CheckpointError(f"{args.model} is not a checkpoint directory (no config.json)")
    server = TritonServer(
        args.repository,
        args.model,
        args.work,
        TritonPorts(args.http_port, args.grpc_port, args.metrics_port),
    )
    if args.models:
        server.models = tuple(args.models)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start(timeout_s=args.ready_timeout)
        print(
            f"triton ready: grpc {server.grpc_url}, http {server.http_url}, metrics "
            f"127.0.0.1:{args.metrics_port}; log {server.log_file}",
            flush=True,
        )
        while not stop.wait(1.0):
            if server.process is not None and server.process.poll() is not None:
                print(f"error: tritonserver exited; see {server.log_file}", file=sys.stderr)
                return 1
    finally:
        server.stop(grace_s=args.grace)
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from iomni.gateway.server import Gateway
    from iomni.runtime.settings import Settings
    from iomni.telemetry import tracing

    tracing.configure("iomni-gateway")
    settings = Settings.resolve("gateway", args)
    asyncio.run(Gateway(settings).serve_forever())
    return 0


def _worker(args: argparse.Namespace) -> int:
    from iomni.runtime.settings import Settings
    from iomni.streams.service import run_worker

    return run_worker(Settings.resolve("worker", args))


def _submit(args: argparse.Namespace) -> int:
    from iomni.streams.client import TurnFollower, submit, turn_request
    from iomni.streams.topics import StreamSettings, ensure_topics
    from iomni.v1 import dialogue_pb2 as pb

    parts = [pb.Part(image=_read(p, "--image")) for p in args.image]
    if args.video:
        parts.append(pb.Part(video=_read(args.video, "--video")))
    if args.audio:
        parts.append(pb.Part(audio=_read(args.audio, "--audio")))
    if args.text:
        parts.append(pb.Part(text=args.text))
    settings = StreamSettings(bootstrap=args.bootstrap)
    ensure_topics(settings)
    request = turn_request(
        args.tenant,
        args.session,
        parts,
        args.turn_id,
        sampling=pb.SamplingOptions(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature
        ),
        output=pb.OutputOptions(speech=bool(args.out)),
    )
    follower = TurnFollower(settings)
    audio = bytearray()
    try:
        submit(settings, request)
        for event in follower.events(request.turn_id, args.timeout):
            kind = event.WhichOneof("payload")
            if follower.restarted:
                print("\n[a worker died mid-turn; another one starts it over]", file=sys.stderr)
                sys.stdout.write("\n")
                audio.clear()
            if kind == "text":
                sys.stdout.write(event.text.text)
                sys.stdout.flush()
            elif kind == "audio":
                audio.extend(event.audio.pcm)
            elif kind == "failed":
                print(f"\nerror: {event.failed.code}: {event.failed.message}", file=sys.stderr)
                return 1
    finally:
        follower.close()
    sys.stdout.write("\n")
    if args.out:
        _write_wav(args.out, bytes(audio))
    return 0


def _chat_remote(args: argparse.Namespace) -> int:
    """`iomni chat --server`: the session lives in the gateway; the file keeps its id."""
    import json

    import grpc

    from iomni.client import DialogueClient, find_api_key
    from iomni.errors import InvalidInput

    key = find_api_key(args.api_key)
    if key is None:
        raise InvalidInput("no API key: pass --api-key, set IOMNI_API_KEY or run `make up`")
    session_id = ""
    if args.session.exists() and args.session.stat().st_size:
        try:
            session_id = json.loads(args.session.read_text()).get("session_id", "")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise InvalidInput(f"session file {args.session} is not valid: {exc}") from exc
    sampling = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.seed is not None:
        sampling["seed"] = args.seed
    client = DialogueClient(args.server, key, tls_ca=args.tls_ca)
    try:
        reply = _stream_reply(client, session_id, args, sampling)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    finally:
        client.close()
    args.session.write_text(json.dumps({"version": 1, "session_id": reply.session_id}) + "\n")
    if args.out:
        _write_wav(args.out, bytes(reply.audio))
    if args.timings and reply.done is not None:
        stages = " ".join(f"{k}={v:.1f}ms" for k, v in reply.done.timings_ms.items())
        from iomni.v1 import dialogue_pb2 as pb

        reason = pb.StopReason.Name(reply.done.stop_reason).removeprefix("STOP_REASON_").lower()
        print(
            f"[{reason}] {reply.done.usage.completion_tokens} tokens, "
            f"{reply.done.usage.prompt_tokens_reused} prompt tokens from KV cache; {stages}",
            file=sys.stderr,
        )
    return 0


def _stream_reply(client, session_id: str, args: argparse.Namespace, sampling: dict):  # type: ignore[no-untyped-def]
    import uuid

    from iomni.client import Reply, chat_request

    request = chat_request(
        session_id,
        uuid.uuid4().hex,
        text=args.text,
        images=[_read(p, "--image") for p in args.image],
        audio=_read(args.audio, "--audio") if args.audio else None,
        video=_read(args.video, "--video") if args.video else None,
        speech=bool(args.out),
        speaker_wav=_read(args.speaker, "--speaker") if args.speaker else None,
        **sampling,
    )
    reply = Reply()
    for response in client.chat_stream(request):
        reply.add(response)
        if response.WhichOneof("payload") == "text":
            sys.stdout.write(response.text.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return reply


def _export(args: argparse.Namespace) -> int:
    from iomni.model.export import export_encoders

    for name, path in export_encoders(args.model, args.out).items():
        print(f"{name}: {path}")
    return 0


def _write_wav(path: Path, pcm: bytes) -> None:
    import numpy as np
    import soundfile as sf

    sf.write(path, np.frombuffer(pcm, dtype="<i2"), 24000, subtype="PCM_16")


async def _chat(args: argparse.Namespace) -> int:
    """`iomni chat --model`: the turn core in this process, the dialogue in a session file."""
    import uuid

    from iomni.cli.session_file import LOCAL_TENANT, SessionFile, SessionFileStore
    from iomni.engine.events import AudioChunk, TextDelta
    from iomni.errors import InvalidInput
    from iomni.parts import SpeechOptions
    from iomni.runtime.build import build_runner
    from iomni.runtime.settings import Settings
    from iomni.turns.runner import TurnFinished, TurnInput, TurnOutput

    if args.model is None:
        raise InvalidInput("chat needs --model DIR (in-process) or --server HOST:PORT")
    if args.speaker and not args.out:
        raise InvalidInput("--speaker only makes sense with --out (speech output)")
    user = None if args.live else _user_message(args)
    params = _sampling(args)
    speech = None
    if args.out:
        speaker = _read(args.speaker, "--speaker") if args.speaker else None
        speech = SpeechOptions(speaker_wav=speaker, seed=args.seed or 0)
    store = SessionFileStore(SessionFile.open(args.session))
    settings = Settings(model=args.model, transport="inprocess", redis_url="memory")
    # One turn: rendering in a process of its own saves ~40 ms of first audio and costs ~3 s
    # to start. A live conversation runs many turns.
    one_turn = None if args.live else False
    runtime = build_runner(settings, role="chat", store=store, speech_process=one_turn)
    audio: list[bytes] = []

    async def show(output: TurnOutput) -> None:
        if isinstance(output, TextDelta):
            sys.stdout.write(output.text)
            sys.stdout.flush()
        elif isinstance(output, AudioChunk):
            audio.append(output.pcm)
        elif isinstance(output, TurnFinished):
            sys.stdout.write("\n")
            if args.out:
                _write_wav(args.out, b"".join(audio))
            if args.timings:
                stages = " ".join(f"{k}={v:.1f}ms" for k, v in output.timings_ms.items())
                print(
                    f"[{output.stop_reason}] {output.usage.completion_tokens} tokens; {stages}",
                    file=sys.stderr,
                )

    try:
        if args.live:
            from iomni.cli.live import run_live

            return await run_live(args, runtime, store, params, speech)
        turn = TurnInput(LOCAL_TENANT, store.session_id, uuid.uuid4().hex, user, params, speech)
        await runtime.runner.run(turn, show)
    finally:
        await runtime.close()
    return 0


def _user_message(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from iomni.model.conversation import MediaPart, Message, TextPart

    parts: list[TextPart | MediaPart] = [
        MediaPart.from_bytes("image", _read(p, "--image")) for p in args.image
    ]
    if args.video:
        video = _read(args.video, "--video")
        parts.append(MediaPart.from_bytes("video", video, num_frames=args.video_frames))
    if args.audio:
        parts.append(MediaPart.from_bytes("audio", _read(args.audio, "--audio")))
    if args.text:
        parts.append(TextPart(args.text))
    return Message("user", tuple(parts))


def _sampling(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from iomni.model.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    ).validate()


def _read(path: Path, flag: str) -> bytes:
    from iomni.errors import InvalidInput

    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{flag} {path}: {exc.strerror or exc}") from exc


if __name__ == "__main__":
    sys.exit(main())
