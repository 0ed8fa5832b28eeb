"""An attention worker's routed experts in the expert pool (`--remote-experts`, topology pd-experts): builds
`RemoteExperts` (transport) with the token-format encoder (kernels/token_format.py — services may import
kernels, transport may not), routes every MoE layer of the loaded model to it and frees the local copies of
the routed experts. Prefill, decode and colocated workers call `install_remote_experts` after loading.

CUDA graphs cannot span a remote call: `load_engine` builds the engine without decode graphs when experts are
remote (docs/experts.md says what that costs).

The local routed weights go before the engine is built (`detach_routed_experts`, called by `load_engine`), so
on a GPU the engine plans its KV pool from what the worker really holds: planned with them, an attention
worker sharing a card under `moemesh up` counted every routed expert of the model against its share (a
V2-Lite's 29 GB against a quarter of an H200 in pd-experts with two expert workers: no KV pages left)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import torch

from moemesh.config.mesh import WorkerConfig
from moemesh.kernels.token_format import TokenFormat, encode_tokens
from moemesh.services.ucx_lifecycle import ucx_options
from moemesh.transport.expert_client import RemoteExperts, RemoteExpertsOptions

if TYPE_CHECKING:  # model_loading calls detach_routed_experts
    from moemesh.services.model_loading import LoadedModel

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


class _Ready:
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def result(self) -> torch.Tensor:
        return self.rows


class AwayExperts:
    """The routed experts between `detach_routed_experts` and `install_remote_experts`: a deferred backend
    whose answer is zero rows of the shape the pool's would have ([T * k, D] unweighted, else [T, D]), so the
    engine's memory profile (CUDA: one prefill of max_num_batched_tokens) runs each block as it will run with
    the pool — routing, the shared experts, the combine — without its routed weights. Never serves a request:
    the worker installs `RemoteExperts` before it registers."""

    def __call__(self, layer_idx, hidden, topk_ids, topk_weights) -> torch.Tensor:  # noqa: D102 (ExpertBackend)
        return self.submit(layer_idx, hidden, topk_ids, topk_weights).result()

    def submit(self, layer_idx, hidden, topk_ids, topk_weights, *, unweighted: bool = False) -> _Ready:
        rows = topk_ids.numel() if unweighted else topk_ids.shape[0]
        return _Ready(torch.zeros(rows, hidden.shape[1], dtype=hidden.dtype, device=hidden.device))


def detach_routed_experts(model: torch.nn.Module) -> int:
    """Frees the local routed-expert weights of every MoE layer (the pool holds them) and puts `AwayExperts`
    in their place; -> the bytes freed. Call before the engine plans its memory."""
    freed = 0
    for moe in model.moe_layers():
        moe.set_expert_backend(AwayExperts())
        for param in moe.experts.parameters():
            freed += param.numel() * param.element_size()
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # back to the driver: the KV plan and the workers sharing the card see it
    return freed


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
    detach_routed_experts(model)  # a no-op after load_engine's (the pool holds them)
    for moe in layers:
        moe.set_expert_backend(remote)
    return remote
