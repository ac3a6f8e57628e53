"""A whole gateway in this process for fuzzing: the real gRPC server, servicer, turn core and
Realtime endpoint, the tiny model in-process and the in-memory dialogue store (no Triton, no
Redis: fuzzing is about what the front doors do with bad input, thousands of times)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from iomni.auth import Tenants, key_hash
from iomni.gateway.registration import add_dialogue_service
from iomni.gateway.service import DialogueService
from iomni.realtime.server import RealtimeServer
from iomni.runtime.build import Runtime, build_runner
from iomni.runtime.settings import Settings
from iomni.telemetry.metrics import GatewayMetrics

KEYS = {"acme": "acme-fuzz-key", "globex": "globex-fuzz-key"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FuzzGateway:
    target: str
    realtime_port: int
    runtime: Runtime
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine):  # type: ignore[no-untyped-def]
        """Run a coroutine on the gateway's loop (its store, its runner) and wait."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)


@pytest.fixture(scope="session")
def fuzz_gateway(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzGateway]:
    tenants = tmp_path_factory.mktemp("fuzz") / "tenants.json"
    tenants.write_text(
        json.dumps(
            {"tenants": [{"name": n, "api_key_sha256": [key_hash(k)]} for n, k in KEYS.items()]}
        )
    )
    settings = Settings(
        model=tiny_dir,
        transport="inprocess",
        redis_url="memory",
        max_message_mb=4,
        turn_timeout_s=20,
        stream_idle_timeout_s=10,
    )
    port, realtime_port = _port(), _port()
    ready = threading.Event()
    state: dict = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        metrics = GatewayMetrics()
        runtime = build_runner(settings, role="fuzz", observer=metrics)
        service = DialogueService(
            runtime.runner, runtime.store, Tenants.from_file(tenants), metrics, idle_timeout_s=10
        )
        options = [
            ("grpc.max_receive_message_length", settings.max_turn_bytes),
            ("grpc.max_send_message_length", settings.max_turn_bytes),
        ]
        server = grpc.aio.server(options=options)
        add_dialogue_service(service, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        realtime = RealtimeServer(
            runtime.runner,
            runtime.store,
            service.tenants,
            metrics,
            serving=lambda: True,
            max_message_bytes=settings.max_turn_bytes,
        )

        async def start() -> None:
            await server.start()
            await realtime.start("127.0.0.1", realtime_port)
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()
            await realtime.stop()
            await server.stop(1)
            await runtime.close()

        state.update(loop=loop, runtime=runtime)
        loop.run_until_complete(start())

    thread = threading.Thread(target=serve, name="fuzz-gateway", daemon=True)
    thread.start()
    assert ready.wait(120), "the fuzz gateway did not start"
    gateway = FuzzGateway(f"127.0.0.1:{port}", realtime_port, state["runtime"], state["loop"])
    yield gateway
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(30)
