"""The `iomni worker` process: the turn core built once (`build_runner`), Kafka in and out,
the same turn metrics as the gateway on its own /metrics port."""

from __future__ import annotations

import asyncio
import signal

from prometheus_client import start_http_server

from iomni.runtime.build import Runtime, build_runner
from iomni.runtime.settings import Settings
from iomni.streams.topics import StreamSettings
from iomni.streams.worker import TurnWorker, WorkerMetrics
from iomni.telemetry import tracing


def build_worker(settings: Settings) -> tuple[TurnWorker, Runtime]:
    metrics = WorkerMetrics()
    runtime = build_runner(settings, role="worker", observer=metrics)
    streams = StreamSettings(
        bootstrap=settings.bootstrap,
        partitions=settings.partitions,
        group_id=settings.group,
        session_timeout_ms=settings.session_timeout_ms,
        max_in_flight=settings.max_in_flight,
    )
    return TurnWorker(runtime.runner, runtime.store, streams, metrics), runtime


def run_worker(settings: Settings) -> int:
    tracing.configure("iomni-worker")
    worker, runtime = build_worker(settings)
    start_http_server(
        settings.metrics_port, settings.metrics_host, registry=worker.metrics.registry
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopping.set)
        await runtime.start()
        try:
            await worker.run()
        finally:
            await runtime.close()

    asyncio.run(main())
    return 0
