"""moemesh GPU kernels: one op per file (Triton kernel, launcher, torch reference).

CUDA tensors take the Triton kernel, CPU tensors the torch reference (see `dispatch`). Importing this package
imports triton but touches no GPU.
"""

from moemesh.kernels.fp8_gemm import fp8_gemm
from moemesh.kernels.fp8_grouped_gemm import (
    fp8_grouped_gemm,
    fp8_grouped_gemm_masked,
    fp8_grouped_gemm_silu_quant,
)
from moemesh.kernels.fp8_quant import act_quant, weight_dequant, weight_quant
from moemesh.kernels.mla_decode import mla_decode
from moemesh.kernels.mla_prefill import merge_attn_states, mla_prefill
from moemesh.kernels.moe_permute import Permuted, moe_combine, moe_permute
from moemesh.kernels.moe_route import RouteConfig, RouteResult, moe_route
from moemesh.kernels.moe_route_gemm import moe_route_gemm, route_counters
from moemesh.kernels.paged_kv import StoreExtras, pack_kv, store_kv, unpack_kv
from moemesh.kernels.rms_norm import NormOutputs, add_rms_norm, rms_norm, rms_norm_outputs
from moemesh.kernels.rope import RopeTables, rope
from moemesh.kernels.sample import SampleResult, SamplingTensors, sample, token_counts
from moemesh.kernels.silu_mul import silu_mul, silu_mul_quant
from moemesh.kernels.token_format import TokenFormat, TokenLayout, decode_tokens, encode_tokens, fp8_views

__all__ = [
    "act_quant",
    "weight_dequant",
    "weight_quant",
    "mla_decode",
    "mla_prefill",
    "merge_attn_states",
    "StoreExtras",
    "pack_kv",
    "store_kv",
    "unpack_kv",
    "NormOutputs",
    "add_rms_norm",
    "rms_norm_outputs",
    "rms_norm",
    "RopeTables",
    "rope",
    "SampleResult",
    "SamplingTensors",
    "sample",
    "token_counts",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_masked",
    "fp8_grouped_gemm_silu_quant",
    "silu_mul",
    "silu_mul_quant",
    "Permuted",
    "moe_combine",
    "moe_permute",
    "RouteConfig",
    "RouteResult",
    "moe_route",
    "moe_route_gemm",
    "route_counters",
    "TokenFormat",
    "TokenLayout",
    "decode_tokens",
    "encode_tokens",
    "fp8_views",
]
