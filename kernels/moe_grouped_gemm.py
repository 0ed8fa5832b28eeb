"""BF16 grouped GEMM for the routed experts at decode sizes, with SiLU-and-mul fused into the first GEMM.

`moe_grouped_gemm(x [M, K], w [E, N, K], offsets int32 [E + 1], silu_mul=False) -> out`:
rows of x sorted by expert (expert e owns rows `offsets[e] : offsets[e + 1]`, the contiguous layout of
`moe_permute`); `out[r] = x[r] @ w[e].T` in x's dtype, fp32 accumulation. With `silu_mul=True`, w is the stacked
`w13 [E, 2I, K]` (gate rows, then up rows) and `out [M, I] = silu(x @ gate.T) * (x @ up.T)`, computed from the
fp32 accumulators (no BF16 round trip of the [M, 2I] product, one launch instead of two). Rows outside
`offsets[0] : offsets[E]` are not written.

One launch, no host sync (CUDA-graph safe): the grid covers `ceil(M / BLOCK_M) + E` row tiles, each program
finds its expert and rows from the offsets on the device (as `fp8_grouped_gemm` does) and programs past the last
tile exit at once. Tiles are small in M (a decode step gives an expert a few rows) and narrow in N, so the
experts' weight streams through many programs at once: this is a weight-bandwidth kernel. `fused_moe` takes it
for decode-sized batches (up to 32 rows per expert on average) and `torch._grouped_mm` above.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import interpreting, use_triton
from moemesh.kernels.fp8_grouped_gemm import expert_row_tile

MAX_ROWS_PER_EXPERT = 32  # fused_moe's threshold: mean rows per expert up to which this kernel runs


@triton.jit
def _grouped_kernel(
    a_ptr, b_ptr, c_ptr, offsets_ptr, E, N_OUT, K, HALF, max_tiles,
    stride_am, stride_be, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    SILU: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program: (row tile, N tile), N tiles of one row tile adjacent (they share A from L2). HALF: the up rows'
    offset into w13 (SILU)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    tile = pid // tiles_n
    pid_n = pid % tiles_n
    num_tiles, expert, offs_m, row_hi = expert_row_tile(offsets_ptr, E, tile, BLOCK_M, BLOCK_E)
    if tile >= num_tiles:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = offs_m < row_hi, offs_n < N_OUT
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None], mask=col_ok[None, :] & (k[:, None] < K), other=0.0)  # [BK, BN]
        if F32:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SILU:
            up = tl.load(
                b_cols + HALF * stride_bn + k[:, None], mask=col_ok[None, :] & (k[:, None] < K), other=0.0
            )
            if F32:
                up = up.to(tl.float32)
            acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, silu_mul: bool) -> None:
    if x.dim() != 2 or w.dim() != 3 or w.shape[2] != x.shape[1] or w.dtype != x.dtype:
        raise ValueError(
            f"x must be [M, K] and w [E, N, K] of one dtype, got x {x.dtype} {tuple(x.shape)}, w {w.dtype} "
            f"{tuple(w.shape)}"
        )
    if tuple(offsets.shape) != (w.shape[0] + 1,) or offsets.dtype != torch.int32:
        raise ValueError(
            f"offsets is {offsets.dtype} {tuple(offsets.shape)}, expected int32 ({w.shape[0] + 1},)"
        )
    if offsets.device != x.device or w.device != x.device:
        raise ValueError(f"x on {x.device}, w on {w.device}, offsets on {offsets.device}: one device")
    if silu_mul and w.shape[1] % 2:
        raise ValueError(f"silu_mul needs w [E, 2I, K] (gate rows, then up rows), got N={w.shape[1]}")


def reference(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, silu_mul: bool = False
) -> torch.Tensor:
    """Expert by expert in fp32 (syncs the host: a reference); rows outside the experts' ranges are zero."""
    _check(x, w, offsets, silu_mul)
    n = w.shape[1] // 2 if silu_mul else w.shape[1]
    out = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            h = x[lo:hi].float() @ w[e].float().T
            if silu_mul:
                h = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
            out[lo:hi] = h.to(x.dtype)
    return out


def moe_grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    silu_mul: bool = False,
    rows_per_expert: int | None = None,
) -> torch.Tensor:
    """Grouped GEMM over expert-sorted rows (module docstring): [M, N], or [M, N / 2] with `silu_mul`.
    rows_per_expert picks the row tile (None: M // E); an expert-pool worker computing part of a layer passes
    the whole layer's, so every row goes through the tile shape it gets in the colocated layer."""
    _check(x, w, offsets, silu_mul)
    if not use_triton(x):
        return reference(x, w, offsets, silu_mul)
    m, k = x.shape
    num_experts, n = w.shape[0], w.shape[1]
    n_out = n // 2 if silu_mul else n
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0 or n_out == 0 or num_experts == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(2) != 1:
        w = w.contiguous()
    rows = max(1, m // num_experts if rows_per_expert is None else rows_per_expert)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64
    max_tiles = triton.cdiv(m, block_m) + num_experts
    _grouped_kernel[(max_tiles * triton.cdiv(n_out, block_n),)](
        x, w, out, offsets, num_experts, n_out, k, n_out, max_tiles,
        x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128 if k >= 128 else max(16, triton.next_power_of_2(k)),
        BLOCK_E=triton.next_power_of_2(num_experts), SILU=silu_mul, F32=interpreting(),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 models: no TF32 rounding
        num_warps=4, num_stages=4,
    )  # fmt: skip
    return out


__all__ = ["MAX_ROWS_PER_EXPERT", "moe_grouped_gemm", "reference"]
