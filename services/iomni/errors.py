"""The project's errors and the one table that says what each means on every wire.

Every room raises an `IomniError` subclass; its `code` is a row of `ErrorCode`, which gives the
gRPC status a client sees, the Triton error code a python-backend model answers with, and the
outcome label a failed turn is counted under (`iomni_*_turns_total{outcome}`). Nothing else
keeps a table of codes: the gateway, the Triton adapter and client, the Kafka worker and the
metrics all read this one.
"""

from __future__ import annotations

from enum import Enum, unique


@unique
class ErrorCode(Enum):
    """name = (gRPC status, Triton error code, outcome label). Unique rows: no aliases."""

    INVALID_INPUT = ("INVALID_ARGUMENT", "INVALID_ARG", "invalid")
    NOT_FOUND = ("NOT_FOUND", "NOT_FOUND", "not_found")
    UNAUTHENTICATED = ("UNAUTHENTICATED", "INVALID_ARG", "unauthenticated")
    PERMISSION_DENIED = ("PERMISSION_DENIED", "INVALID_ARG", "denied")
    SESSION_BUSY = ("ABORTED", "UNAVAILABLE", "busy")
    LEASE_LOST = ("ABORTED", "INTERNAL", "lease_lost")
    RESOURCE_EXHAUSTED = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "rejected")
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", "INTERNAL", "timeout")
    CANCELLED = ("CANCELLED", "CANCELLED", "cancelled")
    UNAVAILABLE = ("UNAVAILABLE", "UNAVAILABLE", "error")
    CHECKPOINT = ("FAILED_PRECONDITION", "UNSUPPORTED", "failed_precondition")
    INTERNAL = ("INTERNAL", "INTERNAL", "error")

    def __init__(self, grpc_status: str, triton_code: str, outcome: str) -> None:
        self.grpc_status = grpc_status  # grpc.StatusCode member name
        self.triton_code = triton_code  # pb_utils.TritonError attribute name
        self.outcome = outcome  # label of a failed turn in the turn metrics

    @classmethod
    def parse(cls, name: str) -> ErrorCode:
        """A code sent by name (Triton response parameter, Kafka event); unknown is INTERNAL."""
        return cls.__members__.get(name, cls.INTERNAL)

    @classmethod
    def from_grpc_status(cls, status: str) -> ErrorCode:
        """The code behind a gRPC status name when only the status is known (a plain Triton
        request that failed); statuses shared by several codes give the first row."""
        status = status.removeprefix("StatusCode.")
        for code in cls:
            if code.grpc_status == status:
                return code
        return cls.UNAVAILABLE if status in ("UNKNOWN", "UNIMPLEMENTED") else cls.INTERNAL


class IomniError(Exception):
    """Base class. `detail` is a message a person can act on."""

    code = ErrorCode.INTERNAL

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(IomniError):
    """The caller sent something we cannot serve (bad media, bad parameters)."""

    code = ErrorCode.INVALID_INPUT


class NotFound(IomniError):
    code = ErrorCode.NOT_FOUND


class Unauthenticated(IomniError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(IomniError):
    code = ErrorCode.PERMISSION_DENIED


class Unavailable(IomniError):
    """A dependency (model server, store) cannot be reached right now; retrying may help."""

    code = ErrorCode.UNAVAILABLE


class ResourceExhausted(IomniError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(IomniError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(IomniError):
    code = ErrorCode.CANCELLED


class CheckpointError(IomniError):
    """A checkpoint directory is missing, broken or does not match the code."""

    code = ErrorCode.CHECKPOINT


class Internal(IomniError):
    code = ErrorCode.INTERNAL


class SessionBusy(IomniError):
    """Another turn holds the session's lease. Retrying after it finishes may succeed."""

    code = ErrorCode.SESSION_BUSY

    def __init__(self, session_id: str, turn_id: str) -> None:
        super().__init__(
            f"session {session_id} is busy with turn {turn_id}; wait for it to finish or cancel it"
        )
        self.session_id = session_id
        self.turn_id = turn_id


class LeaseLost(IomniError):
    """The caller's lease is no longer current: it expired or another turn took over."""

    code = ErrorCode.LEASE_LOST

    def __init__(self, session_id: str, token: int, holder_turn: str | None = None) -> None:
        now = f"; turn {holder_turn} holds it now" if holder_turn else ""
        super().__init__(
            f"the lease on session {session_id} (token {token}) is no longer held: "
            f"it expired or was taken over{now}; nothing was written"
        )
        self.session_id = session_id
        self.token = token


def error_for(code: ErrorCode, detail: str) -> IomniError:
    """An error of `code` built from a code and a message (decoded from a wire)."""
    cls = _BY_CODE.get(code, Internal)
    error = IomniError.__new__(cls)
    IomniError.__init__(error, detail)
    return error


_BY_CODE: dict[ErrorCode, type[IomniError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        SessionBusy,
        LeaseLost,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unavailable,
        CheckpointError,
        Internal,
    )
}
