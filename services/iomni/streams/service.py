"""The `iomni worker` process: engine over Triton, Redis state, Kafka in and out."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

from prometheus_client import start_http_server

from iomni.engine.runner import RunnerLimits, TurnRunner
from iomni.engine.turn import TurnEngine
from iomni.model.checkpoint import fingerprint
from iomni.model.processor import Processor
from iomni.state import DialogueState
from iomni.streams.topics import StreamSettings
from iomni.streams.worker import TurnWorker, WorkerMetrics
from iomni.telemetry import tracing
from iomni.telemetry.metrics import GatewayMetrics
from iomni.triton.client import TritonParts, part_urls
from iomni.triton.tensors import AUDIO_EMBEDS, IMAGE_EMBEDS


def build_worker(args: argparse.Namespace) -> tuple[TurnWorker, DialogueState, TritonParts]:
    processor = Processor.from_checkpoint(args.model)
    special = processor.tokenizer.special
    state = DialogueState.from_url(args.redis, lease_ttl_ms=args.lease_ttl_ms)
    parts = TritonParts(
        args.triton,
        fingerprint(args.model),
        {special.img_context: IMAGE_EMBEDS, special.audio_context: AUDIO_EMBEDS},
    )
    parts.model_urls = part_urls(args.triton_vision, args.triton_audio, args.triton_speech)
    engine = TurnEngine(
        parts, processor, embeddings=state.embedding_cache(), media=state.media_store()
    )
    owner = f"{socket.gethostname()}-{os.getpid()}-worker"
    runner = TurnRunner(
        engine,
        state,
        GatewayMetrics(),
        RunnerLimits(max_concurrent_turns=args.max_in_flight),
        owner,
    )
    settings = StreamSettings(
        bootstrap=args.bootstrap,
        partitions=args.partitions,
        group_id=args.group,
        session_timeout_ms=args.session_timeout_ms,
        max_in_flight=args.max_in_flight,
    )
    metrics = WorkerMetrics()
    return TurnWorker(runner, state, settings, metrics), state, parts


def run_worker(args: argparse.Namespace) -> int:
    tracing.configure("iomni-worker")
    worker, state, parts = build_worker(args)
    start_http_server(args.metrics_port, registry=worker.metrics.registry)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopping.set)
        try:
            await worker.run()
        finally:
            await parts.close()
            await state.aclose()

    asyncio.run(main())
    return 0
