"""Small building blocks: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import add_rms_norm, rms_norm
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


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); the dense layers and the shared experts. On CUDA (or with `use_fused`)
    gate and up run as one stacked GEMM and SiLU-and-mul as one kernel (`moe_fused.fused_mlp`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.use_fused: bool | None = None  # None: by device
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda if self.use_fused is None else self.use_fused:
            return fused_mlp(self, x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
