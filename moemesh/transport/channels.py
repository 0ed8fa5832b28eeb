"""gRPC client plumbing: channels with moemesh's options, the health probe the supervisor and the registry
use, and `forget_worker`, the supervisor's word to the registry that a worker died. Light to import (no
torch): `moemesh up`'s parent process uses it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc
from moemesh.config.security import TlsFiles
from moemesh.transport.security import channel_credentials, mesh_channel_options
from moemesh.transport.server import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


def insecure_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))


def aio_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=list(CHANNEL_OPTIONS))


@dataclass(frozen=True)
class MeshChannels:
    """Opens channels to other mesh services: plain, or mutual TLS with this process's certificate.
    `MeshChannels(tls)` is itself the `(target) -> grpc.aio.Channel` factory the workers take."""

    tls: TlsFiles | None = None

    def __call__(self, target: str) -> grpc.aio.Channel:
        if self.tls is None:
            return aio_channel(target)
        options = [*CHANNEL_OPTIONS, *mesh_channel_options(self.tls)]
        return grpc.aio.secure_channel(target, channel_credentials(self.tls), options=options)

    def sync(self, target: str) -> grpc.Channel:
        if self.tls is None:
            return insecure_channel(target)
        options = [*CHANNEL_OPTIONS, *mesh_channel_options(self.tls)]
        return grpc.secure_channel(target, channel_credentials(self.tls), options=options)


def health_status(channel: grpc.Channel, service: str = "", timeout_s: float = 1.0) -> str:
    """One of SERVING, NOT_SERVING, SERVICE_UNKNOWN, or UNREACHABLE (no answer within timeout_s)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as err:
        if err.code() is grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_until_serving(
    target: str, timeout_s: float, service: str = "", poll_s: float = 0.05, tls: TlsFiles | None = None
) -> bool:
    """Polls target's health until SERVING; False when timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    with MeshChannels(tls).sync(target) as channel:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if health_status(channel, service, timeout_s=min(1.0, remaining)) == "SERVING":
                return True
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def forget_worker(
    registry: str, worker_id: str, mesh_id: str = "", timeout_s: float = 2.0, tls: TlsFiles | None = None
) -> bool:
    """Tells the registry at `registry` (HOST:PORT) that `worker_id` is gone, so the gateway stops routing to
    it at once instead of after its missed heartbeats (`moemesh up` calls it when it sees a worker exit).
    Blocking; False when the registry could not be told."""
    with MeshChannels(tls).sync(registry) as channel:
        try:
            worker_pb2_grpc.RegistryStub(channel).Deregister(
                worker_pb2.DeregisterRequest(worker_id=worker_id, mesh_id=mesh_id), timeout=timeout_s
            )
        except grpc.RpcError as err:
            log.warning("could not tell %s that %s is gone: %s", registry, worker_id, err.code().name)
            return False
    return True
