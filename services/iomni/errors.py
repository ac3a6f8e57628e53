"""The project's error types.

Every room raises these; the gateway maps them to gRPC status codes, the Triton adapter to
Triton error codes and the Kafka worker to dead-letter reasons, each through one table.
"""

from __future__ import annotations


class IomniError(Exception):
    """Base class. `detail` is a message a person can act on."""

    code = "INTERNAL"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(IomniError):
    """The caller sent something we cannot serve (bad media, bad parameters)."""

    code = "INVALID_ARGUMENT"


class NotFound(IomniError):
    code = "NOT_FOUND"


class Unavailable(IomniError):
    """A dependency (model server, store) cannot be reached right now; retrying may help."""

    code = "UNAVAILABLE"


class ResourceExhausted(IomniError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(IomniError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(IomniError):
    code = "CANCELLED"


class CheckpointError(IomniError):
    """A checkpoint directory is missing, broken or does not match the code."""

    code = "FAILED_PRECONDITION"


class Internal(IomniError):
    code = "INTERNAL"
