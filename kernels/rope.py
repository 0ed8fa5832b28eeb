"""DeepSeek's interleaved rotary embedding from a precomputed cos/sin cache.

Pairs `(x0, x1), (x2, x3), ...` each rotate by one frequency and stay interleaved, as DeepSeek's complex-multiply
reference computes them: `y[2i] = x[2i] cos_i - x[2i+1] sin_i`, `y[2i+1] = x[2i+1] cos_i + x[2i] sin_i`, in
fp32, rounded to x's dtype. YaRN and mscale are already folded into the cache by the model.

* `rope(x, positions, cos_cache, sin_cache, out=None) -> y`: `x [T, rope_dim]` or `[T, H, rope_dim]` (last dim
  contiguous, any other strides: q_pe and k_pe are slices of wider rows), `positions int64 [T]`, `cos_cache,
  sin_cache fp32 [max_pos, rope_dim / 2]`. `out=x` rotates in place.
* The fused "rope k_pe and write it into the latent cache" is `paged_kv.store_kv(..., rope=RopeTables(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton


@dataclass(frozen=True)
class RopeTables:
    """What rotates a token: its position and the model's cos/sin cache (fp32 [max_pos, rope_dim / 2])."""

    positions: torch.Tensor  # int64 [T]
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor


@triton.jit
def rotate_pairs(x_even, x_odd, cos_ptr, sin_ptr, pos, offs_half, mask_half, stride_cache):
    """Rotates fp32 pairs (x_even, x_odd) [..., BLOCK_HALF] by the angles of position `pos`."""
    c = tl.load(cos_ptr + pos * stride_cache + offs_half, mask=mask_half, other=1.0)
    s = tl.load(sin_ptr + pos * stride_cache + offs_half, mask=mask_half, other=0.0)
    return x_even * c - x_odd * s, x_odd * c + x_even * s


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    num_heads,
    half,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_cache,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < half
    mask = (offs_h[:, None] < num_heads) & mask_i[None, :]
    pos = tl.load(pos_ptr + t)
    x_row = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + 2 * offs_i[None, :]
    xe = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_row + 1, mask=mask, other=0.0).to(tl.float32)
    ye, yo = rotate_pairs(xe, xo, cos_ptr, sin_ptr, pos, offs_i[None, :], mask_i[None, :], stride_cache)
    o_row = out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + 2 * offs_i[None, :]
    tl.store(o_row, ye.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + 1, yo.to(out_ptr.dtype.element_ty), mask=mask)


def check_tables(tables: RopeTables, num_tokens: int, rope_dim: int, device: torch.device) -> None:
    pos, cos, sin = tables.positions, tables.cos_cache, tables.sin_cache
    if tuple(pos.shape) != (num_tokens,) or pos.dtype != torch.int64:
        raise ValueError(f"positions must be int64 [{num_tokens}], got {pos.dtype} {tuple(pos.shape)}")
    for name, c in (("cos_cache", cos), ("sin_cache", sin)):
        if c.dim() != 2 or c.shape[1] != rope_dim // 2 or c.dtype != torch.float32 or c.stride(-1) != 1:
            raise ValueError(
                f"{name} must be fp32 [max_pos, {rope_dim // 2}] (contiguous rows), got {c.dtype} {tuple(c.shape)}"
            )
    if cos.stride(0) != sin.stride(0) or cos.shape != sin.shape:
        raise ValueError(
            f"cos_cache and sin_cache differ: {tuple(cos.shape)} {cos.stride()} vs {sin.stride()}"
        )
    for name, t in (("positions", pos), ("cos_cache", cos), ("sin_cache", sin)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, x on {device}")


def _check(x: torch.Tensor, tables: RopeTables) -> None:
    if x.dim() not in (2, 3) or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(
            f"x must be [T, rope_dim] or [T, H, rope_dim] with an even, contiguous last dim, "
            f"got shape {tuple(x.shape)} strides {x.stride()}"
        )
    check_tables(tables, x.shape[0], x.shape[-1], x.device)


def reference(x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor):
    """DeepSeek's complex multiply: view pairs as complex numbers, multiply by cos + i sin, back to real."""
    _check(x, RopeTables(positions, cos_cache, sin_cache))
    angle = torch.complex(cos_cache[positions], sin_cache[positions])  # [T, rope_dim / 2]
    if x.dim() == 3:
        angle = angle[:, None, :]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * angle).flatten(-2).to(x.dtype)


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotates `x [T, (H,) rope_dim]` by each token's position; `out=x` works in place."""
    if not use_triton(x):
        y = reference(x, positions, cos_cache, sin_cache)
        return y if out is None else out.copy_(y)
    _check(x, RopeTables(positions, cos_cache, sin_cache))
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(
            f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)} strides {out.stride()}"
        )
    x3 = x if x.dim() == 3 else x[:, None, :]
    o3 = out if out.dim() == 3 else out[:, None, :]
    num_tokens, num_heads, rope_dim = x3.shape
    if num_tokens == 0:
        return out
    block_h = min(16, triton.next_power_of_2(num_heads))
    _rope_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        x3,
        o3,
        positions,
        cos_cache,
        sin_cache,
        num_heads,
        rope_dim // 2,
        x3.stride(0),
        x3.stride(1),
        o3.stride(0),
        o3.stride(1),
        cos_cache.stride(0),
        BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(rope_dim // 2),
        num_warps=4,
    )
    return out


__all__ = ["RopeTables", "reference", "rope"]
