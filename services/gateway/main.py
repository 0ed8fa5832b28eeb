"""`moemesh serve gateway`: composes the gateway — tokenizer, the Registry (membership + load reports), the
public Gateway service; serves until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math

from moemesh._proto.v1 import gateway_pb2_grpc, worker_pb2_grpc
from moemesh.config.mesh import GatewayConfig
from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import Tokenizer
from moemesh.services.gateway.servicer import GatewayServicer
from moemesh.services.gateway.worker import Gateway
from moemesh.transport.channels import MeshChannels
from moemesh.transport.registry import Membership, RegistryServicer
from moemesh.transport.security import MeshSecurity
from moemesh.transport.server import MeshServer, ServerOptions, serve_until_signalled

log = logging.getLogger(__name__)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve(GatewayConfig.from_args(args)))


async def serve(config: GatewayConfig) -> int:
    security = MeshSecurity.from_config(config.security)
    model_dir = config.model_dir
    model_config = ModelConfig.from_file(model_dir / "config.json")
    tokenizer = Tokenizer(model_dir, model_config) if (model_dir / "tokenizer.json").is_file() else None
    membership = Membership(
        heartbeat_interval_s=config.heartbeat_s,
        expiry_intervals=max(1, math.ceil(config.worker_timeout_s / config.heartbeat_s)),
    )
    gateway = Gateway(config, membership, tokenizer, model_config.vocab_size,
                      model_config.max_position_embeddings, MeshChannels(security.tls))  # fmt: skip
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
    await server.start()
    try:
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(gateway.watch_sessions(config.heartbeat_s))
            await serve_until_signalled(server)
            watcher.cancel()
    finally:
        await gateway.close()
    return 0
