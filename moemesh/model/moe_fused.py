"""One MoE layer with local experts built from our kernels: a handful of launches per layer, no host sync.

    ids, w  = moe_route(x @ router.T)                        fp32 GEMM, scores, group limit, top-k, weights:
                                                             one kernel up to 64 rows (moe_route_gemm), else two
    rows    = moe_permute(x, ids)                            expert-sorted rows (decode: 1 launch; FP8: + scales)
    h       = grouped GEMM(rows, w13)                        BF16 decode: moe_grouped_gemm with SiLU-and-mul
                                                             fused (else torch._grouped_mm) · FP8: fp8_grouped_gemm
    a       = silu_mul(h)                                    FP8: fused into the GEMM with the 1x128 requant
    y       = grouped GEMM(a, w2)
    out     = moe_combine(y, w, rows, num_shared=S)          weights, and the shared rows, in one fp32 sum

The shared experts ride in the routed GEMMs (`shared_fusion.fused_experts`: the shared MLP as S experts of the
routed shape stacked after the routed ones, chosen for every token with weight 1 by `moe_permute(...,
num_shared=S)`). Where they cannot (shapes, dtypes), `s = down(silu_mul(x @ [gate | up].T))` runs apart (gate
and up stacked: one GEMM) and `moe_combine(..., shared=s)` adds it. With the routed experts away (`MoE.deferred`)
`deferred_shared` computes the shared experts' rows with the same kernels and tile, so the block's output is the
colocated one bit for bit.

The FP8 path quantizes x once and feeds both the routed experts' and the shared experts' first GEMM with it.
BF16 at decode sizes, `moe_grouped_gemm` loads each program's gate and up rows (two accumulators) and writes
silu(gate) * up; FP8, `fp8_grouped_gemm_silu_quant` does the same with block-scaled tiles (gate and up are
I = k * 128 rows apart, so both tiles start on a scale block) and quantizes each row's 128 outputs (one 1x128
group) in the epilogue; larger BF16 batches keep SiLU-and-mul one launch between torch's GEMMs.

`fused_moe(moe, x)` is what the MoE block calls for local experts on CUDA, `fused_mlp(mlp, x)` what a dense MLP
calls there; on a CPU every op falls back to its torch reference (or, under `TRITON_INTERPRET=1`, runs its
Triton kernel), which is how the tests compare this path with the plain torch one (`set_fused(model, False)`,
`MoE.forward` with `LocalExperts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import (
    NormOutputs,
    RouteConfig,
    act_quant,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_grouped_gemm_silu_quant,
    moe_combine,
    moe_permute,
    moe_route,
    silu_mul,
    silu_mul_quant,
)
from moemesh.kernels.dispatch import use_triton
from moemesh.kernels.moe_grouped_gemm import MAX_ROWS_PER_EXPERT, moe_grouped_gemm
from moemesh.kernels.moe_route import RouteResult
from moemesh.kernels.moe_route_gemm import fusable, moe_route_gemm, route_counters
from moemesh.model.config import ModelConfig
from moemesh.model.shared_fusion import fused_experts, shared_experts
from moemesh.model.stacked import Stacked, stack_linears

FP8 = torch.float8_e4m3fn


def route_config(config: ModelConfig) -> RouteConfig:
    """The gate's fields as `moe_route` takes them."""
    return RouteConfig(
        num_experts_per_tok=config.num_experts_per_tok,
        n_routed_experts=config.n_routed_experts,
        n_group=config.num_groups,
        topk_group=config.group_topk,
        norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor,
        scoring_func=config.scoring_func,
        topk_method=config.topk_method,
    )


def stack_gate_up(mlp: nn.Module) -> Stacked | None:
    """`mlp.gate_proj` and `mlp.up_proj` stacked (gate rows, then up rows; `stacked.stack_linears`)."""
    return stack_linears(mlp, ("gate_proj", "up_proj"))


def fused_mlp(mlp: nn.Module, x: torch.Tensor, x_fp8=None) -> torch.Tensor:
    """down(silu(gate x) * up x) with gate and up as one GEMM; `x_fp8 = (values, scales)` reuses an existing
    1x128 quantization of x for an FP8 gate/up."""
    stacked = stack_gate_up(mlp)
    if stacked is None:
        h = torch.cat([_project(mlp.gate_proj, x, x_fp8), _project(mlp.up_proj, x, x_fp8)], dim=-1)
    else:
        h = stacked(x, x_fp8 if stacked.scale_inv is not None else None)
    down = mlp.down_proj
    if down.weight.dtype == FP8:
        a_fp8, a_scale = silu_mul_quant(h)
        return fp8_gemm(a_fp8, a_scale, down.weight, down.weight_scale_inv, workspace=down.workspace).to(
            x.dtype
        )
    return F.linear(_silu_mul(h), down.weight)


def _project(linear: nn.Module, x: torch.Tensor, x_fp8) -> torch.Tensor:
    """linear(x), through `x_fp8 = (values, scales)` when the projection is FP8 and x is already quantized."""
    if x_fp8 is None or linear.weight.dtype != FP8:
        return linear(x)
    return fp8_gemm(
        x_fp8[0], x_fp8[1], linear.weight, linear.weight_scale_inv, workspace=linear.workspace
    ).to(x.dtype)


def _silu_mul(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in h's dtype: the kernel for 16-bit activations, torch for fp32 (the kernel stores BF16)."""
    if h.dtype == torch.float32:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return silu_mul(h).to(h.dtype)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] sorted by expert (expert e owns rows offsets[e]:offsets[e + 1], offsets[E] = M: every row has
    an expert, as `moe_permute` lays out valid ids), w [E, N, K] -> [M, N] in x's dtype. BF16 with 16-byte
    rows: `torch._grouped_mm`; otherwise (fp32 models, odd test shapes) each row's expert weight is gathered
    and multiplied as a batched GEMV. Neither syncs the host, so both can be captured in a CUDA graph."""
    m, k = x.shape
    n = w.shape[1]
    aligned = (k * x.element_size()) % 16 == 0 and (n * x.element_size()) % 16 == 0
    if aligned and x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:])
    ends = offsets[1:].contiguous()
    rows_i32 = torch.arange(m, dtype=offsets.dtype, device=x.device)
    expert = torch.searchsorted(ends, rows_i32, right=True).clamp_(max=w.shape[0] - 1)  # [M]
    return torch.bmm(w[expert], x[:, :, None])[..., 0]  # [M, N]


def _decode_sized(rows: torch.Tensor, layer_rows: int, num_experts: int) -> bool:
    """BF16 expert rows few enough per expert for `moe_grouped_gemm` (decode); prefill-sized batches take
    `torch._grouped_mm`, tuned for large tiles. layer_rows: the whole layer's (token, slot) rows."""
    return (
        rows.dtype == torch.bfloat16 and use_triton(rows) and layer_rows <= MAX_ROWS_PER_EXPERT * num_experts
    )


def routed_gemms(
    rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, layer_rows: int,
    num_experts: int,
) -> torch.Tensor:  # fmt: skip
    """The fused path's BF16 / fp32 routed-expert math: rows [M, D] sorted by expert (`offsets`, as
    `moe_permute` lays them out) -> unweighted w2(silu(w13 row) * ...) [M, D]. layer_rows and num_experts
    describe the whole MoE layer (its T * k rows over its routed experts) and pick the kernel and its tile, so
    an expert-pool worker holding part of the layer's rows and experts computes each row as the colocated
    layer does (`expert_rows`)."""
    if _decode_sized(
        rows, layer_rows, num_experts
    ):  # weight-bandwidth kernels, SiLU-and-mul in the first one
        per_expert = layer_rows // num_experts
        a = moe_grouped_gemm(rows, w13, offsets, silu_mul=True, rows_per_expert=per_expert)  # [M, I]
        return moe_grouped_gemm(a, w2, offsets, rows_per_expert=per_expert)  # [M, D]
    h = grouped_mm(rows, w13, offsets)  # [M, 2I]
    return grouped_mm(_silu_mul(h), w2, offsets)  # [M, D]


def expert_rows(
    experts: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, layer_rows: int, num_experts: int
) -> torch.Tensor:
    """An expert-pool worker's part of a fused layer: hidden [T, D], ids [T, k] (indices into the stacked
    `experts.w13` / `w2`; -1 for slots another worker computes) -> one unweighted row per slot with an id,
    in (token, slot) order [S, D]: `moe_permute`, then `routed_gemms` with the whole layer's shape."""
    permuted = moe_permute(hidden, ids, experts.w13.shape[0])
    flat = permuted.slot_rows.long()
    mine = flat[
        flat >= 0
    ]  # [S] each computed slot's row, in (token, slot) order; rows 0..S-1 are all of them
    y = routed_gemms(permuted.x[: mine.numel()], experts.w13, experts.w2, permuted.offsets, layer_rows,
                     num_experts)  # fmt: skip
    return y[mine]


# Rows up to which `route` takes the one-launch router (`moe_route_gemm` can do up to FUSED_MAX_ROWS). On the H200
# (V2-Lite, one decode step's 26 MoE layers, graph replay) it took 168 us at batch 1 against 177 for cuBLAS's
# GEMV + `moe_route` (a launch fewer a layer, the same time), and 625 us at batch 64 against 296: its split-K
# reduction by the last program does not scale with rows. Batch 8 is not measured.
ROUTE_GEMM_MAX_ROWS = 8


def route(moe: nn.Module, x: torch.Tensor, normed: NormOutputs | None = None) -> RouteResult:
    """The fused path's routing of x (ids, fp32 weights [T, k]): the fp32 router GEMM and `moe_route` in one
    launch for decode-sized batches (`moe_route_gemm`), the GEMM then `moe_route` above."""
    gate = moe.gate
    bias = gate.e_score_correction_bias
    x_f32 = normed.y_fp32 if normed is not None and normed.y_fp32 is not None else x.float()
    config = route_config(moe.config)
    bias = None if bias is None else bias.float()
    if use_triton(x_f32) and x_f32.shape[0] <= ROUTE_GEMM_MAX_ROWS and fusable(x_f32.shape[0], config):
        counters = getattr(gate, "route_counters", None)  # made once (warm-up, before any graph capture)
        if counters is None or counters.device != x_f32.device:
            counters = gate.route_counters = route_counters(x_f32.device)
        return moe_route_gemm(x_f32, gate.weight.float(), config, bias, counters=counters)
    logits = F.linear(x_f32, gate.weight.float())  # [T, E] fp32
    return moe_route(logits, config, bias)


def fused_shared(moe: nn.Module, x: torch.Tensor, normed: NormOutputs | None = None) -> torch.Tensor | None:
    """The shared experts' output where they cannot ride in the routed GEMMs (None without shared experts):
    `fused_mlp`, fed the 1x128 quantization of x when the routed experts are FP8 (the one they read too)."""
    shared = moe.shared_experts
    if shared is None:
        return None
    x_fp8 = None
    if moe.experts.w13.dtype == FP8:
        have = normed is not None and normed.y_fp8 is not None
        x_fp8 = (normed.y_fp8, normed.y_scale) if have else act_quant(x)
    return fused_mlp(shared, x, x_fp8)


# Tokens up to which the shared experts ride in the routed grouped GEMMs. Above, each shared expert's rows span
# several row tiles that each stream its whole weight, where the stacked GEMM reads it once: on the H200 (V2-Lite
# BF16, batch 64) the fused step's grouped GEMMs took 574 us more and the permute 135 us more, against about
# 400 us for the shared MLP apart. At 16 tokens a shared expert's rows are one tile.
SHARED_FUSION_MAX_TOKENS = 16


def fused_moe(moe: nn.Module, x: torch.Tensor, normed: NormOutputs | None = None) -> torch.Tensor:
    """x [T, D] -> the MoE block's output [T, D] (routed experts + shared experts) in x's dtype.

    `moe` is a `moemesh.model.moe.MoE` whose routed experts are local: `moe.experts` with stacked `w13 [E, 2I,
    D]` and `w2 [E, D, I]` in the compute dtype, or e4m3 with `w13_scale_inv` / `w2_scale_inv` (Fp8Experts).
    `normed`: the norm's outputs x came from; its fp32 copy feeds the router and its FP8 form the experts
    when it wrote them (the same values as x.float() and act_quant(x))."""
    routed = route(moe, x, normed)
    stack = fused_experts(moe)  # routed + shared experts; None: the shared MLP runs apart
    if stack is not None and x.shape[0] > SHARED_FUSION_MAX_TOKENS:
        stack = None  # the routed experts are the stack's leading views: the shared MLP runs apart
    weights = stack or moe.experts
    num_shared = 0 if stack is None else stack.num_shared
    rows, y = _expert_rows(moe, weights, x, normed, routed.ids, num_shared)
    s = None
    if stack is None and moe.shared_experts is not None:
        s = fused_shared(moe, x, normed).to(y.dtype)
    return moe_combine(y, routed.weights, rows.slot_rows, shared=s, num_shared=num_shared).to(x.dtype)


def _expert_rows(moe, weights, x, normed, ids, num_shared: int):
    """(Permuted, its unweighted expert rows) of x's assignments `ids` [T, k] (k may be 0) and, with
    num_shared, every token's shared-expert assignments, over `weights` (w13 / w2 [+ scales] of the routed
    experts then the shared ones). Kernels and tiles are the whole layer's (its T * k routed rows over its
    routed experts) whatever rows this call computes."""
    num_routed = moe.config.n_routed_experts
    layer_rows = x.shape[0] * moe.config.num_experts_per_tok
    num_experts = weights.w13.shape[0] - num_shared  # the routed experts these weights hold
    if weights.w13.dtype == FP8:
        have = normed is not None and normed.y_fp8 is not None
        x_fp8, x_scale = (normed.y_fp8, normed.y_scale) if have else act_quant(x)
        rows = moe_permute(x_fp8, ids, num_experts, x_scale=x_scale, num_shared=num_shared)
        per_expert = max(1, layer_rows // num_routed)
        # [T*k, I] e4m3 + 1x128 scales: SiLU-and-mul and the requant in the first GEMM's epilogue
        a_fp8, a_scale = fp8_grouped_gemm_silu_quant(
            rows.x, rows.x_scale, weights.w13, weights.w13_scale_inv, rows.offsets, rows_per_expert=per_expert
        )
        y = fp8_grouped_gemm(
            a_fp8, a_scale, weights.w2, weights.w2_scale_inv, rows.offsets, rows_per_expert=per_expert
        )
        return rows, y
    rows = moe_permute(x, ids, num_experts, num_shared=num_shared)
    return rows, routed_gemms(rows.x, weights.w13, weights.w2, rows.offsets, layer_rows, num_routed)


def deferred_shared(moe: nn.Module, x: torch.Tensor, normed: NormOutputs | None = None):
    """The shared experts' part of the fused block while its routed experts are away: (ExpertStack, rows [T*S,
    D] expert-major as `fused_moe` computes them, slot_rows [T*S]) when they ride as experts, else (None, the
    shared MLP's output [T, D] or None, None). `combine_deferred` finishes the block."""
    stack = shared_experts(moe)
    if stack is None or x.shape[0] > SHARED_FUSION_MAX_TOKENS:  # as fused_moe: the shared MLP apart
        return None, fused_shared(moe, x, normed), None
    ids = torch.empty(x.shape[0], 0, dtype=torch.int64, device=x.device)
    rows, y = _expert_rows(moe, stack, x, normed, ids, stack.num_shared)
    return stack, y, rows.slot_rows


def combine_deferred(shared, routed: RouteResult, rows: torch.Tensor) -> torch.Tensor:
    """The fused block's combine on the deferred path: `rows` [T*k, D], the pool's unweighted rows in (token,
    slot) order, and `shared` (`deferred_shared`'s answer) -> [T, D] in rows' dtype, summed as `fused_moe` sums
    them (the shared rows first, unweighted, then the weighted routed rows, in fp32)."""
    stack, y_shared, shared_slots = shared
    t, k = routed.ids.shape
    slot_rows = torch.arange(rows.shape[0], dtype=torch.int32, device=rows.device)
    if stack is None:
        y_shared = None if y_shared is None else y_shared.to(rows.dtype)
        return moe_combine(rows, routed.weights, slot_rows, shared=y_shared)
    s = stack.num_shared
    slots = torch.cat([slot_rows.view(t, k), (shared_slots + rows.shape[0]).view(t, s)], dim=1)
    y = torch.cat([rows, y_shared.to(rows.dtype)])
    return moe_combine(y, routed.weights, slots.reshape(-1), num_shared=s)


def set_fused(model: nn.Module, on: bool | None = True) -> int:
    """Sets which path every MoE block and dense MLP of `model` takes: True the fused one (on a CPU too, where
    each op runs its torch reference or, under `TRITON_INTERPRET=1`, its Triton kernel), False the torch
    reference path (also on CUDA: the previous GPU path, for comparisons), None by device (the default: fused
    on CUDA). Returns how many MoE blocks with local experts it set."""
    from moemesh.model.layers import MLP
    from moemesh.model.moe import MoE

    changed = 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.use_fused = on
            changed += m.expert_backend is m.experts
        elif isinstance(m, MLP):
            m.use_fused = on
    return changed
