"""RMSNorm and fused residual-add + RMSNorm, with the numerics of transformers' DeepseekV3RMSNorm.

* `rms_norm(x, weight, eps) -> y`: `y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)`, the
  product in the promoted dtype of weight and x (as torch would compute it).
* `add_rms_norm(x, residual, weight, eps) -> (y, new_residual)`: `new_residual = (x + residual)` rounded to
  x's dtype (the decoder layer's `hidden = residual + hidden`), then `y = rms_norm(new_residual)`. One pass.

* `rms_norm_outputs(x, weight, eps, residual=None, fp32=False, fp8=False) -> NormOutputs`: either of the above,
  also writing y in fp32 (an fp32 router's input) and / or y's 1x128 e4m3 quantization with `act_quant`'s
  numerics (an FP8 GEMM's input): the conversion launches folded into the norm's pass.

`x [..., hidden]` (last dim contiguous, any row stride), `weight [hidden]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton
from moemesh.kernels.fp8_quant import act_quant_reference


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
    f32_ptr,  # F32: the output again in fp32 [rows, hidden]
    q_ptr,  # QUANT: act_quant of the output, e4m3 [rows, hidden] and fp32 scales [rows, ceil(hidden / 128)]
    s_ptr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    F32: tl.constexpr = False,
    QUANT: tl.constexpr = False,
    GROUP: tl.constexpr = 128,
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
    y = (normed * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * hidden + offs, y, mask=mask)
    if F32:
        tl.store(f32_ptr + row * hidden + offs, y.to(tl.float32), mask=mask)
    if QUANT:  # act_quant's numerics on the stored values: 1x128 groups, scale = max(amax, 1e-10) / 448
        NUM_GROUPS: tl.constexpr = BLOCK // GROUP
        yg = tl.reshape(tl.where(mask, y.to(tl.float32), 0.0), [NUM_GROUPS, GROUP])
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(yg), axis=1), 1e-10), 448.0)
        q = tl.reshape(tl.clamp(tl.math.div_rn(yg, scale[:, None]), -448.0, 448.0), [BLOCK])
        tl.store(q_ptr + row * hidden + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        gid = tl.arange(0, NUM_GROUPS)
        tl.store(s_ptr + row * tl.cdiv(hidden, 128) + gid, scale, mask=gid * GROUP < hidden)


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


@dataclass(frozen=True)
class NormOutputs:
    """`rms_norm_outputs`: the normed rows and what the next op would otherwise convert them to."""

    y: torch.Tensor  # [..., hidden], as rms_norm returns it
    residual: torch.Tensor | None  # x + residual, as add_rms_norm returns it (None without a residual)
    y_fp32: torch.Tensor | None  # y in fp32 (fp32=True): an fp32 router's input
    y_fp8: torch.Tensor | None  # act_quant(y) (fp8=True): e4m3 [..., hidden] ...
    y_scale: torch.Tensor | None  # ... and fp32 [..., ceil(hidden / 128)]


def rms_norm_outputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    fp32: bool = False,
    fp8: bool = False,
) -> NormOutputs:
    """`rms_norm` (with a residual: `add_rms_norm`) that also writes y in fp32 and / or y's 1x128 FP8
    quantization (`act_quant(y)`'s numerics) in the same pass."""
    if not use_triton(x):
        y, new_res = reference(x, weight, eps, residual)
        q, scale = act_quant_reference(y) if fp8 else (None, None)
        return NormOutputs(y, new_res, y.float() if fp32 else None, q, scale)
    return _launch(x, weight, eps, residual, fp32=fp32, fp8=fp8)


def _launch(x, weight, eps, residual, fp32=False, fp8=False) -> NormOutputs:
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
    f32 = torch.empty(x.shape, dtype=torch.float32, device=x.device) if fp32 else None
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) if fp8 else None
    scale = (
        torch.empty(*x.shape[:-1], -(-hidden // 128), dtype=torch.float32, device=x.device) if fp8 else None
    )
    if rows == 0:
        return NormOutputs(out, new_res, f32, q, scale)
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
        f32 if f32 is not None else out,
        q if q is not None else out,
        scale if scale is not None else out,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        F32=fp32,
        QUANT=fp8,
        GROUP=min(128, block),
        num_warps=min(16, max(1, block // 512)),
    )
    return NormOutputs(out, new_res, f32, q, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x [..., hidden]`, `weight [hidden]` -> normed, same shape."""
    if not use_triton(x):
        return reference(x, weight, eps)[0]
    return _launch(x, weight, eps, None).y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual); the sum rounded to x's dtype before the norm."""
    if not use_triton(x):
        return reference(x, weight, eps, residual)
    out = _launch(x, weight, eps, residual)
    return out.y, out.residual


__all__ = ["NormOutputs", "add_rms_norm", "reference", "rms_norm", "rms_norm_outputs"]
