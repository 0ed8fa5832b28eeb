"""RMSNorm and fused residual-add + RMSNorm, with the numerics of transformers' DeepseekV3RMSNorm.

* `rms_norm(x, weight, eps) -> y`: `y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)`, the
  product in the promoted dtype of weight and x (as torch would compute it).
* `add_rms_norm(x, residual, weight, eps) -> (y, new_residual)`: `new_residual = (x + residual)` rounded to
  x's dtype (the decoder layer's `hidden = residual + hidden`), then `y = rms_norm(new_residual)`. One pass.

`x [..., hidden]` (last dim contiguous, any row stride), `weight [hidden]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    hidden,
    stride_x,
    stride_res,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * hidden + offs, h, mask=mask)
        h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / hidden + eps)
    normed = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must be [{x.shape[-1]}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
        )


def reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeepseekV3RMSNorm (after `hidden = residual + hidden` when a residual is given) in plain torch."""
    _check(x, weight, residual)
    h = x if residual is None else residual + x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), (None if residual is None else h)


def _launch(x, weight, eps, residual):
    _check(x, weight, residual)
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if rows == 0:
        return out, new_res
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x2,
        res2 if res2 is not None else x2,
        weight,
        out,
        new_res if new_res is not None else out,
        hidden,
        x2.stride(0),
        res2.stride(0) if res2 is not None else 0,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return out, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x [..., hidden]`, `weight [hidden]` -> normed, same shape."""
    if not use_triton(x):
        return reference(x, weight, eps)[0]
    return _launch(x, weight, eps, None)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual); the sum rounded to x's dtype before the norm."""
    if not use_triton(x):
        return reference(x, weight, eps, residual)
    return _launch(x, weight, eps, residual)


__all__ = ["add_rms_norm", "reference", "rms_norm"]
