"""Start and stop the bundled `tritonserver` (PyPI nvidia-pytriton) on a model repository.

Two pitfalls of the bundled 2.51 shape this code: the python-backend stub must find our venv's
numpy<2 (so the venv's bin/ goes first on PATH and its libraries on LD_LIBRARY_PATH), and the
server crashes on SIGTERM while decoupled streams are open, so `stop()` unloads every model
first (unload waits for in-flight streams), then terminates, then removes any stub process and
shared-memory region the server left behind.

Nothing outlives its owner: tritonserver gets SIGKILL from the kernel if the process that
started it dies (PR_SET_PDEATHSIG), its stubs exit within a second of it dying (a watch thread
in iomni.triton.backend), and the stubs of a server are found by their executable, which lies
in this server's own work directory, so cleanup never touches another server's processes. Its
shared-memory regions carry a name of the work directory's own (`shm_prefix`): a stub whose
watch thread did not run in time (the GIL busy, the host loaded) leaves its region, and the
launcher, or if the launcher died too the next start in the same work directory, removes it by
name.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from iomni.errors import Unavailable
from iomni.triton.tensors import MODELS

log = logging.getLogger(__name__)
SHM_PREFIX = "triton_python_backend_shm_region_"  # the python backend's own; ours extend it
SHM_GLOB = SHM_PREFIX + "*"
START_ATTEMPTS = 2  # a launch that dies on a signal is tried once more (see `start`)


@dataclass
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise Unavailable("nvidia-pytriton is not installed; run `make setup`") from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backend_dir(work: Path) -> Path:
    """backends/python with the libraries and the stub for this Python version."""
    root = pytriton_root()
    target = work / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = [
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        root / "python_backend_stubs" / version / "triton_python_backend_stub",
    ]
    for source in sources:
        destination = target / source.name
        if not destination.exists() or destination.stat().st_size != source.stat().st_size:
            shutil.copy2(source, destination)
    return work / "backends"


def server_environment(
    checkpoint: Path, drain_file: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    libs = Path(pytriton_root()).parent.parent / "nvidia_pytriton.libs"
    lib_paths = [str(libs), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in [*lib_paths, env.get("LD_LIBRARY_PATH", "")] if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["IOMNI_CHECKPOINT"] = str(checkpoint.resolve())
    env["IOMNI_DRAIN_FILE"] = str(drain_file.resolve())
    env.setdefault("IOMNI_TORCH_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


@dataclass
class TritonServer:
    repository: Path
    checkpoint: Path
    work: Path
    ports: TritonPorts = field(default_factory=TritonPorts)
    models: tuple[str, ...] = MODELS
    log_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def drain_file(self) -> Path:
        return self.work / "drain"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    def command(self) -> list[str]:
        binary = pytriton_root() / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={prepare_backend_dir(self.work).resolve()}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            "--exit-timeout-secs=10",
            "--exit-on-error=false",
            "--strict-readiness=true",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
        ]

    @property
    def shm_prefix(self) -> str:
        """The names of this work directory's shared-memory regions. A region is found by its
        name alone, so one whose stub is already gone (and took its command line with it) is
        still removed, and another server's regions are never touched."""
        tag = hashlib.sha256(str(self.work.resolve()).encode()).hexdigest()[:12]
        return f"{SHM_PREFIX}iomni-{tag}-"

    @property
    def pid_file(self) -> Path:
        return self.work / "tritonserver.pid"

    @property
    def stub_binary(self) -> Path:
        return (self.work / "backends" / "python" / "triton_python_backend_stub").resolve()

    def start(self, timeout_s: float = 120) -> None:
        """Launch and wait until every model is ready. A start that dies on a signal is tried
        once more: 2.51's gRPC event engine now and then aborts before the server has done
        anything of its own (`epoll_wait error: Bad file descriptor`, SIGABRT), intermittently,
        so one more launch is worth its seconds. Any other failure (exit status, a model that
        fails to load, no readiness in time) is raised at once: trying again would not change
        it."""
        for attempt in range(1, START_ATTEMPTS + 1):
            self._launch()
            try:
                self.wait_ready(timeout_s)
                return
            except Unavailable:
                code = self.process.returncode if self.process is not None else None
                if code is None or code >= 0 or attempt == START_ATTEMPTS:
                    raise  # not a death by signal, or the last try
                log.warning(
                    "tritonserver died on signal %d while starting (attempt %d of %d); "
                    "starting it again. Its log: %s\n%s",
                    -code, attempt, START_ATTEMPTS, self.log_file, self.log_tail(5),
                )  # fmt: skip
                self._kill_stubs()

    def _launch(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        reaped = self.reap_orphans()
        if reaped:
            log.warning("stopped %d process(es) left by an earlier server in %s", reaped, self.work)
        self.drain_file.unlink(missing_ok=True)
        log_path = self.log_file or self.work / "tritonserver.log"
        self.log_file = log_path
        with log_path.open("ab") as output:  # the child keeps its own copy
            self.process = subprocess.Popen(
                self.command(),
                stdout=output,
                stderr=subprocess.STDOUT,
                env=server_environment(self.checkpoint, self.drain_file, self.env),
                # Its own process group keeps a terminal's Ctrl-C away from it (the launcher
                # drains it), but not its own session: Linux schedules each session as one
                # group (autogroup), and the models' `nice` must weigh against the gateway's.
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        self.pid_file.write_text(f"{self.process.pid}\n")

    def reap_orphans(self) -> int:
        """Stop a tritonserver and stubs left in this work directory by a launcher that died
        (SIGKILL, a crash before PR_SET_PDEATHSIG existed), and the shared memory of any stub
        that died without removing its own; returns how many processes were stopped."""
        pids = self.stub_pids()
        server = _read_pid(self.pid_file)
        if server is not None and _is_tritonserver(server, self.work):
            pids.append(server)
        for pid in pids:
            _kill(pid)
        self._free_shm()
        self.pid_file.unlink(missing_ok=True)
        return len(pids)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise Unavailable(
                    f"tritonserver exited with {self.process.returncode}; "
                    f"see {self.log_file}:\n{self.log_tail()}"
                )
            failed = self.failed_models()
            if failed:
                raise Unavailable(f"Triton models failed to load: {failed}; see {self.log_file}")
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.25)
        raise Unavailable(f"tritonserver not ready after {timeout_s:.0f} s; see {self.log_file}")

    def failed_models(self) -> dict[str, str]:
        """Models the repository index reports UNAVAILABLE with a reason."""
        index = self._post_json("/v2/repository/index", {})
        if not isinstance(index, list):
            return {}
        return {
            m["name"]: m.get("reason", "")
            for m in index
            if m.get("state") == "UNAVAILABLE" and m.get("reason")
        }

    def log_tail(self, lines: int = 20) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 10) -> None:
        """Drain: live streams get `grace_s` to finish (new ones are refused), then every model
        is unloaded (which waits for them), then the server is terminated and whatever a crash
        could leave (stub processes, shared memory) is removed."""
        if self.process is None or self.process.poll() is not None:
            self._kill_stubs()
            return
        self.drain_file.write_text(f"{time.time() + grace_s}\n")
        for model in self.models:
            self._post_json(f"/v2/repository/models/{model}/unload", {})
        deadline = time.monotonic() + grace_s + 10
        while time.monotonic() < deadline and any(
            self._get(f"/v2/models/{m}/ready") == 200 for m in self.models
        ):
            time.sleep(0.2)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._kill_stubs()

    def _kill_stubs(self) -> None:
        """After the server exited (or was killed): its stubs and shared memory go too."""
        for pid in self.stub_pids():
            _kill(pid)
        self._free_shm()
        self.pid_file.unlink(missing_ok=True)

    def stub_pids(self) -> list[int]:
        """Stub processes of this server, found by their executable (in this work directory),
        so they are found after tritonserver died and their parent became init."""
        binary = str(self.stub_binary)
        pids = []
        for exe in Path("/proc").glob("[0-9]*/exe"):
            with contextlib.suppress(OSError):
                if os.readlink(exe).removesuffix(" (deleted)") == binary:
                    pids.append(int(exe.parent.name))
        return pids

    def _free_shm(self) -> None:
        """Unlink this server's shared-memory regions, once its processes are stopped or killed
        (a mapping outlives the unlink, so a process still dying loses nothing)."""
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def _post_json(self, path: str, body: dict) -> object:
        request = urllib.request.Request(
            self.http_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return json.loads(text) if text else {}
        except (OSError, json.JSONDecodeError):
            return None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it when the launcher dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_tritonserver(pid: int, work: Path) -> bool:
    """A live tritonserver whose backends live in `work` (not a reused pid, not a zombie)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    backends = f"--backend-directory={(work / 'backends').resolve()}".encode()
    return state != "Z" and argv[0].endswith(b"tritonserver") and backends in argv
