"""The one place where moemesh exceptions become gRPC status codes, and status codes become exceptions.

Inside a process, code raises exceptions; at the edge a servicer method wrapped in `@map_errors` turns them
into a status code with the exception's message. Plain built-ins map too, so code that must not import
transport (the engine) raises `ValueError("max_tokens=0 must be >= 1")` and the client sees
INVALID_ARGUMENT with that message.

    exception (or built-in base)         status code
    InvalidArgument (ValueError)         INVALID_ARGUMENT
    ResourceExhausted (MemoryError)      RESOURCE_EXHAUSTED
    DeadlineExceeded (TimeoutError)      DEADLINE_EXCEEDED
    Unavailable (ConnectionError)        UNAVAILABLE
    Unauthenticated (PermissionError)    UNAUTHENTICATED
    IncompatiblePeer                     FAILED_PRECONDITION
    LeaseRefused                         FAILED_PRECONDITION
    RegistrationRefused                  FAILED_PRECONDITION
    FailedPrecondition                   FAILED_PRECONDITION
    StalePlacement                       ABORTED
    NotFound (KeyError / LookupError)    NOT_FOUND
    Cancelled (asyncio.CancelledError)   CANCELLED
    anything else                        INTERNAL (logged with its traceback)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class MeshError(Exception):
    """Base of moemesh's own errors; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(MeshError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def field(cls, name: str, value: Any, requirement: str) -> InvalidArgument:
        """`InvalidArgument.field("max_tokens", 0, ">= 1")` -> "max_tokens=0 must be >= 1"."""
        return cls(f"{name}={value!r} must be {requirement}")


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(MeshError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(MeshError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(MeshError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class IncompatiblePeer(MeshError):
    """Two workers' fingerprints (model, KV layout, protocol) differ: they must not exchange KV."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LeaseRefused(MeshError):
    """A KV write named a lease that is unknown, expired, released or of another generation (or did not fit
    it). `reason` is the receiver's `kv.RefusalReason` when known."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class RegistrationRefused(MeshError):
    """The registry refused a worker: it belongs to another mesh, or its worker_id is held by a live worker
    at another address."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class FailedPrecondition(MeshError):
    """The system is not in a state the operation needs (no expert workers to rebalance, one already
    running); the message says which."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StalePlacement(MeshError):
    """An expert batch was routed by an expert placement its worker has since changed (the epoch in its
    header is not the worker's): the sender describes the pool again and resends."""

    code = grpc.StatusCode.ABORTED


class NotFound(MeshError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class Cancelled(MeshError):
    code = grpc.StatusCode.CANCELLED


# Built-ins raised by code that does not import transport; checked in order after MeshError.
_BUILTIN_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ConnectionError, grpc.StatusCode.UNAVAILABLE),
    (PermissionError, grpc.StatusCode.UNAUTHENTICATED),
    (LookupError, grpc.StatusCode.NOT_FOUND),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # the engine's "no pages free" (reserve_kv)
    (asyncio.CancelledError, grpc.StatusCode.CANCELLED),
)

_EXCEPTION_FOR_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: IncompatiblePeer,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.ABORTED: StalePlacement,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for `exc`."""
    if isinstance(exc, MeshError):
        return exc.code, str(exc)
    for kind, code in _BUILTIN_CODES:
        if isinstance(exc, kind):
            return code, str(exc) or type(exc).__name__
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def from_rpc_error(err: grpc.RpcError) -> MeshError:
    """The exception for a failed call to another service (so D sees `Unavailable` when P is lost)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details)


def from_status(code: grpc.StatusCode, message: str) -> MeshError:
    """The exception for a status received as data (a failed request's event on a multiplexed stream)."""
    return _EXCEPTION_FOR_CODE.get(code, MeshError)(message or code.name)


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code_number(code: grpc.StatusCode) -> int:
    return code.value[0]


def status_code_from_number(number: int) -> grpc.StatusCode:
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


F = TypeVar("F", bound=Callable[..., Any])


def _abort_args(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in a servicer method", exc_info=exc)
    return code, message


def map_errors(method: F) -> F:
    """Wraps a servicer method (sync or grpc.aio; unary or server-streaming) so raised exceptions end the
    call with `status_for(exc)`. The context is the method's last positional argument."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def agen(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await context.abort(*_abort_args(exc))

        return agen  # type: ignore[return-value]

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def coro(self, request, context):
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await context.abort(*_abort_args(exc))

        return coro  # type: ignore[return-value]

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def gen(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:
                if _is_sync_abort(exc):
                    raise
                context.abort(*_abort_args(exc))

        return gen  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            if _is_sync_abort(exc):
                raise
            context.abort(*_abort_args(exc))

    return unary  # type: ignore[return-value]


def _is_sync_abort(exc: BaseException) -> bool:
    # grpc's sync context.abort() raises a bare Exception after recording the status; pass it through.
    return type(exc) is Exception and not exc.args
