"""An attention worker's routed experts in the expert pool (`--remote-experts`, topology pd-experts): builds
`RemoteExperts` (transport) with the token-format encoder (kernels/token_format.py — services may import
kernels, transport may not), routes every MoE layer of the loaded model to it and frees the local copies of
the routed experts. Prefill, decode and colocated workers call `install_remote_experts` after loading.

CUDA graphs cannot span a remote call: `load_engine` builds the engine without decode graphs when experts are
remote (docs/experts.md says what that costs)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import torch

from moemesh.config.mesh import WorkerConfig
from moemesh.kernels.token_format import TokenFormat, encode_tokens
from moemesh.services.model_loading import LoadedModel
from moemesh.services.ucx_lifecycle import ucx_options
from moemesh.transport.expert_client import RemoteExperts, RemoteExpertsOptions

_FORMATS = {"bf16": TokenFormat.BF16, "fp8": TokenFormat.FP8}


def token_encoder(token_format: str):
    """hidden [T, D] -> the token buffer. BF16 carries bf16 hidden states exactly (an fp32 model's are
    rounded to bf16 first); FP8 quantizes per 1x128 group."""
    fmt = _FORMATS[token_format]

    def encode(hidden: torch.Tensor) -> torch.Tensor:
        if fmt == TokenFormat.BF16 and hidden.dtype != torch.bfloat16:
            hidden = hidden.to(torch.bfloat16)
        return encode_tokens(hidden.contiguous(), fmt)

    return encode


def wire_device(config: WorkerConfig, device: torch.device) -> torch.device:
    """Device memory goes on the wire only when UCX may pick a CUDA transport; else it is staged on the host."""
    transports = config.ucx_transports
    return (
        device if device.type == "cuda" and (not transports or "cuda" in transports) else torch.device("cpu")
    )


def install_remote_experts(
    loaded: LoadedModel, config: WorkerConfig, channels: Callable[[str], grpc.aio.Channel]
) -> RemoteExperts | None:
    """None unless config.remote_experts. Call `await remote.start()` on the event loop before the first step,
    and `remote.sync(members)` with each membership. channels: the worker's gRPC channel factory (mTLS when
    configured) for DescribeExperts."""
    if not config.remote_experts:
        return None
    model = loaded.engine.model
    layers = model.moe_layers()
    remote = RemoteExperts(
        [moe.layer_idx for moe in layers],
        loaded.model_config.n_routed_experts,
        token_encoder(config.expert_token_format),
        RemoteExpertsOptions(config.expert_token_format, config.expert_timeout_s, config.expert_timeout_s),
        ucx_options(config),
        channels,
        wire_device(config, loaded.engine.device),
    )
    for moe in layers:
        moe.set_expert_backend(remote)
        for param in (moe.experts.w13, moe.experts.w2):  # the pool holds them now
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    return remote
