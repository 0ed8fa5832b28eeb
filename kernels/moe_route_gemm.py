"""The MoE router's GEMM and `moe_route` in one launch, for decode-sized batches.

`moe_route_gemm(x fp32 [T, H], weight fp32 [E, H], config, e_score_correction_bias) -> RouteResult` equals
`moe_route(x @ weight.T, config, bias)` (same ids, weights within fp32 rounding of the logits): the routing
itself is `moe_route`'s (`_route_tile`), only the logits are computed here.

One launch, grid (row blocks, expert blocks, K splits): each program multiplies BLOCK_T rows of x by BLOCK_E
router rows over one slice of H (fp32, IEEE: no TF32) and stores the partial logits; the last program of a row
block to arrive (a counter per row block, `atomic_add`) sums the slices in a fixed order (deterministic, as
cuBLAS's split-K) and routes its rows, then sets the counter back to 0 for the next launch. The splits are
chosen so that the last program reads at most ~64 KB of partials while the router's weight (V2-Lite: 64 x 2048
fp32, 512 KB; V3: 256 x 7168, 7.3 MB) is read by many programs at once.

Larger batches (T * E > FUSED_MAX_ROW_EXPERTS, or T > FUSED_MAX_ROWS), CPUs without the interpreter, and
group-limited routing over a non-power-of-two expert or group count run the separate GEMM and `moe_route`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton
from moemesh.kernels.moe_route import RouteConfig, RouteResult, _route_tile, _validate, moe_route

FUSED_MAX_ROWS = 64  # rows (tokens) up to which the GEMM runs inside the routing kernel
FUSED_MAX_ROW_EXPERTS = 4096  # and rows x experts (V2-Lite's 64 experts: 64 rows; V3's 256: 16)
NUM_COUNTERS = 64  # row blocks one launch may have (int32 counters, zero between launches)
BLOCK_T = 16  # rows per program (tl.dot's smallest M)
BLOCK_K = 32
PARTIAL_BYTES = 64 << 10  # partial logits the last program of a row block reads, at most (about)


def route_counters(device: torch.device | str) -> torch.Tensor:
    """The int32 counters `moe_route_gemm` needs (zeros; each launch leaves them zero). Keep one per caller
    and reuse it: a CUDA graph replays with the same buffer."""
    return torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)


def fusable(num_rows: int, config: RouteConfig) -> bool:
    """Whether `moe_route_gemm` runs its one kernel for this many rows (else the GEMM and `moe_route`)."""
    e, g = config.n_routed_experts, config.n_group
    grouped = config.grouped and config.topk_group < g
    return (
        0 < num_rows <= FUSED_MAX_ROWS
        and num_rows * e <= FUSED_MAX_ROW_EXPERTS
        and not (grouped and (e & (e - 1) or g & (g - 1)))
    )


def plan_splits(num_rows: int, num_experts: int, hidden: int) -> tuple[int, int, int]:
    """(block_e, k_chunk, split_k): experts per program, columns of H per program (a multiple of BLOCK_K) and
    the number of slices, from the partial-logits budget of the last program of a row block."""
    e_pad = triton.next_power_of_2(num_experts)
    block_e = max(16, min(e_pad, 64))  # tl.dot needs N >= 16: tiny expert counts leave columns masked
    live_rows = min(num_rows, BLOCK_T)
    k_tiles = triton.cdiv(hidden, BLOCK_K)
    want = max(1, min(k_tiles, PARTIAL_BYTES // (live_rows * e_pad * 4)))
    k_chunk = triton.cdiv(k_tiles, want) * BLOCK_K
    return block_e, k_chunk, triton.cdiv(hidden, k_chunk)


@triton.jit
def _route_gemm_kernel(
    x_ptr, wr_ptr, part_ptr, count_ptr, bias_ptr, ids_ptr, w_ptr, T, H, stride_x, stride_wr, scaling,
    E: tl.constexpr, E_REAL: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
    K_PAD: tl.constexpr, V3: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNK: tl.constexpr,
    SPLIT_K: tl.constexpr, N_EBLK: tl.constexpr, ROUTE_T: tl.constexpr, S_BLK: tl.constexpr,
):  # fmt: skip
    """part: fp32 [SPLIT_K, T, E] partial logits; count: int32 per row block. E: experts padded to a power
    of two (E_REAL the real count)."""
    pid_t, pid_e, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    ecols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = ecols < E_REAL
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    k_lo = pid_k * K_CHUNK
    for k0 in tl.range(k_lo, k_lo + K_CHUNK, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        xt = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # fmt: skip
        wt = tl.load(
            wr_ptr + ecols[None, :].to(tl.int64) * stride_wr + ks[:, None],
            mask=e_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # fmt: skip  [BLOCK_K, BLOCK_E]
        acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
    part_rows = part_ptr + pid_k.to(tl.int64) * T * E + rows[:, None].to(tl.int64) * E
    tl.store(part_rows + ecols[None, :], acc, mask=row_ok[:, None] & (ecols[None, :] < E))
    tl.debug_barrier()  # every thread's partials are written before the counter says so
    arrived = tl.atomic_add(count_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
    if arrived == N_EBLK * SPLIT_K - 1:  # the row block's last program: sum the slices in order and route
        cols = tl.arange(0, E)
        real = cols < E_REAL
        sblk = tl.arange(0, S_BLK)
        live = tl.minimum(T - pid_t * BLOCK_T, BLOCK_T)
        for r0 in tl.range(0, live, ROUTE_T):  # sub-tiles of live rows only
            sub = pid_t * BLOCK_T + r0 + tl.arange(0, ROUTE_T)
            sub_ok = sub < T
            offs = sub[:, None].to(tl.int64) * E + cols[None, :]  # [ROUTE_T, E]
            ok = sub_ok[:, None] & real[None, :]
            logits = tl.zeros((ROUTE_T, E), dtype=tl.float32)
            for s0 in tl.static_range(0, SPLIT_K, S_BLK):  # S_BLK slices per load: one round trip each
                s = s0 + sblk
                slab = tl.load(
                    part_ptr + (s[:, None, None] * T).to(tl.int64) * E + offs[None, :, :],
                    mask=(s < SPLIT_K)[:, None, None] & ok[None, :, :],
                    other=0.0,
                    cache_modifier=".cg",
                )  # fmt: skip  [S_BLK, ROUTE_T, E]
                logits += tl.sum(slab, axis=0)
            logits = tl.where(real[None, :], logits, float("-inf"))
            logits = tl.where(sub_ok[:, None], logits, 0.0)
            _route_tile(logits, sub, sub_ok, cols, real, bias_ptr, ids_ptr, w_ptr, scaling, E, G, TOPK_GROUP, K,
                        K_PAD, V3, GROUPED, HAS_BIAS, NORM, ROUTE_T)  # fmt: skip
        tl.atomic_xchg(count_ptr + pid_t, 0)  # ready for the next launch


def _validate_gemm(x: torch.Tensor, weight: torch.Tensor, config: RouteConfig) -> None:
    e = config.n_routed_experts
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be float [T, hidden], got {x.dtype} {tuple(x.shape)}")
    if weight.dim() != 2 or tuple(weight.shape) != (e, x.shape[1]) or weight.device != x.device:
        raise ValueError(
            f"weight must be [n_routed_experts={e}, hidden={x.shape[1]}] on {x.device}, got "
            f"{tuple(weight.shape)} on {weight.device}"
        )


def moe_route_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: RouteConfig,
    e_score_correction_bias: torch.Tensor | None = None,
    ids_dtype: torch.dtype = torch.int32,
    counters: torch.Tensor | None = None,
) -> RouteResult:
    """`moe_route(F.linear(x, weight), config, bias)` with fp32 logits; one launch when `fusable` (x and weight
    fp32 or cast to it; `counters` from `route_counters`, made per call when None)."""
    _validate_gemm(x, weight, config)
    t = x.shape[0]
    if not use_triton(x) or not fusable(t, config):
        return moe_route(F.linear(x.float(), weight.float()), config, e_score_correction_bias, ids_dtype)
    if ids_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_dtype={ids_dtype} must be torch.int32 or torch.int64")
    e, k = config.n_routed_experts, config.num_experts_per_tok
    bias = e_score_correction_bias
    _validate(x.new_empty(0, e), config, bias)
    x = x.float() if x.stride(-1) == 1 else x.float().contiguous()
    weight = weight.float() if weight.stride(-1) == 1 else weight.float().contiguous()
    if counters is None:
        counters = route_counters(x.device)
    n_tblk = triton.cdiv(t, BLOCK_T)
    if counters.dtype != torch.int32 or counters.numel() < n_tblk or counters.device != x.device:
        raise ValueError(f"counters must be int32 with >= {n_tblk} entries on {x.device} (route_counters)")
    e_pad = triton.next_power_of_2(e)
    block_e, k_chunk, split_k = plan_splits(t, e, x.shape[1])
    n_eblk = triton.cdiv(e, block_e)
    partial = torch.empty(split_k, t, e_pad, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, k, dtype=ids_dtype, device=x.device)
    weights = torch.empty(t, k, dtype=torch.float32, device=x.device)
    grouped = config.grouped and config.topk_group < config.n_group
    # rows routed at once by the last program (a power of two up to the live rows: batch 1 routes one row)
    route_t = max(1, min(BLOCK_T, triton.next_power_of_2(t), 4096 // e_pad))
    norm = config.norm_topk_prob and (config.v3 or k > 1)
    scaling = config.routed_scaling_factor if (config.v3 or not norm) else 1.0
    _route_gemm_kernel[(n_tblk, n_eblk, split_k)](
        x, weight, partial, counters, bias if bias is not None else x, ids, weights, t, x.shape[1], x.stride(0),
        weight.stride(0), float(scaling),
        E=e_pad, E_REAL=e, G=config.n_group, TOPK_GROUP=config.topk_group, K=k,
        K_PAD=triton.next_power_of_2(k), V3=config.v3, GROUPED=grouped, HAS_BIAS=bias is not None, NORM=norm,
        BLOCK_T=BLOCK_T, BLOCK_E=block_e, BLOCK_K=BLOCK_K, K_CHUNK=k_chunk, SPLIT_K=split_k, N_EBLK=n_eblk,
        ROUTE_T=route_t, S_BLK=max(1, min(triton.next_power_of_2(split_k), 4096 // (route_t * e_pad))),
        num_warps=4,
    )  # fmt: skip
    return RouteResult(ids, weights)
