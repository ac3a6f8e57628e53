"""Server lifecycle: a model that fails to load, idle speech state, SIGTERM with live streams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from iomni.engine.parts import GenerationRequest, SpeechOptions
from iomni.errors import IomniError, Unavailable
from iomni.model.checkpoint import fingerprint
from iomni.model.sampling import SamplingParams
from iomni.triton.client import TritonParts
from iomni.triton.server import SHM_GLOB, TritonPorts, TritonServer
from tests.integration.conftest import REPOSITORY, free_ports
from tests.integration.test_triton import metric


def repository_copy(
    target: Path, models: tuple[str, ...], edits: dict[str, dict[str, str]]
) -> Path:
    for model in models:
        shutil.copytree(REPOSITORY / model, target / model)
        config = target / model / "config.pbtxt"
        text = config.read_text()
        for key, value in edits.get(model, {}).items():
            old = next(line for line in text.splitlines() if f'key: "{key}"' in line)
            text = text.replace(
                old, f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
            )
        config.write_text(text)
    return target


@pytest.fixture(scope="module")
def broken(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """llm points at a checkpoint that does not exist; speech sequences idle out after 1 s."""
    root = tmp_path_factory.mktemp("broken")
    models = ("llm", "speech_decoder")
    repository = repository_copy(
        root / "repo",
        models,
        {
            "llm": {"checkpoint": str(root / "nowhere")},
            "speech_decoder": {"idle_timeout_s": "1"},
        },
    )
    server = TritonServer(
        repository, tiny_dir, root / "work", TritonPorts(*free_ports(3)), models=models
    )
    with pytest.raises(Unavailable, match="llm") as info:
        server.start(timeout_s=240)
    server.load_error = info.value.detail  # type: ignore[attr-defined]
    yield server
    server.stop()


def parts(server: TritonServer, tiny_dir: Path) -> TritonParts:
    return TritonParts(server.grpc_url, fingerprint(tiny_dir), {})


async def test_a_model_that_fails_to_load_is_named(broken: TritonServer, tiny_dir: Path) -> None:
    assert "nowhere" in broken.load_error  # type: ignore[attr-defined]
    client = parts(broken, tiny_dir)
    with pytest.raises(Unavailable, match="not ready: llm$"):
        await client.check_ready(["llm", "speech_decoder"])
    await client.check_ready(["speech_decoder"])  # the others still serve
    await client.close()


def test_the_server_is_in_the_launchers_session_in_a_group_of_its_own(
    broken: TritonServer,
) -> None:
    """Ctrl-C at a terminal reaches the launcher (which drains) and not the server, yet the
    server stays in the launcher's session: Linux schedules a session as one group, and the
    models' `nice` must weigh against the gateway beside them."""
    assert broken.process is not None
    pid = broken.process.pid
    assert os.getpgid(pid) == pid != os.getpgid(0)
    assert os.getsid(pid) == os.getsid(0)


async def test_idle_speech_sequence_is_freed(broken: TritonServer, tiny_dir: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    client = parts(broken, tiny_dir)
    speech = await client.open_speech(SpeechOptions(sequence_id="forgotten"))
    await speech.push_text([1, 2, 3], torch.randn(3, tiny.config.llm_hidden_size))
    assert metric(broken, "iomni_speech_open_sequences") == 1
    for _ in range(40):
        if metric(broken, "iomni_speech_open_sequences") == 0:
            break
        await asyncio.sleep(0.25)
    assert metric(broken, "iomni_speech_open_sequences") == 0
    with pytest.raises(IomniError, match="was idle for more than .* s and was freed"):
        await speech.push_text([4], torch.randn(1, tiny.config.llm_hidden_size))
    await client.close()


def test_sigterm_with_a_live_stream_stops_cleanly(tiny_dir: Path, tmp_path: Path) -> None:
    http, grpc, metrics = free_ports(3)
    shm_before = set(Path("/dev/shm").glob(SHM_GLOB))
    work = tmp_path / "work"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iomni.cli",
            "triton",
            "serve",
            "--model",
            str(tiny_dir),
            "--repository",
            str(REPOSITORY),
            "--work",
            str(work),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--grace",
            "2",
            "--models",
            "llm",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = serve.stdout.readline()
        assert "triton ready" in line, line + serve.stdout.read()
        outcome = asyncio.run(_stream_then_sigterm(f"127.0.0.1:{grpc}", tiny_dir, serve))
        assert outcome in ("finished", "unavailable")
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)  # its drain stops the server it started
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
        for pid in _processes_under(work, "tritonserver"):  # never leak a server on failure
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not _stubs_under(work)
    assert set(Path("/dev/shm").glob(SHM_GLOB)) <= shm_before


def _endless_request() -> GenerationRequest:
    """A greedy LLM stream that would run for minutes (no stop token, 8000 tokens)."""
    return GenerationRequest(
        input_ids=list(range(200, 230)),
        media={},
        params=SamplingParams(temperature=0.0, max_new_tokens=8000),
        stop_ids=[],
        return_hidden=False,
    )


async def _stream_then_sigterm(url: str, tiny_dir: Path, serve: subprocess.Popen) -> str:
    client = TritonParts(url, fingerprint(tiny_dir), {})
    request = _endless_request()
    received = 0
    try:
        async for _ in client.generate(request):
            received += 1
            if received == 5:
                os.kill(serve.pid, signal.SIGTERM)
        return "finished"
    except Unavailable:
        return "unavailable"
    finally:
        await client.close()


async def _stream_then_kill(url: str, tiny_dir: Path, serve: subprocess.Popen) -> str:
    """SIGKILL the launcher while a long LLM stream is running."""
    client = TritonParts(url, fingerprint(tiny_dir), {}, retries=0)
    request = _endless_request()
    try:
        received = 0
        async for _ in client.generate(request):
            received += 1
            if received == 10:
                serve.kill()  # no drain, no cleanup code runs in the launcher
        return "finished"
    except Unavailable:
        return "unavailable"
    finally:
        await client.close()


def _stubs_under(work: Path) -> list[int]:
    return _processes_under(work, "triton_python_backend_stub")


def _processes_under(work: Path, program: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if program in text and str(work) in text:
            found.append(int(cmdline.parent.name))
    return found


# -- nothing outlives its owner -----------------------------------------------------------------


def _serve(tiny_dir: Path, work: Path, ports: list[int], *models: str) -> subprocess.Popen:
    http, grpc, metrics = ports
    serve = subprocess.Popen(
        [
            sys.executable, "-m", "iomni.cli", "triton", "serve",
            "--model", str(tiny_dir), "--repository", str(REPOSITORY), "--work", str(work),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            "--grace", "2", "--models", *models,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    line = serve.stdout.readline()  # type: ignore[union-attr]
    assert "triton ready" in line, line + serve.stdout.read()  # type: ignore[union-attr]
    return serve


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child of init may linger as one in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _regions(pids: list[int]) -> set[Path]:
    regions = set()
    for pid in pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        regions.add(Path("/dev/shm") / argv[2].decode())
    return regions


def _wait_gone(pids: list[int], regions: set[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_running(p) for p in pids) or any(r.exists() for r in regions):
        assert time.monotonic() < deadline, (
            f"still there after {timeout_s} s: "
            f"{[p for p in pids if _running(p)]} {[r for r in regions if r.exists()]}"
        )
        time.sleep(0.2)


def test_a_killed_launcher_takes_its_server_and_stubs_with_it(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL of the launcher mid-stream: tritonserver dies with it, and so do the stubs (an
    llm stub busy with a stream otherwise outlives its server by minutes, holding its model)."""
    work, ports = tmp_path / "work", free_ports(3)
    serve = _serve(tiny_dir, work, ports, "llm", "speech_decoder")
    server = int((work / "tritonserver.pid").read_text())
    stubs = [p for p in _stubs_under(work) if _running(p)]
    assert len(stubs) == 3  # llm + the speech decoder's two instances
    regions = _regions(stubs)
    assert all(r.exists() for r in regions)
    prefix = TritonServer(REPOSITORY, tiny_dir, work, TritonPorts()).shm_prefix
    assert all(r.name.startswith(prefix) for r in regions)  # this work directory's own names
    try:
        outcome = asyncio.run(_stream_then_kill(f"127.0.0.1:{ports[1]}", tiny_dir, serve))
        assert outcome == "unavailable"
        serve.wait(10)
        _wait_gone([server, *stubs], set(), timeout_s=10)
        # The ports are free again: a new launcher on the same work directory starts cleanly,
        # and no region is left (a stub's watch thread removes its own unless it runs too late;
        # the new start removes what such a stub left).
        again = _serve(tiny_dir, work, ports, "llm")
        assert not [r for r in regions if r.exists()]
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    finally:  # never leak a server when the test fails
        for pid in _processes_under(work, "tritonserver") + _stubs_under(work):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_tritonserver_stops_its_stubs_and_its_launcher(
    tiny_dir: Path, tmp_path: Path
) -> None:
    work, ports = tmp_path / "work", free_ports(3)
    serve = _serve(tiny_dir, work, ports, "llm", "speech_decoder")
    server = int((work / "tritonserver.pid").read_text())
    stubs = [p for p in _stubs_under(work) if _running(p)]
    regions = _regions(stubs)
    os.kill(server, signal.SIGKILL)
    assert serve.wait(30) == 1
    assert "tritonserver exited" in serve.stdout.read()  # type: ignore[union-attr]
    _wait_gone(stubs, regions, timeout_s=10)


def test_an_orphaned_server_is_reaped_by_the_next_start(tiny_dir: Path, tmp_path: Path) -> None:
    """A tritonserver whose launcher is gone (started here with no launcher at all) is found
    through the work directory's pid file and stopped, with its stubs, before a new start."""
    from iomni.triton.server import server_environment

    work = tmp_path / "work"
    ports = TritonPorts(*free_ports(3))
    orphan_server = TritonServer(REPOSITORY, tiny_dir, work, ports, models=("llm",))
    work.mkdir(parents=True)
    orphan = subprocess.Popen(
        orphan_server.command(),
        env=server_environment(tiny_dir, orphan_server.drain_file),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    orphan_server.process = orphan
    orphan_server.pid_file.write_text(f"{orphan.pid}\n")
    orphan_server.wait_ready(120)
    stubs = [p for p in _stubs_under(work) if _running(p)]
    regions = _regions(stubs)
    fresh = TritonServer(REPOSITORY, tiny_dir, work, ports, models=("llm",))
    try:
        fresh.start(timeout_s=120)  # the ports were taken: only reaping the orphan frees them
        assert orphan.wait(10) is not None
        assert not any(_running(p) for p in stubs)
        assert not any(r.exists() for r in regions)
        assert fresh.process is not None and fresh.process.pid != orphan.pid
    finally:
        fresh.stop()
        if orphan.poll() is None:
            orphan.kill()
