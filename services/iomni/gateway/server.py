"""`iomni gateway`: the gRPC server process.

Health is NOT_SERVING until Redis answers and every Triton model is ready (re-checked in the
background). SIGTERM drains: health goes NOT_SERVING, new turns are refused with UNAVAILABLE,
in-flight turns get `grace_s` to finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from iomni.auth import Tenants
from iomni.errors import InvalidInput, IomniError
from iomni.gateway.registration import add_dialogue_service
from iomni.gateway.service import DialogueService
from iomni.realtime.connection import Limits
from iomni.realtime.server import RealtimeServer
from iomni.runtime.build import build_runner
from iomni.runtime.settings import Settings
from iomni.telemetry.metrics import GatewayMetrics
from iomni.v1 import dialogue_pb2

log = logging.getLogger(__name__)
SERVICE_NAME = "iomni.v1.Dialogue"
HEALTH_PERIOD_S = 1.0


def _event_log(bootstrap: str):  # type: ignore[no-untyped-def]
    from iomni.streams.publisher import FrontDoorEventLog, make_producer
    from iomni.streams.topics import StreamSettings, ensure_topics

    settings = StreamSettings(bootstrap=bootstrap)
    ensure_topics(settings)
    producer = make_producer(bootstrap, "iomni-gateway")
    return FrontDoorEventLog(producer, settings.events_topic, "gateway")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        if settings.tenants is None:
            raise InvalidInput("the gateway needs --tenants FILE (API key hashes)")
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.health = health.aio.HealthServicer()
        self.runtime = build_runner(settings, role="gateway", observer=self.metrics)
        self.runner = self.runtime.runner
        event_log = _event_log(settings.events_bootstrap) if settings.events_bootstrap else None
        self.service = DialogueService(
            self.runner,
            self.runtime.store,
            Tenants.from_file(settings.tenants),
            self.metrics,
            event_log,
            idle_timeout_s=settings.stream_idle_timeout_s,
        )
        self.server: grpc.aio.Server | None = None
        self.realtime: RealtimeServer | None = None
        self.serving = False  # what health says (also the Realtime port's /readyz)
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.settings.max_turn_bytes),
            ("grpc.max_send_message_length", self.settings.max_turn_bytes),
        ]
        self.server = grpc.aio.server(options=options)
        add_dialogue_service(self.service, self.server)
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
        start_http_server(
            self.settings.metrics_port, self.settings.metrics_host, registry=self.metrics.registry
        )
        await self.runtime.start()
        if self.settings.realtime_port:
            self.realtime = RealtimeServer(
                self.runner,
                self.runtime.store,
                self.service.tenants,
                self.metrics,
                serving=lambda: self.serving and not self.runner.draining,
                limits=Limits(
                    send_queue=self.settings.realtime_send_queue,
                    idle_timeout_s=self.settings.realtime_idle_timeout_s,
                ),
                max_message_bytes=self.settings.max_turn_bytes,
            )
            await self.realtime.start(self.settings.realtime_host, self.settings.realtime_port)
        self._watch = asyncio.create_task(self._watch_dependencies())
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
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_dependencies(self) -> None:
        """SERVING only while Redis answers and every Triton model is ready."""
        serving: bool | None = None
        while not self._stopping.is_set():
            try:
                await self.runtime.check_ready()
                ok = True
            except IomniError as exc:
                if serving is not False:
                    log.warning("not serving: %s", exc.detail)
                ok = False
            if ok and serving is False:
                log.warning("serving again")
            serving = ok
            if not self.runner.draining:
                await self._set_health(ok)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=HEALTH_PERIOD_S)

    async def drain_and_stop(self) -> None:
        self.runner.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = asyncio.get_running_loop().time() + self.settings.grace_s
        while self.runner.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        self._stopping.set()
        if self.realtime is not None:
            await self.realtime.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.runtime.close()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        realtime = (
            f", realtime ws://{self.settings.realtime_host}:{self.settings.realtime_port}/v1/realtime"
            if self.realtime
            else ""
        )
        print(f"gateway ready on {self.settings.host}:{self.settings.port}{realtime}", flush=True)
        await stop.wait()
        log.info("draining: %d turns in flight", self.runner.active)
        await self.drain_and_stop()
