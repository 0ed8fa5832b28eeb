"""`moemesh serve prefill`: composes the prefill worker — engine, KV sender, gRPC server, registration."""

from __future__ import annotations

import argparse
import asyncio
import logging

from moemesh._proto.v1 import worker_pb2_grpc
from moemesh.config.mesh import CUDA_UCX_TRANSPORTS, WorkerConfig
from moemesh.config.telemetry import TelemetryConfig
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.expert_spans import ExpertDispatchSpans
from moemesh.services.metrics_http import engine_stats, metrics_app, serve_http, worker_registry
from moemesh.services.model_loading import load_engine
from moemesh.services.prefill.servicer import PrefillServicer
from moemesh.services.prefill.worker import PrefillWorker
from moemesh.services.registration import run_worker_server
from moemesh.services.remote_experts import install_remote_experts
from moemesh.services.ucx_lifecycle import stop_ucx, ucx_options
from moemesh.telemetry.metrics import PrefillMetrics
from moemesh.telemetry.tracing import Telemetry
from moemesh.transport import spans as spans_service
from moemesh.transport.channels import MeshChannels
from moemesh.transport.kv_ucx import UcxKvSender
from moemesh.transport.peers import HandshakeAcceptor, WorkerInfo
from moemesh.transport.security import MeshSecurity
from moemesh.transport.server import MeshServer, ServerOptions
from moemesh.transport.ucx import probe_device_memory

log = logging.getLogger(__name__)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve(WorkerConfig.from_args(args), TelemetryConfig.from_args(args)))


async def serve(config: WorkerConfig, telemetry_config: TelemetryConfig | None = None) -> int:
    security = MeshSecurity.from_config(config.security)
    tc = telemetry_config or TelemetryConfig()
    telemetry = Telemetry.create("moemesh-prefill", config.worker_id, otlp_endpoint=tc.otlp_endpoint,
                                 trace_buffer=tc.trace_buffer)  # fmt: skip
    loaded = await asyncio.to_thread(load_engine, config)
    remote = install_remote_experts(loaded, config, MeshChannels(security.tls))
    loop = EngineLoop(loaded.engine, exclusive=False)  # its event loop sends KV while the forward goes on
    options = ucx_options(config)
    problem = await probe_device_memory(options, loaded.engine.device)
    if problem is not None:  # said at start-up, not found later as requests quietly prefilled on D
        log.error("UCX cannot send %s memory: %s; every KV transfer will fail and decode workers will prefill "
                  "locally (set --ucx-transports / MOEMESH_UCX_TRANSPORTS, e.g. %s)", loaded.engine.device, problem,
                  CUDA_UCX_TRANSPORTS)  # fmt: skip
    sender = UcxKvSender(options, checksum=config.kv_checksum, timeout_s=config.lease_ttl_s)
    worker = PrefillWorker(config.worker_id, loop, sender)
    await asyncio.to_thread(worker.warm_up)  # before serving; the engine thread is not running yet
    server = MeshServer(
        ServerOptions(
            host=config.host, port=config.port, grace_s=2.0, tls=security.tls, access=security.access()
        )
    )
    acceptor = HandshakeAcceptor(WorkerInfo(config.worker_id, "prefill", "", "", loaded.fingerprint), sender)
    registry = worker_registry("prefill", loaded.model_id, config.device, engine_stats(loaded.engine))
    servicer = PrefillServicer(worker, acceptor, PrefillMetrics(registry), telemetry=telemetry,
                               expert_spans=ExpertDispatchSpans.install(telemetry, loop, remote))  # fmt: skip
    server.add(worker_pb2_grpc.add_PrefillWorkerServicer_to_server, servicer, "moemesh.v1.PrefillWorker")
    spans_service.add_to_server(server, telemetry.store)
    await server.start()
    me = WorkerInfo(config.worker_id, "prefill", server.address, "", loaded.fingerprint)
    if remote is not None:
        await remote.start()
    on_members = remote.sync if remote is not None else None
    try:
        async with serve_http(metrics_app(registry), config.host, config.http_port):
            await run_worker_server(config, server, me, worker.load, [loop.run()], on_members)
    finally:
        await sender.close()
        if remote is not None:
            await remote.close()
        stop_ucx(reset=False)
        telemetry.shutdown()
    return 0
