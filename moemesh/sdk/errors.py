"""Exceptions the SDK raises: one type per gRPC status a caller handles differently."""

from __future__ import annotations

import grpc


class MoemeshError(Exception):
    """Base of every SDK error. `code` is the gRPC status name ("INVALID_ARGUMENT", ...) or "CLIENT"."""

    def __init__(self, message: str, code: str = "CLIENT") -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(MoemeshError, ValueError):
    """A bad argument, caught by the client before sending or by the server (INVALID_ARGUMENT)."""


class Overloaded(MoemeshError):
    """The server shed the request (RESOURCE_EXHAUSTED); retry later."""


class DeadlineExceeded(MoemeshError, TimeoutError):
    """The request's deadline passed (DEADLINE_EXCEEDED)."""


class Unavailable(MoemeshError, ConnectionError):
    """The server (or a worker behind it) cannot be reached (UNAVAILABLE)."""


class Unauthenticated(MoemeshError, PermissionError):
    """A missing or wrong API key (UNAUTHENTICATED)."""


class Cancelled(MoemeshError):
    """The call was cancelled by someone other than this client (CANCELLED)."""


class ServerError(MoemeshError):
    """Any other status: a bug or failure on the server side (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[MoemeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_from_rpc(err: grpc.RpcError) -> MoemeshError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or code.name
    return _BY_CODE.get(code, ServerError)(details, code.name)
