"""Transport-neutral errors of the service and their gRPC and HTTP codes.

The servicer raises :class:`ServiceError` with a gRPC status code; the gRPC
transport aborts with it and the HTTP gateway maps it to the HTTP status of
Google's API design guide, so both transports report the same problem in the
same words.
"""

from __future__ import annotations

import grpc

from dannucnet.errors import CancelledError, DanNucNetError, InputError, ModelError, OutputError

# google.rpc.Code → HTTP status (https://cloud.google.com/apis/design/errors).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class ServiceError(Exception):
    """A request the service refuses or cannot finish, with the status to report."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Only the gateway's own checks (413, 415, ...) override the mapping.
        self.http_status = http_status if http_status is not None else HTTP_STATUS.get(code, 500)

    @property
    def status_name(self) -> str:
        return self.code.name


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def from_exception(exc: BaseException) -> ServiceError:
    """Translate an exception from the pipeline into what the client is told.

    User-caused errors keep their message (it says what to do); anything else is
    a server bug, reported as INTERNAL without internals leaking to the client.
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, CancelledError):
        return ServiceError(grpc.StatusCode.CANCELLED, str(exc) or "the request was cancelled")
    if isinstance(exc, InputError):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, ModelError):
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, OutputError):
        return ServiceError(grpc.StatusCode.INTERNAL, str(exc))
    if isinstance(exc, DanNucNetError):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, MemoryError):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory; send a smaller region")
    return ServiceError(grpc.StatusCode.INTERNAL, "internal server error; see the server log")
