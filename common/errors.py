"""Errors that map to gRPC status codes: one table for every servicer.

A per-request problem raises :class:`RequestError` (or a subclass) and leaves the
process healthy; anything else reaching a servicer is an internal error.
"""

from __future__ import annotations

import logging

import grpc

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A per-request failure with the gRPC status the client should see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgument(RequestError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(RequestError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RequestError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RequestError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RequestError):
    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(RequestError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(RequestError):
    code = grpc.StatusCode.UNAUTHENTICATED


_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def status_code_from_number(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for its google.rpc.Code number (UNKNOWN if not a code)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a client should see for an exception."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    # Anything else (a ValueError included) is our bug, not the caller's bad input: bad
    # input is rejected by common.validation with InvalidArgument naming the field.
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Aborts an aio RPC with the mapped status (logs internal errors with traceback)."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("internal error in RPC", exc_info=exc)
    await context.abort(code, message)
