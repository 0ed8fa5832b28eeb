"""Projections that read the same input, stacked into one weight so one GEMM computes them all: an MLP's gate and
up, MLA's first query projection (`q_proj` or `q_a_proj`) and `kv_a_proj_with_mqa`.

`stack_linears(owner, names)` concatenates the named projections' weights once, in order, and makes each
module's own parameters views into the stacked one (nothing stored twice; the state dict and the checkpoint
loader see the same names). FP8 projections (`Fp8Linear`: e4m3 weight + 128x128 block scales) stack when every
part but the last has a multiple of 128 rows, so no scale block straddles two parts. Projections with a bias do
not stack. A module whose parameters were replaced since (`.to()`, `load_state_dict` with assign) is stacked
again on the next call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moemesh.kernels import act_quant, fp8_gemm
from moemesh.kernels.fp8_gemm import SplitKWorkspace

FP8 = torch.float8_e4m3fn
BLOCK = 128


@dataclass(frozen=True)
class Stacked:
    """Weights stacked by rows, part after part: `weight [sum N_i, K]` in the compute dtype or e4m3,
    `scale_inv fp32 [sum ceil(N_i / 128), ceil(K / 128)]` for FP8, `sizes` the N_i; `workspace` the FP8 parts'
    split-K workspace (`Fp8Linear.workspace`)."""

    weight: torch.Tensor
    scale_inv: torch.Tensor | None
    sizes: tuple[int, ...]
    workspace: SplitKWorkspace | None = None

    def __call__(self, x: torch.Tensor, x_fp8=None) -> torch.Tensor:
        """x [T, K] -> [T, sum N_i] in x's dtype; `x_fp8 = (values, scales)` reuses a 1x128 quantization of x."""
        if self.scale_inv is None:
            return torch.nn.functional.linear(x, self.weight)
        xq, xs = x_fp8 if x_fp8 is not None else act_quant(x)
        return fp8_gemm(xq, xs, self.weight, self.scale_inv, workspace=self.workspace).to(x.dtype)


def stack_linears(owner: nn.Module, names: tuple[str, ...]) -> Stacked | None:
    """The stacked weight of `owner`'s projections `names` (stacking them in place the first time), or None
    when they cannot stack (module docstring)."""
    mods = [getattr(owner, n) for n in names]
    key = "_stacked_" + "_".join(names)
    cached: Stacked | None = owner.__dict__.get(key)
    if cached is not None and _views_of(cached, mods):
        return cached
    if any(getattr(m, "bias", None) is not None for m in mods):
        return None
    fp8 = mods[0].weight.dtype == FP8
    if any((m.weight.dtype == FP8) != fp8 or m.weight.dtype != mods[0].weight.dtype for m in mods):
        return None
    if len({m.weight.shape[1] for m in mods}) != 1:
        return None
    sizes = tuple(m.weight.shape[0] for m in mods)
    if fp8 and any(n % BLOCK for n in sizes[:-1]):
        return None
    with torch.inference_mode(False), torch.no_grad():  # real parameters, even when first called in a forward
        weight = torch.cat([m.weight for m in mods])
        scale = torch.cat([m.weight_scale_inv for m in mods]) if fp8 else None
        row = block = 0
        for m, n in zip(mods, sizes, strict=True):
            m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
            if fp8:
                blocks = -(-n // BLOCK)
                m.weight_scale_inv = nn.Parameter(scale[block : block + blocks], requires_grad=False)
                block += blocks
            row += n
    stacked = Stacked(weight, scale, sizes, getattr(mods[0], "workspace", None))
    owner.__dict__[key] = stacked
    return stacked


def _views_of(stacked: Stacked, mods: list[nn.Module]) -> bool:
    row = block = 0
    for m, n in zip(mods, stacked.sizes, strict=True):
        if m.weight.data_ptr() != stacked.weight[row:].data_ptr() or m.weight.shape[0] != n:
            return False
        if stacked.scale_inv is not None:
            if m.weight_scale_inv.data_ptr() != stacked.scale_inv[block:].data_ptr():
                return False
            block += -(-n // BLOCK)
        row += n
    return True
