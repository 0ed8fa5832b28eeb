"""`moemesh serve decode` (and `colocated`): composes the decode worker — engine, KV receiver and leases, the
prefill peers, gRPC server, registration, the lease reaper."""

from __future__ import annotations

import argparse
import asyncio
import logging

from moemesh._proto.v1 import worker_pb2_grpc
from moemesh.config.mesh import CUDA_UCX_TRANSPORTS, WorkerConfig
from moemesh.config.telemetry import TelemetryConfig
from moemesh.services.decode.leases import LeaseTable
from moemesh.services.decode.servicer import DecodeServicer
from moemesh.services.decode.worker import DecodeWorker
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.expert_spans import ExpertDispatchSpans
from moemesh.services.metrics_http import engine_stats, metrics_app, serve_http, worker_registry
from moemesh.services.model_loading import load_engine
from moemesh.services.registration import run_worker_server
from moemesh.services.remote_experts import install_remote_experts
from moemesh.services.ucx_lifecycle import stop_ucx, ucx_options
from moemesh.telemetry.metrics import DecodeMetrics
from moemesh.telemetry.tracing import Telemetry
from moemesh.transport import spans as spans_service
from moemesh.transport.channels import MeshChannels
from moemesh.transport.kv_ucx import UcxKvReceiver
from moemesh.transport.peers import PeerSet, WorkerInfo
from moemesh.transport.security import MeshSecurity
from moemesh.transport.server import MeshServer, ServerOptions
from moemesh.transport.ucx import probe_device_memory

log = logging.getLogger(__name__)
COLOCATED_GATHER_S = 0.002  # burst arrivals through the gateway come a few 100 µs apart


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve(WorkerConfig.from_args(args), TelemetryConfig.from_args(args)))


async def serve(config: WorkerConfig, telemetry_config: TelemetryConfig | None = None) -> int:
    security = MeshSecurity.from_config(config.security)
    tc = telemetry_config or TelemetryConfig()
    telemetry = Telemetry.create(f"moemesh-{config.role}", config.worker_id, otlp_endpoint=tc.otlp_endpoint,
                                 trace_buffer=tc.trace_buffer)  # fmt: skip
    loaded = await asyncio.to_thread(load_engine, config)
    remote = install_remote_experts(loaded, config, MeshChannels(security.tls))
    # Remote experts: the event loop carries every MoE layer's round trip, so it never parks during a step.
    # Colocated: a burst of requests (one gateway RPC each) gathers into one first step (EngineLoop.gather_s).
    gather_s = COLOCATED_GATHER_S if config.force_local_prefill else 0.0
    loop = EngineLoop(loaded.engine, exclusive=False if remote is not None else None, gather_s=gather_s)
    receiver = UcxKvReceiver(host=config.host, options=ucx_options(config))
    if not config.force_local_prefill:
        problem = await probe_device_memory(receiver.listener.options, loaded.engine.device)
        if problem is not None:  # said at start-up, not found later as every request prefilled here
            log.error("UCX cannot receive %s memory: %s; KV transfers will fail and requests will be prefilled "
                      "here (set --ucx-transports, e.g. %s)", loaded.engine.device, problem, CUDA_UCX_TRANSPORTS)  # fmt: skip
        await receiver.start()
    server = MeshServer(
        ServerOptions(
            host=config.host, port=config.port, grace_s=2.0, tls=security.tls, access=security.access()
        )
    )
    leases = LeaseTable(loop, receiver, loaded.kv_layout, config.lease_ttl_s)
    loop.loop_needed = lambda: bool(leases.leases)  # KV coming in: keep the loop running during steps
    ucx_address = "" if config.force_local_prefill else receiver.address
    me = WorkerInfo(config.worker_id, config.role, "", ucx_address, loaded.fingerprint)
    peers = PeerSet(me, MeshChannels(security.tls))
    worker = DecodeWorker(config, loop, leases, peers, telemetry=telemetry)

    def pages_leased() -> int:  # reserved for a prefill worker's writes, not yet adopted by the engine
        return sum(len(lease.reservation.page_ids) for lease in list(leases.leases.values()))

    stats = engine_stats(loaded.engine, pages_leased)
    registry = worker_registry(config.role, loaded.model_id, config.device, stats)
    servicer = DecodeServicer(
        worker,
        loaded.engine.max_model_len,
        DecodeMetrics(registry),
        telemetry=telemetry,
        expert_spans=ExpertDispatchSpans.install(telemetry, loop, remote),
    )
    server.add(worker_pb2_grpc.add_DecodeWorkerServicer_to_server, servicer, "moemesh.v1.DecodeWorker")
    spans_service.add_to_server(server, telemetry.store)
    await server.start()
    me = WorkerInfo(config.worker_id, config.role, server.address, ucx_address, loaded.fingerprint)
    background = [loop.run(), leases.reap(config.reaper_interval_s)]
    on_members = worker.on_members
    if remote is not None:
        await remote.start()

        async def on_members(members: list[WorkerInfo]) -> None:
            await worker.on_members(members)
            await remote.sync(members)

    try:
        async with serve_http(metrics_app(registry), config.host, config.http_port):
            await run_worker_server(config, server, me, worker.load, background, on_members)
    finally:
        await peers.close()
        if remote is not None:
            await remote.close()
        if not config.force_local_prefill:
            await receiver.close()
        if not config.force_local_prefill or remote is not None:
            stop_ucx(reset=False)
        telemetry.shutdown()
    return 0
