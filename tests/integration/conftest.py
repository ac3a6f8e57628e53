"""Real servers on loopback for integration tests (never fakes)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from iomni.triton.server import TritonPorts, TritonServer

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
