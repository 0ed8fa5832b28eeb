"""FP8 block-scaled grouped GEMMs for the routed experts: one launch for all experts, no host sync.

Per expert e: `out_e = (a_e * a_scale_e) @ (b[e] * b_scale_inv[e]).T` in BF16, with `b_fp8 [E, N, K]` and
`b_scale_inv fp32 [E, ceil(N/128), ceil(K/128)]` (each expert's weight in the checkpoint's 128x128 blocks) and
A in 1x128 groups (`act_quant`). Two layouts of A:

* contiguous (prefill): `a_fp8 [M, K]`, rows sorted by expert, expert e owning rows
  `expert_offsets[e] : expert_offsets[e + 1]` (`int32 [E + 1]`, non-decreasing; empty experts allowed) ->
  `out [M, N]`. Rows outside `expert_offsets[0] : expert_offsets[E]` are not written. The grid is sized from
  host-known bounds (`ceil(M / BLOCK_M) + E` row tiles); each program finds its expert and rows from the
  offsets on the device, and programs past the last tile exit at once.
* masked (decode): `a_fp8 [E, max_m, K]`, `counts int32 [E]` -> `out [E, max_m, N]`; rows at or past
  `counts[e]` are don't-care (not written). Shapes are fixed, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton
from moemesh.kernels.fp8_gemm import (
    TileConfig,
    _checked,
    _scaled_tile,
    check_operands,
    dequant_blocks,
    dequant_rows,
    pick_config,
)
from moemesh.kernels.fp8_quant import act_quant_reference


@triton.jit
def expert_row_tile(offsets_ptr, E, tile, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile `tile` of a grouped GEMM whose expert e owns rows offsets[e] : offsets[e + 1] (every expert's
    rows cut into BLOCK_M tiles, in expert order): (num_tiles, expert, offs_m, row_hi). A tile at or past
    num_tiles has nothing to do."""
    e = tl.arange(0, BLOCK_E)
    lo = tl.load(offsets_ptr + e, mask=e < E, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    tiles = tl.where(e < E, tl.cdiv(hi - lo, BLOCK_M), 0)
    ends = tl.cumsum(tiles, 0)
    expert = tl.sum((ends <= tile).to(tl.int32), 0)  # the tiles' running sums at or below it
    first_tile = tl.sum(tl.where(e < expert, tiles, 0), 0)
    row_lo = tl.sum(tl.where(e == expert, lo, 0), 0)
    row_hi = tl.sum(tl.where(e == expert, hi, 0), 0)
    offs_m = row_lo + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.max(ends, 0), expert, offs_m, row_hi


@triton.jit
def _grouped_contiguous_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, E, N, K, max_tiles,
    stride_am, stride_as, stride_ask, stride_be, stride_bn, stride_bse, stride_bs, stride_cm,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr, MODE: tl.constexpr,
    cs_ptr, stride_csm, HALF, SILU_QUANT: tl.constexpr,
):  # fmt: skip
    """SILU_QUANT: B is w13 (gate rows, then up rows HALF further, HALF % 128 == 0), N = HALF output columns;
    the tile's gate and up products give silu(gate) * up in fp32, quantized per row over the tile's 128 columns
    (BLOCK_N == 128: one 1x128 group) into e4m3 c and fp32 scales cs [M, N / 128]."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(max_tiles - first_m, GROUP_M)
    tile = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    num_tiles, expert, offs_m, row_hi = expert_row_tile(offsets_ptr, E, tile, BLOCK_M, BLOCK_E)
    if tile >= num_tiles:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = offs_m < row_hi, offs_n < N
    ex = expert.to(tl.int64)
    acc = _scaled_tile(
        a_ptr, as_ptr, b_ptr + ex * stride_be, bs_ptr + ex * stride_bse, offs_m, offs_n, row_ok, col_ok, K,
        stride_am, stride_as, stride_ask, stride_bn, stride_bs, EVEN_K, BLOCK_M, BLOCK_N, MODE,
    )  # fmt: skip
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    if SILU_QUANT:
        up = _scaled_tile(
            a_ptr, as_ptr, b_ptr + ex * stride_be + HALF * stride_bn, bs_ptr + ex * stride_bse + (HALF // 128) * stride_bs,
            offs_m, offs_n, row_ok, col_ok, K, stride_am, stride_as, stride_ask, stride_bn, stride_bs, EVEN_K,
            BLOCK_M, BLOCK_N, MODE,
        )  # fmt: skip
        y = tl.where(col_ok[None, :], acc / (1.0 + tl.exp(-acc)) * up, 0.0)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), axis=1), 1e-10), 448.0)  # act_quant's numerics
        q = tl.clamp(tl.math.div_rn(y, scale[:, None]), -448.0, 448.0)
        tl.store(c, q.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        tl.store(cs_ptr + offs_m.to(tl.int64) * stride_csm + pid_n, scale, mask=row_ok)
    else:
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_masked_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, counts_ptr, max_m, N, K,
    stride_ae, stride_am, stride_ase, stride_as, stride_ask, stride_be, stride_bn, stride_bse, stride_bs, stride_ce, stride_cm,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, expert = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.minimum(tl.load(counts_ptr + expert), max_m)
    if pid_m * BLOCK_M >= count:
        return
    ex = expert.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = offs_m < count, offs_n < N
    acc = _scaled_tile(
        a_ptr + ex * stride_ae, as_ptr + ex * stride_ase, b_ptr + ex * stride_be, bs_ptr + ex * stride_bse,
        offs_m, offs_n, row_ok, col_ok, K, stride_am, stride_as, stride_ask, stride_bn, stride_bs, EVEN_K,
        BLOCK_M, BLOCK_N,
        MODE,
    )  # fmt: skip
    c = c_ptr + ex * stride_ce + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------------------------ references


def reference(a_fp8, a_scale, b_fp8, b_scale_inv, expert_offsets) -> torch.Tensor:
    """Contiguous layout, expert by expert in fp32 on the dequantized operands (syncs the host: a reference)."""
    check_operands(a_fp8, a_scale, b_fp8, b_scale_inv, grouped=True)
    out = torch.zeros(a_fp8.shape[0], b_fp8.shape[1], dtype=torch.bfloat16, device=a_fp8.device)
    bounds = expert_offsets.tolist()
    for e in range(b_fp8.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            a = dequant_rows(a_fp8[lo:hi], a_scale[lo:hi])
            out[lo:hi] = (a @ dequant_blocks(b_fp8[e], b_scale_inv[e]).T).to(torch.bfloat16)
    return out


def reference_silu_quant(a_fp8, a_scale, b_fp8, b_scale_inv, expert_offsets):
    """Contiguous layout, w13 stacked: act_quant(silu(gate) * up) of the fp32 products (no BF16 rounding)."""
    check_operands(a_fp8, a_scale, b_fp8, b_scale_inv, grouped=True)
    half = b_fp8.shape[1] // 2
    y = torch.zeros(a_fp8.shape[0], half, dtype=torch.float32, device=a_fp8.device)
    bounds = expert_offsets.tolist()
    for e in range(b_fp8.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            h = dequant_rows(a_fp8[lo:hi], a_scale[lo:hi]) @ dequant_blocks(b_fp8[e], b_scale_inv[e]).T
            y[lo:hi] = torch.nn.functional.silu(h[:, :half]) * h[:, half:]
    return act_quant_reference(y)


def reference_masked(a_fp8, a_scale, b_fp8, b_scale_inv, counts) -> torch.Tensor:
    """Masked layout in fp32; rows past counts[e] are zero here (the kernel leaves them unwritten)."""
    check_operands(a_fp8, a_scale, b_fp8, b_scale_inv, grouped=True)
    out = torch.einsum("emk,enk->emn", dequant_rows(a_fp8, a_scale), dequant_blocks(b_fp8, b_scale_inv))
    rows = torch.arange(a_fp8.shape[1], device=a_fp8.device)
    return torch.where(rows[None, :, None] < counts[:, None, None], out, 0.0).to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------ launchers


def fp8_grouped_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale_inv: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    config: TileConfig | None = None,
    rows_per_expert: int | None = None,
) -> torch.Tensor:
    """Contiguous grouped GEMM (module docstring): `a_fp8 [M, K]` sorted by expert -> BF16 `[M, N]`.
    rows_per_expert picks the tile (None: M // E; the fused MoE passes its routed experts' mean, so rows of the
    shared experts riding along, or computed apart, take the tile they take together)."""
    if a_fp8.dim() != 2:
        raise ValueError(f"a_fp8 must be [M, K] (contiguous layout), got {tuple(a_fp8.shape)}")
    n, k = check_operands(a_fp8, a_scale, b_fp8, b_scale_inv, grouped=True)
    e = b_fp8.shape[0]
    if tuple(expert_offsets.shape) != (e + 1,) or expert_offsets.dtype != torch.int32:
        raise ValueError(
            f"expert_offsets is {expert_offsets.dtype} {tuple(expert_offsets.shape)}, expected int32 ({e + 1},)"
        )
    if expert_offsets.device != a_fp8.device:
        raise ValueError(f"expert_offsets is on {expert_offsets.device}, a_fp8 on {a_fp8.device}")
    if not use_triton(a_fp8):
        return reference(a_fp8, a_scale, b_fp8, b_scale_inv, expert_offsets)
    m = a_fp8.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a_fp8.device)
    if m == 0 or n == 0 or e == 0:
        return out
    if k == 0:
        return out.zero_()
    a_fp8 = a_fp8.contiguous()  # a_scale may be K-major or M-major
    b_fp8, b_scale_inv = b_fp8.contiguous(), b_scale_inv.contiguous()
    cfg = _checked(config or pick_config(max(1, m // e if rows_per_expert is None else rows_per_expert), n))
    max_tiles = triton.cdiv(m, cfg.block_m) + e
    grid = (max_tiles * triton.cdiv(n, cfg.block_n),)
    _grouped_contiguous_kernel[grid](
        a_fp8, a_scale, b_fp8, b_scale_inv, out, expert_offsets, e, n, k, max_tiles,
        a_fp8.stride(0), a_scale.stride(0), a_scale.stride(1), b_fp8.stride(0), b_fp8.stride(1),
        b_scale_inv.stride(0), b_scale_inv.stride(1), out.stride(0),
        EVEN_K=k % 128 == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
        BLOCK_E=triton.next_power_of_2(e), MODE=cfg.mode, cs_ptr=out, stride_csm=0, HALF=0, SILU_QUANT=False,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def fp8_grouped_gemm_silu_quant(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale_inv: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    rows_per_expert: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts' first GEMM with SiLU-and-mul and the 1x128 requantization fused (contiguous layout):
    `b_fp8` is w13 `[E, 2I, K]` (gate rows, then up rows; I a multiple of 128) -> (`y_fp8 [M, I]` e4m3, `scale
    fp32 [M, I / 128]`) = act_quant(silu(a @ gate.T) * (a @ up.T)) from the fp32 products, one launch instead
    of the GEMM and `silu_mul_quant`. Rows outside the experts' ranges are not written. rows_per_expert: as
    `fp8_grouped_gemm`'s."""
    if a_fp8.dim() != 2:
        raise ValueError(f"a_fp8 must be [M, K] (contiguous layout), got {tuple(a_fp8.shape)}")
    n, k = check_operands(a_fp8, a_scale, b_fp8, b_scale_inv, grouped=True)
    if n % 256:
        raise ValueError(f"b_fp8 must be w13 [E, 2I, K] with I a multiple of 128, got N={n}")
    e = b_fp8.shape[0]
    if tuple(expert_offsets.shape) != (e + 1,) or expert_offsets.dtype != torch.int32:
        raise ValueError(
            f"expert_offsets is {expert_offsets.dtype} {tuple(expert_offsets.shape)}, expected int32 ({e + 1},)"
        )
    if not use_triton(a_fp8):
        return reference_silu_quant(a_fp8, a_scale, b_fp8, b_scale_inv, expert_offsets)
    m, half = a_fp8.shape[0], n // 2
    out = torch.empty(m, half, dtype=torch.float8_e4m3fn, device=a_fp8.device)
    scale = torch.empty(m, half // 128, dtype=torch.float32, device=a_fp8.device)
    if m == 0 or e == 0:
        return out, scale
    a_fp8 = a_fp8.contiguous()
    b_fp8, b_scale_inv = b_fp8.contiguous(), b_scale_inv.contiguous()
    cfg = _checked(pick_config(max(1, m // e if rows_per_expert is None else rows_per_expert), half))
    max_tiles = triton.cdiv(m, cfg.block_m) + e
    grid = (max_tiles * triton.cdiv(half, cfg.block_n),)
    _grouped_contiguous_kernel[grid](
        a_fp8, a_scale, b_fp8, b_scale_inv, out, expert_offsets, e, half, k,
        max_tiles, a_fp8.stride(0), a_scale.stride(0), a_scale.stride(1), b_fp8.stride(0), b_fp8.stride(1),
        b_scale_inv.stride(0), b_scale_inv.stride(1), out.stride(0),
        EVEN_K=k % 128 == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
        BLOCK_E=triton.next_power_of_2(e), MODE=cfg.mode,
        cs_ptr=scale, stride_csm=scale.stride(0), HALF=half, SILU_QUANT=True,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, scale


def fp8_grouped_gemm_masked(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale_inv: torch.Tensor,
    counts: torch.Tensor,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Masked grouped GEMM (module docstring): `a_fp8 [E, max_m, K]`, `counts int32 [E]` -> BF16 `[E, max_m, N]`."""
    if a_fp8.dim() != 3:
        raise ValueError(f"a_fp8 must be [E, max_m, K] (masked layout), got {tuple(a_fp8.shape)}")
    n, k = check_operands(a_fp8, a_scale, b_fp8, b_scale_inv, grouped=True)
    e, max_m = a_fp8.shape[:2]
    if b_fp8.shape[0] != e:
        raise ValueError(f"a_fp8 has {e} experts, b_fp8 {b_fp8.shape[0]}")
    if tuple(counts.shape) != (e,) or counts.dtype != torch.int32 or counts.device != a_fp8.device:
        raise ValueError(
            f"counts is {counts.dtype} {tuple(counts.shape)} on {counts.device}, expected int32 ({e},)"
        )
    if not use_triton(a_fp8):
        return reference_masked(a_fp8, a_scale, b_fp8, b_scale_inv, counts)
    out = torch.empty(e, max_m, n, dtype=torch.bfloat16, device=a_fp8.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    if a_fp8.stride(-1) != 1 or a_scale.stride(-1) != 1:
        a_fp8 = a_fp8.contiguous()  # a_scale may be K-major or M-major
    b_fp8, b_scale_inv = b_fp8.contiguous(), b_scale_inv.contiguous()
    cfg = _checked(config or pick_config(max_m, n))
    grid = (triton.cdiv(max_m, cfg.block_m), triton.cdiv(n, cfg.block_n), e)
    _grouped_masked_kernel[grid](
        a_fp8, a_scale, b_fp8, b_scale_inv, out, counts, max_m, n, k,
        a_fp8.stride(0), a_fp8.stride(1), a_scale.stride(0), a_scale.stride(1), a_scale.stride(2),
        b_fp8.stride(0), b_fp8.stride(1), b_scale_inv.stride(0), b_scale_inv.stride(1), out.stride(0), out.stride(1),
        EVEN_K=k % 128 == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MODE=cfg.mode,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
