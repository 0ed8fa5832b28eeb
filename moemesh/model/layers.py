"""Small building blocks: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import NormOutputs, add_rms_norm, rms_norm, rms_norm_outputs
from moemesh.model.moe_fused import fused_mlp


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back to x's dtype, then times weight (DeepSeek's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass; the sum rounded to x's dtype first."""
        return add_rms_norm(x, residual, self.weight, self.eps)

    def outputs(
        self, x: torch.Tensor, residual: torch.Tensor | None, fp32: bool = False, fp8: bool = False
    ) -> NormOutputs:
        """`forward` (residual None) or `add_forward`, also writing the output in fp32 and / or its 1x128 FP8
        quantization in the same pass: what the next block would otherwise convert it to
        (`InputFormats`)."""
        return rms_norm_outputs(x, self.weight, self.eps, residual, fp32=fp32, fp8=fp8)


@dataclass(frozen=True)
class InputFormats:
    """What a block would convert its input to first, so the norm before it can write it in the same pass."""

    fp32: bool = False  # x.float() (an fp32 router)
    fp8: bool = False  # act_quant(x) (an FP8 GEMM)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); the dense layers and the shared experts. On CUDA (or with `use_fused`)
    gate and up run as one stacked GEMM and SiLU-and-mul as one kernel (`moe_fused.fused_mlp`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.use_fused: bool | None = None  # None: by device
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def fused(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.use_fused is None else self.use_fused

    def input_formats(self, x: torch.Tensor) -> InputFormats:
        return InputFormats(fp8=self.fused(x) and self.gate_proj.weight.dtype == torch.float8_e4m3fn)

    def forward(self, x: torch.Tensor, normed: NormOutputs | None = None) -> torch.Tensor:
        """`normed`: the norm's outputs x came from (its FP8 form, when it wrote one, feeds the FP8 GEMMs)."""
        if self.fused(x):
            x_fp8 = None if normed is None or normed.y_fp8 is None else (normed.y_fp8, normed.y_scale)
            return fused_mlp(self, x, x_fp8)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
