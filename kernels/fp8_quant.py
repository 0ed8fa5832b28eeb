"""FP8 e4m3 quantization in DeepSeek's layouts.

* `weight_quant(w)`: 128x128 blocks, the checkpoint layout: `w_fp8 [N, K]` float8_e4m3fn and `scale_inv fp32
  [ceil(N/128), ceil(K/128)]` with `w ≈ w_fp8 * scale_inv` blockwise. Edge blocks are partial (no padding is
  stored), so N and K need not be multiples of 128 (DeepSeek-V3's 576-row `kv_a_proj_with_mqa`).
* `weight_dequant(w_fp8, scale_inv, dtype)`: the exact inverse map, fp8 value x block scale in `dtype`.
* `act_quant(x, group_size=128, scale_pow2=False)`: activations, one scale per token per group of 128 values:
  `x [M, K]` -> `x_fp8 [M, K]`, `scale fp32 [M, ceil(K/128)]` with `x ≈ x_fp8 * scale`, `scale = amax / 448`
  (or, with `scale_pow2`, the power of two at or above it, so that scaling is exact). K need not be a multiple
  of 128; an all-zero group gets scale 1e-10 / 448 (and zeros).

CUDA tensors take the Triton kernels, CPU tensors the torch references (the interpreter's fp32 -> fp8 cast
rounds some values wrongly, so interpreted runs are compared with a tolerance).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton

FP8_E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-10  # an all-zero group still gets a finite, non-zero scale


def _expand_blocks(scale: torch.Tensor, n: int, k: int, block: int = BLOCK) -> torch.Tensor:
    """[ceil(n/block), ceil(k/block)] -> [n, k], each block's scale repeated over its elements."""
    return scale.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]


def weight_quant_reference(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3 quantization in plain torch. `w [N, K]` any float dtype."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = w.new_zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [nb, kb]
    # a tensor divisor: CUDA divides exactly by it (a scalar divisor becomes a reciprocal multiply there)
    scale_inv = amax / amax.new_full((), FP8_E4M3_MAX)
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    w_fp8 = q.view(nb * block, kb * block)[:n, :k].to(torch.float8_e4m3fn)
    return w_fp8.contiguous(), scale_inv.contiguous()


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_w, stride_q, BLOCK: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    amax = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), 1e-12)
    scale = tl.math.div_rn(amax, 448.0)
    q = tl.clamp(tl.math.div_rn(w, scale), -448.0, 448.0)
    tl.store(
        q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask
    )
    tl.store(s_ptr + pid_n * tl.cdiv(K, BLOCK) + pid_k, scale)


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight into DeepSeek's 128x128-block FP8 checkpoint layout. `w [N, K]` any float dtype."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    if not use_triton(w) or block != BLOCK:
        return weight_quant_reference(w, block)
    n, k = w.shape
    if w.stride(1) != 1:
        w = w.contiguous()
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(-(-n // block), -(-k // block), dtype=torch.float32, device=w.device)
    if w.numel():
        _weight_quant_kernel[scale.shape](w, q, scale, n, k, w.stride(0), q.stride(0), BLOCK=block)
    return q, scale


def act_quant_reference(
    x: torch.Tensor, group_size: int = BLOCK, scale_pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `act_quant`: per-row groups of `group_size` values along the last dimension."""
    _check_act(x, group_size)
    *lead, k = x.shape
    g = -(-k // group_size)
    padded = x.new_zeros(*lead, g * group_size, dtype=torch.float32)
    padded[..., :k] = x.float()
    groups = padded.view(*lead, g, group_size)
    amax = groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    scale = amax / amax.new_full((), FP8_E4M3_MAX)  # a tensor divisor, as in weight_quant_reference
    if scale_pow2:  # round up to a power of two on the bits: exact where log2 would round
        bits = scale.view(torch.int32)
        up = (bits & 0x7F800000) + ((bits & 0x7FFFFF) != 0).to(torch.int32) * 0x800000
        scale = up.view(torch.float32)
    q = (groups / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    x_fp8 = q.view(*lead, g * group_size)[..., :k].to(torch.float8_e4m3fn)
    return x_fp8.contiguous(), scale.contiguous()


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, stride_s,
    GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr, POW2: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    gid = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    cols = gid[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10), 448.0)
    if POW2:
        bits = scale.to(tl.int32, bitcast=True)
        bits = (bits & 0x7F800000) + tl.where((bits & 0x7FFFFF) != 0, 0x800000, 0)
        scale = bits.to(tl.float32, bitcast=True)
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_s + gid, scale, mask=gid * GROUP < K)


def _check_act(x: torch.Tensor, group_size: int) -> None:
    if x.dim() < 1 or not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise ValueError(f"act_quant expects a float tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    if group_size <= 0 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size} must be a power of two")


def act_quant(
    x: torch.Tensor, group_size: int = BLOCK, scale_pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group e4m3 quantization. `x [..., K]` bf16/fp16/fp32 -> `x_fp8 [..., K]` float8_e4m3fn and
    `scale fp32 [..., ceil(K/group_size)]`, `x ≈ x_fp8 * scale` groupwise."""
    _check_act(x, group_size)
    if not use_triton(x):
        return act_quant_reference(x, group_size, scale_pow2)
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, g = x2.shape[0], -(-k // group_size)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, g, dtype=torch.float32, device=x.device)
    if m and k:
        per_prog = min(triton.next_power_of_2(g), max(1, 1024 // group_size))
        grid = (m, triton.cdiv(g, per_prog))
        _act_quant_kernel[grid](
            x2, q, scale, m, k, x2.stride(0), q.stride(0), scale.stride(0),
            GROUP=group_size, GROUPS_PER_PROG=per_prog, POW2=scale_pow2,
        )  # fmt: skip
    return q.view(*lead, k), scale.view(*lead, g)


def weight_dequant(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK
) -> torch.Tensor:
    """fp8 value x its block's scale, computed in `dtype`. `w_fp8 [N, K]`, `scale_inv [ceil(N/128), ceil(K/128)]`."""
    n, k = w_fp8.shape
    expected = (-(-n // block), -(-k // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of shape {(n, k)}"
        )
    return w_fp8.to(dtype) * _expand_blocks(scale_inv.to(dtype), n, k, block)
