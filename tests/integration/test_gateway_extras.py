"""TLS and mutual TLS, server reflection, and `iomni chat --server` against a real gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from iomni.client import DialogueClient
from tests.integration.conftest import TENANT_KEYS, GatewayProcess

ACME = TENANT_KEYS["acme"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


def test_tls_and_mutual_tls(start_gateway, pki: Path) -> None:  # type: ignore[no-untyped-def]
    tls = start_gateway(
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), wait=False
    )
    mtls = start_gateway(
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(pki / "ca.pem"),
        wait=False,
    )
    for gateway in (tls, mtls):
        _wait_tls(gateway, pki)
    secure = DialogueClient(tls.target, ACME, tls_ca=pki / "ca.pem")
    assert secure.chat("", uuid.uuid4().hex, text="over TLS", max_new_tokens=3).done
    with pytest.raises(grpc.RpcError):  # plaintext to a TLS port
        DialogueClient(tls.target, ACME).get_session("x")
    with pytest.raises(grpc.RpcError) as info:  # no client certificate
        DialogueClient(mtls.target, ACME, tls_ca=pki / "ca.pem").get_session("x")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    mutual = DialogueClient(
        mtls.target,
        ACME,
        tls_ca=pki / "ca.pem",
        client_cert=pki / "client.pem",
        client_key=pki / "client.key",
    )
    assert mutual.chat("", uuid.uuid4().hex, text="over mTLS", max_new_tokens=3).done


def _wait_tls(gateway: GatewayProcess, pki: Path) -> None:
    import time

    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / "client.key").read_bytes(),
        (pki / "client.pem").read_bytes(),
    )
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with grpc.secure_channel(gateway.target, credentials) as channel:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=1)
                    .status
                )
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.3)
    raise RuntimeError(gateway.log.read_text()[-2000:])


def test_reflection_lists_the_services(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {"iomni.v1.Dialogue", "grpc.health.v1.Health"} <= names


def test_cli_chat_against_the_gateway(gateway: GatewayProcess, tmp_path: Path) -> None:
    session = tmp_path / "remote.json"
    env = {**os.environ, "IOMNI_API_KEY": ACME}
    command = [
        sys.executable,
        "-m",
        "iomni.cli",
        "chat",
        "--server",
        gateway.target,
        "--session",
        str(session),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    ]
    first = subprocess.run(
        [*command, "--text", "hello", "--out", str(tmp_path / "r.wav")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    session_id = json.loads(session.read_text())["session_id"]
    second = subprocess.run(
        [*command, "--text", "again"], env=env, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0, second.stderr
    assert DialogueClient(gateway.target, ACME).get_session(session_id).turns == 2
    assert (tmp_path / "r.wav").stat().st_size > 44
    bad = subprocess.run(
        [*command, "--text", "x"],
        env={**env, "IOMNI_API_KEY": "wrong"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().startswith("error: UNAUTHENTICATED")


def test_health_follows_triton_and_the_first_turn_after_a_restart_succeeds(
    start_gateway,  # type: ignore[no-untyped-def]
    triton,  # type: ignore[no-untyped-def]
    tiny_dir: Path,
    tmp_path: Path,
) -> None:
    """While its Triton is down the gateway reports NOT_SERVING (Kubernetes stops routing to
    it); when Triton is back it serves again within seconds and the very next turn succeeds
    (no reconnect backoff left to wait out)."""
    from iomni.triton.server import TritonPorts, TritonServer
    from tests.integration.conftest import REPOSITORY, free_ports

    # The llm on a Triton of its own (the other parts on the suite's): a Triton that dies is
    # the llm's, and restarting one model is quicker than restarting four.
    server = TritonServer(
        REPOSITORY, tiny_dir, tmp_path / "triton", TritonPorts(*free_ports(3)), models=("llm",)
    )
    server.start(timeout_s=240)
    try:
        gateway = start_gateway(
            "--triton",
            server.grpc_url,
            "--triton-vision",
            triton.grpc_url,
            "--triton-audio",
            triton.grpc_url,
            "--triton-speech",
            triton.grpc_url,
        )
        client = DialogueClient(gateway.target, ACME)
        assert client.chat("", uuid.uuid4().hex, text="before", max_new_tokens=3).done
        assert server.process is not None
        server.process.kill()  # Triton dies without a word
        server.stop()
        gateway.wait_serving(timeout_s=10, serving=False)
        with pytest.raises(grpc.RpcError) as info:
            client.chat("", uuid.uuid4().hex, text="while down", max_new_tokens=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        server.start(timeout_s=240)
        gateway.wait_serving(timeout_s=10)
        reply = client.chat("", uuid.uuid4().hex, text="after", max_new_tokens=3)
        assert reply.done is not None and reply.done.usage.completion_tokens >= 1
        client.close()
    finally:
        server.stop()
