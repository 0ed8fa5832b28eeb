"""SiLU-and-mul between the two expert GEMMs, optionally fused with the FP8 requantization of its output.

`x [..., 2 * I]` holds the gate projection then the up projection (DeepSeek's `w1`, `w3` stacked):
`silu_mul(x) = silu(x[..., :I]) * x[..., I:]` in BF16; `silu_mul_quant(x)` returns the same values in 1x128-group
e4m3 (`act_quant`'s layout: `y_fp8 [..., I]`, `scale fp32 [..., ceil(I/128)]`) without a BF16 round trip. The
product is computed in fp32 in both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton
from moemesh.kernels.fp8_quant import act_quant_reference


@triton.jit
def _silu_mul_kernel(
    x_ptr, y_ptr, s_ptr, I, stride_x, stride_y, stride_s,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_PROG: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    gid = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    cols = gid[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    if QUANT:
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), axis=1), 1e-10), 448.0)
        y = tl.clamp(tl.math.div_rn(y, scale[:, None]), -448.0, 448.0)
        tl.store(s_ptr + row * stride_s + gid, scale, mask=gid * GROUP < I)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor) -> int:
    if x.dim() < 1 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [..., 2 * I], got {x.dtype} {tuple(x.shape)}")
    return x.shape[-1] // 2


def reference(x: torch.Tensor) -> torch.Tensor:
    i = _check(x)
    return (torch.nn.functional.silu(x[..., :i].float()) * x[..., i:].float()).to(torch.bfloat16)


def reference_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = _check(x)
    return act_quant_reference(torch.nn.functional.silu(x[..., :i].float()) * x[..., i:].float())


def _launch(x: torch.Tensor, quant: bool):
    i = _check(x)
    *lead, _ = x.shape
    x2 = x.reshape(-1, 2 * i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, g = x2.shape[0], -(-i // 128)
    y = torch.empty(m, i, dtype=torch.float8_e4m3fn if quant else torch.bfloat16, device=x.device)
    scale = torch.empty(m, g if quant else 0, dtype=torch.float32, device=x.device)
    if m and i:
        per_prog = min(triton.next_power_of_2(g), 8)
        _silu_mul_kernel[(m, triton.cdiv(g, per_prog))](
            x2, y, scale, i, x2.stride(0), y.stride(0), max(1, scale.stride(0)),
            QUANT=quant, GROUP=128, GROUPS_PER_PROG=per_prog,
        )  # fmt: skip
    return y.view(*lead, i), scale.view(*lead, scale.shape[-1])


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """BF16 [..., I] = silu(gate) * up for `x [..., 2 * I]` (bf16/fp16/fp32)."""
    if not use_triton(x):
        return reference(x)
    return _launch(x, quant=False)[0]


def silu_mul_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up quantized to 1x128-group e4m3: (`y_fp8 [..., I]`, `scale fp32 [..., ceil(I/128)]`)."""
    if not use_triton(x):
        return reference_quant(x)
    return _launch(x, quant=True)
