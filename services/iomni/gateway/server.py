"""`iomni gateway`: the gRPC server process.

Health is NOT_SERVING until Redis answers and every Triton model is ready (re-checked in the
background). SIGTERM drains: health goes NOT_SERVING, new turns are refused with UNAVAILABLE,
in-flight turns get `grace_s` to finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from iomni.engine.runner import RunnerLimits, TurnRunner
from iomni.engine.turn import TurnEngine, TurnLimits
from iomni.errors import IomniError
from iomni.gateway.affinity import AffinityRouter
from iomni.gateway.auth import Tenants
from iomni.gateway.service import DialogueService
from iomni.model.checkpoint import fingerprint
from iomni.model.media import MediaLimits
from iomni.model.processor import Processor
from iomni.state import DialogueState
from iomni.telemetry.metrics import GatewayMetrics
from iomni.triton.client import TritonParts
from iomni.triton.tensors import AUDIO_EMBEDS, IMAGE_EMBEDS
from iomni.v1 import dialogue_pb2, dialogue_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "iomni.v1.Dialogue"


@dataclass
class GatewaySettings:
    model: Path
    tenants: Path
    triton_url: str = "127.0.0.1:8001"
    llm_replicas: list[str] = field(default_factory=list)  # default: [triton_url]
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9464
    max_concurrent_turns: int = 16
    max_message_bytes: int = 32 << 20
    max_media_per_turn: int = 16
    max_audio_seconds: float = 300.0
    turn_timeout_s: float = 300.0
    grace_s: float = 30.0
    lease_ttl_ms: int = 30000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, clients must present a certificate
    reflection: bool = True
    events_bootstrap: str = ""  # set: publish every turn's events to the Kafka event log
    model_urls: dict[str, str] = field(default_factory=dict)  # part -> host:port (Kubernetes)
    llm_service: str = ""  # headless Service whose EndpointSlices list the llm replicas
    namespace: str = "default"


def _event_log(bootstrap: str):  # type: ignore[no-untyped-def]
    from iomni.streams.publisher import TurnPublisher, make_producer
    from iomni.streams.topics import StreamSettings, ensure_topics

    settings = StreamSettings(bootstrap=bootstrap)
    ensure_topics(settings)
    producer = make_producer(bootstrap, "iomni-gateway")
    return lambda session_id, turn_id: TurnPublisher(
        producer, settings.events_topic, session_id, turn_id, "gateway"
    )


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.health = health.aio.HealthServicer()
        self.state = DialogueState.from_url(settings.redis_url, lease_ttl_ms=settings.lease_ttl_ms)
        processor = Processor.from_checkpoint(
            settings.model, MediaLimits(max_audio_seconds=settings.max_audio_seconds)
        )
        special = processor.tokenizer.special
        self.router = AffinityRouter(
            self.state,
            settings.llm_replicas or [settings.triton_url],
            on_result=lambda r: self.metrics.kv_affinity.labels(r).inc(),
        )
        self.parts = TritonParts(
            settings.triton_url,
            fingerprint(settings.model),
            {special.img_context: IMAGE_EMBEDS, special.audio_context: AUDIO_EMBEDS},
            llm_router=self.router,
        )
        engine = TurnEngine(
            self.parts,
            processor,
            embeddings=self.state.embedding_cache(),
            media=self.state.media_store(),
            limits=TurnLimits(max_media_per_turn=settings.max_media_per_turn),
        )
        owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.runner = TurnRunner(
            engine,
            self.state,
            self.metrics,
            RunnerLimits(
                settings.max_concurrent_turns, settings.turn_timeout_s, settings.max_message_bytes
            ),
            owner,
        )
        self.parts.model_urls = dict(settings.model_urls)
        self.discovery = None
        if settings.llm_service:
            from iomni.gateway.discovery import EndpointSliceWatcher

            self.router.update([])
            self.discovery = EndpointSliceWatcher(
                settings.llm_service, settings.namespace, self.router.update
            )
        if settings.events_bootstrap:
            self.runner.event_log = _event_log(settings.events_bootstrap)
        self.service = DialogueService(
            self.runner, self.state, Tenants.from_file(settings.tenants), self.metrics
        )
        self.server: grpc.aio.Server | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
        ]
        self.server = grpc.aio.server(options=options)
        dialogue_pb2_grpc.add_DialogueServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.reflection:
            names = (
                dialogue_pb2.DESCRIPTOR.services_by_name["Dialogue"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = self._credentials()
        if credentials is None:
            self.server.add_insecure_port(address)
        else:
            self.server.add_secure_port(address, credentials)
        await self._set_health(False)
        await self.server.start()
        start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
        self._watch = asyncio.create_task(self._watch_dependencies())
        if self.discovery is not None:
            self._discover = asyncio.create_task(self.discovery.run())
        log.info("gateway listening on %s, metrics on :%d", address, self.settings.metrics_port)

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None:
            return None
        client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],  # type: ignore[union-attr]
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_dependencies(self) -> None:
        """SERVING only while Redis answers and every Triton model is ready."""
        while not self._stopping.is_set():
            try:
                await self.state.ping()
                await self.parts.check_ready()
                ok = True
            except IomniError as exc:
                log.warning("not serving: %s", exc.detail)
                ok = False
            if not self.runner.draining:
                await self._set_health(ok)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=2.0)

    async def drain_and_stop(self) -> None:
        self.runner.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = asyncio.get_running_loop().time() + self.settings.grace_s
        while self.runner.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        self._stopping.set()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.parts.close()
        await self.state.aclose()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"gateway ready on {self.settings.host}:{self.settings.port}", flush=True)
        await stop.wait()
        log.info("draining: %d turns in flight", self.runner.active)
        await self.drain_and_stop()
