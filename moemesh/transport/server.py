"""gRPC server plumbing every moemesh role shares: one grpc.aio server with the standard health and
reflection services, a bound port, and a graceful stop.

Lifecycle:  `server = MeshServer(ServerOptions(...))` -> `server.add(add_fn, servicer, SERVICE_NAME)` ...
-> `await server.start()` (binds; health says NOT_SERVING) -> `await server.set_serving()` once the role is
ready (model loaded, registered) -> ... -> `await server.stop()` (health says NOT_SERVING, in-flight calls get
`grace_s` to finish, then the rest are cancelled).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from moemesh.config.security import TlsFiles
from moemesh.transport.security import AccessInterceptor, AccessPolicy, server_credentials

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # token-id prompts and the gRPC expert fallback; KV pages go over UCX


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port; MeshServer.port tells which after start()
    grace_s: float = 5.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    tls: TlsFiles | None = None  # mutual TLS: callers must present a certificate of the mesh's CA
    access: AccessPolicy | None = None  # who may call which service (API keys, mesh peers only)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")
        if self.grace_s < 0:
            raise ValueError(f"grace_s={self.grace_s} must be >= 0")

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Without this two servers can bind the same port and split its traffic (gRPC's Linux default).
            ("grpc.so_reuseport", 0),
            *self.extra_options,
        ]


class MeshServer:
    """A grpc.aio server with health (overall "" plus each added service) and reflection."""

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        access = self.options.access
        interceptors = [AccessInterceptor(access)] if access is not None else []
        self._server = grpc.aio.server(options=self.options.channel_options(), interceptors=interceptors)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._service_names: list[str] = []
        self._port: int | None = None

    def add(self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, name: str) -> None:
        """`add(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, "moemesh.v1.Gateway")`."""
        if self._port is not None:
            raise RuntimeError(f"cannot add service {name} after start()")
        add_to_server(servicer, self._server)
        self._service_names.append(name)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has no port before start()")
        return self._port

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    async def start(self) -> int:
        """Binds and starts serving RPCs; health stays NOT_SERVING until set_serving(). Returns the port."""
        names = [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self._server)
        bind = f"{self.options.host}:{self.options.port}"
        tls = self.options.tls
        port = (
            self._server.add_secure_port(bind, server_credentials(tls))
            if tls
            else self._server.add_insecure_port(bind)
        )
        if port == 0:
            raise OSError(f"could not bind {self.options.host}:{self.options.port}")
        self._port = port
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        log.info("grpc server listening on %s (%s)", self.address, ", ".join(self._service_names) or "health")
        return port

    async def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._set_all(status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Health goes NOT_SERVING at once; in-flight calls get grace_s, then are cancelled."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.options.grace_s if grace_s is None else grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def _set_all(self, status: int) -> None:
        for name in ("", *self._service_names):
            await self._health.set(name, status)


async def serve_until_signalled(
    server: MeshServer,
    signals: tuple[int, ...] | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Marks `server` SERVING, blocks until SIGINT or SIGTERM (or the server terminates), awaits `drain()`
    (a worker leaves the mesh and lets its requests finish, the server still answering), then stops it
    gracefully. Returns the signal number that stopped it, or 0. The caller has already started it."""
    import asyncio
    import signal

    wanted = (signal.SIGINT, signal.SIGTERM) if signals is None else signals
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    which: list[int] = []

    def on_signal(signum: int) -> None:
        which.append(signum)
        received.set()

    for signum in wanted:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.set_serving()
        stop_wait = asyncio.ensure_future(received.wait())
        term_wait = asyncio.ensure_future(server.wait_for_termination())
        await asyncio.wait({stop_wait, term_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if drain is not None and not term_wait.done():
            await drain()
        log.info("stopping grpc server on %s (signal %s)", server.address, which[0] if which else "none")
        await server.stop()  # cancelling wait_for_termination first would cancel this shutdown too
        await term_wait
    finally:
        for signum in wanted:
            loop.remove_signal_handler(signum)
    return which[0] if which else 0
