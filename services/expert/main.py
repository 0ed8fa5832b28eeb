"""`moemesh serve expert`: composes the expert-pool worker — its experts from the checkpoint, the expert wire
over UCX, the ExpertPool gRPC service (+ health), registration with the gateway.

    moemesh serve expert --model DIR --experts 0/4 --registry GATEWAY   # the first quarter of the experts
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import logging

import torch

from moemesh._proto.v1 import expert_pb2_grpc
from moemesh.config.mesh import WorkerConfig, parse_expert_set
from moemesh.model.config import ModelConfig
from moemesh.model.expert_shard import load_expert_shard
from moemesh.services.expert.servicer import ExpertServicer
from moemesh.services.expert.worker import ExpertWorker
from moemesh.services.metrics_http import metrics_app, serve_http
from moemesh.services.registration import run_worker_server
from moemesh.services.remote_experts import wire_device
from moemesh.services.ucx_lifecycle import stop_ucx, ucx_options
from moemesh.telemetry.metrics import ExpertMetrics, new_registry, register_build_info
from moemesh.transport import spans as spans_service
from moemesh.transport.expert_server import UcxExpertServer
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.security import MeshSecurity
from moemesh.transport.server import MeshServer, ServerOptions

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(args: argparse.Namespace) -> int:
    return asyncio.run(serve(WorkerConfig.from_args(args)))


def device_and_dtype(config: WorkerConfig) -> tuple[torch.device, torch.dtype]:
    """As the attention workers resolve them (`load_engine`), so both sides compute in the same dtype."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[config.dtype]


def cap_device_memory(config: WorkerConfig, device: torch.device) -> None:
    """On a GPU, the worker's allocator may take its share of the card (`--gpu-memory-fraction`, which `moemesh
    up` plans for every worker sharing it), so a worker that outgrows it fails itself, not its neighbours."""
    if device.type == "cuda":  # device.index None: the current device
        torch.cuda.set_per_process_memory_fraction(float(config.engine.gpu_memory_utilization), device.index)


def load_worker(config: WorkerConfig, metrics: ExpertMetrics | None = None) -> ExpertWorker:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device, dtype = device_and_dtype(config)
    cap_device_memory(config, device)
    model_config = ModelConfig.from_file(config.model_dir / "config.json")
    hosted = parse_expert_set(config.experts, model_config.n_routed_experts)
    shard = load_expert_shard(config.model_dir, hosted, device, dtype)
    log.info("%s hosts %d of %d routed experts (%s) of %d MoE layers on %s in %s", config.worker_id, len(hosted),
             model_config.n_routed_experts, config.experts, len(shard.layers), device, dtype)  # fmt: skip
    load_experts = functools.partial(load_expert_shard, config.model_dir, device=device, dtype=dtype)
    return ExpertWorker(config.worker_id, shard, device, dtype, metrics, load_experts)


async def serve(config: WorkerConfig) -> int:
    security = MeshSecurity.from_config(config.security)
    registry = new_registry()  # /metrics on --http-port: build info, tokens per expert, batches
    register_build_info(registry, version=importlib.metadata.version("moemesh"), role="expert",
                        model=config.model_dir.name, device=config.device)  # fmt: skip
    worker = await asyncio.to_thread(load_worker, config, ExpertMetrics(registry))
    wire = UcxExpertServer(worker.compute, config.host, options=ucx_options(config),
                           wire_device=wire_device(config, worker.device))  # fmt: skip
    await wire.start()
    server = MeshServer(
        ServerOptions(
            host=config.host, port=config.port, grace_s=2.0, tls=security.tls, access=security.access()
        )
    )
    server.add(expert_pb2_grpc.add_ExpertPoolServicer_to_server, ExpertServicer(worker, wire.address),
               "moemesh.v1.ExpertPool")  # fmt: skip
    spans_service.add_to_server(server, None)  # no spans of its own: the trace view asks every worker
    await server.start()
    me = WorkerInfo(config.worker_id, "expert", server.address, wire.address)
    try:
        async with serve_http(metrics_app(registry), config.host, config.http_port):
            await run_worker_server(config, server, me, worker.load, [])
    finally:
        await wire.close()
        worker.close()
        stop_ucx(reset=False)
    return 0
