"""Shared plumbing for the python-backend models (imported inside Triton's stub process).

`triton_python_backend_utils` exists only there, so it is imported lazily and nothing else in
the package depends on it.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iomni import background
from iomni.errors import CheckpointError, Internal, InvalidInput, IomniError
from iomni.model.checkpoint import LoadedCheckpoint, load_checkpoint
from iomni.triton.server import SHM_PREFIX
from iomni.triton.tensors import ERROR_CODE, ERROR_MESSAGE

log = logging.getLogger(__name__)

CHECKPOINT_ENV = "IOMNI_CHECKPOINT"
DRAIN_FILE_ENV = "IOMNI_DRAIN_FILE"
DTYPE_ENV = "IOMNI_DTYPE"
THREADS_ENV = "IOMNI_TORCH_THREADS"


def pb():  # type: ignore[no-untyped-def]
    import triton_python_backend_utils as pb_utils

    return pb_utils


def model_parameters(args: dict[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def checkpoint_dir(params: dict[str, str]) -> Path:
    value = params.get("checkpoint") or os.environ.get(CHECKPOINT_ENV, "")
    if not value:
        raise CheckpointError(
            f"no checkpoint: set the model parameter 'checkpoint' or {CHECKPOINT_ENV}"
        )
    return Path(value)


_drain: dict[str, float] = {"checked": 0.0}


def drain_deadline() -> float | None:
    """The shutdown deadline the launcher wrote to IOMNI_DRAIN_FILE, if it did (checked at
    most every 0.2 s; the python stub cannot receive our signals)."""
    path = os.environ.get(DRAIN_FILE_ENV)
    now = time.monotonic()
    if path and now - _drain["checked"] >= 0.2:
        _drain["checked"] = now
        try:
            _drain["deadline"] = float(Path(path).read_text().strip())
        except (OSError, ValueError):
            _drain.pop("deadline", None)
    return _drain.get("deadline")


def device(args: dict[str, str]) -> str:
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"


# No Python thread of a stub runs for this long only if one holds the GIL in a blocked call.
WEDGED_S = 60.0
_watching: list[threading.Thread] = []
_parent: list[int] = []


def server_alive() -> bool:
    """False once tritonserver is gone. A custom-metric call then blocks for ever holding the
    GIL (seen: a speech stub's gauge update outlived its server and kept the watchdog below
    from ever running), so background threads check this before touching metrics."""
    return not _parent or os.getppid() == _parent[0]


# The stub's own C++ monitor `exit`s without unlinking the shared-memory region 300 ms after
# the dead server is reaped; checking more often than that lets the region go first (at 1 s a
# fresh-clone CI run once left a region behind). A check that runs too late still loses that
# race; the launcher, or the next start in the same work directory, then removes the region by
# its name (server.py).
WATCH_INTERVAL_S = 0.1


def watch_parent(interval_s: float = WATCH_INTERVAL_S, wedged_s: float = WEDGED_S) -> None:
    """Exit this stub process soon after tritonserver dies (SIGKILL, OOM). Left alone, a stub
    whose server is gone keeps its model (hundreds of MB) and its shared-memory region for
    minutes; the model's background threads keep it alive. Started once per stub process.

    The check is Python and needs the GIL, which a call into a dead server can hold for ever
    (`server_alive`). So each check also re-arms faulthandler's timer, which runs without the
    GIL: if no check has run for `wedged_s`, it prints every thread's stack and `_exit`s."""
    if _watching:
        return
    _parent.append(os.getppid())

    def watch() -> None:
        while True:
            faulthandler.dump_traceback_later(wedged_s, exit=True)
            time.sleep(interval_s)
            if not server_alive():
                _unlink_own_shm()
                os._exit(0)

    thread = threading.Thread(target=watch, name="iomni-parent-watch", daemon=True)
    thread.start()
    _watching.append(thread)


def _unlink_own_shm() -> None:
    """The stub's region is argv[2] of its command line (`stub model.py <region> ...`)."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")
        region = argv[2].decode()
        if region.startswith(SHM_PREFIX):
            (Path("/dev/shm") / region).unlink(missing_ok=True)
    except (OSError, IndexError, UnicodeDecodeError):
        pass


def load_part(args: dict[str, str], part: str) -> LoadedCheckpoint:
    """Load one part of the checkpoint for this model instance."""
    watch_parent()
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    params = model_parameters(args)
    background.lower_process_priority(int(params.get("nice") or 0))
    target = device(args)
    dtype = _dtype(target)
    loaded = load_checkpoint(checkpoint_dir(params), dtype=dtype, device=target, parts=(part,))
    loaded.model.to(target)
    return loaded


def _dtype(target: str) -> torch.dtype:
    name = os.environ.get(DTYPE_ENV) or ("bfloat16" if target.startswith("cuda") else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def as_project_error(exc: BaseException) -> IomniError:
    if isinstance(exc, IomniError):
        return exc
    log.exception("unexpected error in a Triton model")
    return Internal(f"internal error: {type(exc).__name__}: {exc}")


def error_response(exc: BaseException) -> Any:
    """A plain (non-streaming) request's error: the code travels as the Triton error code,
    which clients see as the gRPC status of the call."""
    pb_utils = pb()
    error = as_project_error(exc)
    code = getattr(pb_utils.TritonError, error.code.triton_code)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error.detail, code))


class Responder:
    """Sends a decoupled model's responses on a thread of their own, in the order given.

    A python-backend `send` is a round trip to tritonserver (shared memory, then a wait for
    its acknowledgement): done on the LLM's loop thread, eight streams' tokens cost eight
    round trips per decode step, and the step waited for them. Here the loop hands each
    token over and goes on; the round trips overlap the next step."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, send: Callable[[], None]) -> None:
        """Run `send` after everything submitted before."""
        self._queue.put(send)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (send := self._queue.get()) is not None:
            try:
                send()
            except Exception:  # a vanished client: the other streams go on
                log.exception("sending a response failed")


def stream_error_response(exc: BaseException) -> Any:
    """A streaming (decoupled) request's error. Triton delivers stream errors as bare text, so
    the code travels in the ERROR_CODE output of a normal final response instead."""
    pb_utils = pb()
    error = as_project_error(exc)
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor(ERROR_CODE, np.array([error.code.name.encode()], dtype=np.object_)),
            pb_utils.Tensor(ERROR_MESSAGE, np.array([error.detail.encode()], dtype=np.object_)),
        ]
    )


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def input_array(request: Any, name: str, optional: bool = False):  # type: ignore[no-untyped-def]
    tensor = pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise InvalidInput(f"input {name} is required")
    return tensor.as_numpy()
