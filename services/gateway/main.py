"""`moemesh serve gateway`: composes the gateway — tokenizer, the Registry (membership + load reports), the
public Gateway service, the expert placement (ExpertAdmin: `moemesh rebalance`), tracing, and the HTTP port (OpenAI-compatible routes, /metrics and the trace view, when
`http_port` is set); serves until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import math

from moemesh._proto.v1 import expert_pb2_grpc, gateway_pb2_grpc, worker_pb2_grpc
from moemesh.config.mesh import GatewayConfig
from moemesh.config.telemetry import TelemetryConfig
from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import Tokenizer
from moemesh.services.gateway.http import api_key_check, build_http_app
from moemesh.services.gateway.rebalance import Rebalancer
from moemesh.services.gateway.servicer import ExpertAdminServicer, GatewayServicer
from moemesh.services.gateway.traces import TraceView
from moemesh.services.gateway.traces_http import trace_routes
from moemesh.services.gateway.worker import Gateway
from moemesh.services.metrics_http import serve_http
from moemesh.telemetry.metrics import GatewayMetrics, new_registry, register_build_info
from moemesh.telemetry.trace_store import TraceStore
from moemesh.telemetry.tracing import Telemetry
from moemesh.transport.channels import MeshChannels
from moemesh.transport.registry import Membership, RegistryServicer
from moemesh.transport.security import MeshSecurity
from moemesh.transport.server import MeshServer, ServerOptions, serve_until_signalled

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode", "colocated", "expert")


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve(GatewayConfig.from_args(args), TelemetryConfig.from_args(args)))


async def serve(config: GatewayConfig, telemetry_config: TelemetryConfig | None = None) -> int:
    security = MeshSecurity.from_config(config.security)
    tc = telemetry_config or TelemetryConfig()
    telemetry = Telemetry.create("moemesh-gateway", "gateway", otlp_endpoint=tc.otlp_endpoint,
                                 trace_buffer=tc.trace_buffer)  # fmt: skip
    model_dir = config.model_dir
    model_config = ModelConfig.from_file(model_dir / "config.json")
    tokenizer = Tokenizer(model_dir, model_config) if (model_dir / "tokenizer.json").is_file() else None
    membership = Membership(
        heartbeat_interval_s=config.heartbeat_s,
        expiry_intervals=max(1, math.ceil(config.worker_timeout_s / config.heartbeat_s)),
        mesh_id=config.mesh_id,
    )
    registry = new_registry()
    register_build_info(registry, version=importlib.metadata.version("moemesh"), role="gateway",
                        model=config.model_id, device="")  # fmt: skip
    metrics = GatewayMetrics(registry)
    traces = TraceStore(tc.trace_buffer)
    gateway = Gateway(config, membership, tokenizer, model_config.vocab_size,
                      model_config.max_position_embeddings, MeshChannels(security.tls), metrics,
                      telemetry=telemetry, traces=traces)  # fmt: skip
    metrics.register_live(registry, lambda: gateway.inflight, lambda: _members_by_role(membership))
    view = TraceView(traces, telemetry, membership, gateway.channel)
    server = MeshServer(
        ServerOptions(
            host=config.host,
            port=config.port,
            grace_s=2.0,
            tls=security.tls,
            access=security.access(("moemesh.v1.Gateway",)),
        )
    )
    server.add(gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayServicer(gateway), "moemesh.v1.Gateway")
    server.add(
        worker_pb2_grpc.add_RegistryServicer_to_server, RegistryServicer(membership), "moemesh.v1.Registry"
    )
    rebalancer = Rebalancer(
        membership, MeshChannels(security.tls)
    )  # a mesh service: not in access()'s public ones
    server.add(
        expert_pb2_grpc.add_ExpertAdminServicer_to_server,
        ExpertAdminServicer(rebalancer),
        "moemesh.v1.ExpertAdmin",
    )
    await server.start()
    try:
        http = build_http_app(gateway, registry, authenticate=api_key_check(security.api_keys),
                              extra_routes=trace_routes(view))  # fmt: skip
        async with asyncio.TaskGroup() as tg, serve_http(http, config.host, config.http_port):
            watcher = tg.create_task(gateway.watch_sessions(config.heartbeat_s))
            await serve_until_signalled(server)
            watcher.cancel()
    finally:
        await gateway.close()
        telemetry.shutdown()
    return 0


def _members_by_role(membership: Membership) -> dict[str, int]:
    counts = dict.fromkeys(ROLES, 0)
    for member in membership.members():
        counts[member.role] = counts.get(member.role, 0) + 1
    return counts
