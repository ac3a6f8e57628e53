"""Shared plumbing for the python-backend models (imported inside Triton's stub process).

`triton_python_backend_utils` exists only there, so it is imported lazily and nothing else in
the package depends on it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from iomni.errors import CheckpointError, IomniError
from iomni.model.checkpoint import LoadedCheckpoint, load_checkpoint

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


def load_part(args: dict[str, str], part: str) -> LoadedCheckpoint:
    """Load one part of the checkpoint for this model instance."""
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    params = model_parameters(args)
    target = device(args)
    dtype = _dtype(target)
    loaded = load_checkpoint(checkpoint_dir(params), dtype=dtype, device=target, parts=(part,))
    loaded.model.to(target)
    return loaded


def _dtype(target: str) -> torch.dtype:
    name = os.environ.get(DTYPE_ENV) or ("bfloat16" if target.startswith("cuda") else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


TRITON_CODES = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "NOT_FOUND": "NOT_FOUND",
    "UNAVAILABLE": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
    "FAILED_PRECONDITION": "UNSUPPORTED",
}


def error_response(exc: BaseException) -> Any:
    """A per-request error; project errors keep their code and message, others are INTERNAL."""
    pb_utils = pb()
    if isinstance(exc, IomniError):
        code = getattr(pb_utils.TritonError, TRITON_CODES.get(exc.code, "INTERNAL"))
        # Decoupled (stream) errors reach clients without a status: keep the code in the text.
        message = f"[{exc.code}] {exc.detail}"
    else:
        log.exception("unexpected error in a Triton model")
        code = pb_utils.TritonError.INTERNAL
        message = f"internal error: {type(exc).__name__}: {exc}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def input_array(request: Any, name: str, optional: bool = False):  # type: ignore[no-untyped-def]
    tensor = pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        from iomni.errors import InvalidInput

        raise InvalidInput(f"input {name} is required")
    return tensor.as_numpy()
