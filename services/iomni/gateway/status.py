"""Project errors as gRPC statuses, for the gateway's handlers."""

from __future__ import annotations

import logging

import grpc

from iomni.errors import ErrorCode, Internal, IomniError

log = logging.getLogger("iomni.gateway.service")


def as_project_error(exc: Exception, what: str) -> IomniError:
    """Project errors pass through; anything else is logged and becomes a generic INTERNAL.
    grpc's own abort (and task cancellation, a BaseException) are re-raised untouched."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, IomniError):
        return exc
    log.exception("%s failed", what)
    return Internal(f"{what} failed: {type(exc).__name__}")


async def abort(context: grpc.aio.ServicerContext, exc: IomniError) -> None:
    if exc.code is ErrorCode.INTERNAL:
        log.error("internal error: %s", exc.detail)
    await context.abort(grpc.StatusCode[exc.code.grpc_status], exc.detail)
