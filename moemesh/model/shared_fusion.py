"""The shared experts as extra experts of the routed grouped GEMMs (SGLang's "shared experts fusion").

DeepSeek's shared MLP of intermediate `S * I` (I: a routed expert's intermediate size; V2-Lite S = 2, V3 S = 1)
is S experts of the routed shape: expert j takes the gate and up rows `j*I : (j+1)*I` and the down columns
alike (the MLP's intermediate is elementwise, so the S experts' outputs sum to the MLP's). Stacked after the
routed experts, they are chosen for every token with weight 1 (`moe_permute(..., num_shared=S)`,
`moe_combine(..., num_shared=S)`): the grouped GEMMs compute them with the routed ones and the shared MLP's
three launches go.

* `fused_experts(moe)`: routed + shared in one `[E + S, ...]` stack (w13, w2 and, FP8, their block scales),
  built at the block's first fused forward (after the weights are loaded); the routed experts' parameters
  become views of its first E experts (nothing stored twice), the shared MLP keeps its own weights (the
  torch path and the expert pool's deferred path use them: S experts' copy of them, 3 * S * I * D values a
  layer, is the fusion's memory cost).
* `shared_experts(moe)`: the S experts alone (for the deferred path, whose routed experts are away).

Both return None when the shapes do not allow it (no shared MLP, intermediate not a multiple of I, FP8 experts
with a shared MLP that is not FP8 or the reverse); the block then runs the shared MLP apart. A block whose
shared weights were replaced or written since (a reload) is stacked again on its next call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
BLOCK = 128


@dataclass(frozen=True)
class ExpertStack:
    """w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]; FP8: e4m3 with per-expert 128x128 block scales
    `w13_scale_inv [E, 2I/128, D/128]`, `w2_scale_inv [E, D/128, I/128]`. num_shared: how many of the E are the
    shared experts (the last ones)."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale_inv: torch.Tensor | None
    w2_scale_inv: torch.Tensor | None
    num_shared: int
    sources: tuple[int, ...]  # where the weights it copies live, and their versions (`_ptrs`)


def _shared_sources(moe: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The shared MLP's tensors in stacking order, or None when it cannot ride with the routed experts."""
    shared, experts = moe.shared_experts, moe.experts
    if shared is None:
        return None
    fp8 = experts.w13.dtype == FP8
    mods = (shared.gate_proj, shared.up_proj, shared.down_proj)
    if any((m.weight.dtype == FP8) != fp8 or getattr(m, "bias", None) is not None for m in mods):
        return None
    if not fp8 and any(m.weight.dtype != experts.w13.dtype for m in mods):
        return None
    # from the config: an attention worker whose routed experts are away holds them as empty tensors
    inter, hidden = moe.config.moe_intermediate_size, moe.config.hidden_size
    if shared.gate_proj.weight.shape[0] % inter or shared.gate_proj.weight.shape[1] != hidden:
        return None
    if fp8 and inter % BLOCK:
        return None
    tensors = tuple(m.weight for m in mods)
    if fp8:
        tensors += tuple(m.weight_scale_inv for m in mods)
    return tensors


def _split(sources: tuple[torch.Tensor, ...], inter: int) -> tuple[torch.Tensor, ...]:
    """(w13 [S, 2I, D], w2 [S, D, I], and FP8 their scales) from the shared MLP's tensors."""
    gate, up, down = sources[:3]
    s = gate.shape[0] // inter

    def experts(g, u, d, rows):
        w13 = torch.stack(
            [torch.cat([g[j * rows : (j + 1) * rows], u[j * rows : (j + 1) * rows]]) for j in range(s)]
        )
        w2 = torch.stack([d[:, j * rows : (j + 1) * rows] for j in range(s)])
        return w13, w2

    out = experts(gate, up, down, inter)
    if len(sources) > 3:
        out += experts(*sources[3:], inter // BLOCK)
    return out


def _ptrs(tensors) -> tuple[int, ...]:
    """Where each tensor lives and how often it was written in place (a `load_state_dict` copying into the
    shared MLP's weights changes the second; inference tensors keep no version, and no in-place write can
    reach them outside inference mode): a stack of copies is current while these are unchanged."""
    return tuple(v for t in tensors for v in (t.data_ptr(), 0 if t.is_inference() else t._version))


def shared_experts(moe: nn.Module) -> ExpertStack | None:
    """The shared MLP as S experts of the routed shape (module docstring), stacked once."""
    sources = _shared_sources(moe)
    if sources is None:
        return None
    cached: ExpertStack | None = moe.__dict__.get("_shared_as_experts")
    if cached is not None and cached.sources == _ptrs(sources):
        return cached
    with torch.inference_mode(False), torch.no_grad():
        parts = _split(sources, moe.config.moe_intermediate_size)
    w13, w2 = parts[:2]
    scales = parts[2:] if len(parts) > 2 else (None, None)
    stack = ExpertStack(w13, w2, scales[0], scales[1], w13.shape[0], _ptrs(sources))
    moe.__dict__["_shared_as_experts"] = stack
    return stack


def fused_experts(moe: nn.Module) -> ExpertStack | None:
    """The routed experts and then the shared ones in one stack (module docstring), stacked once; the routed
    experts' parameters become views of it."""
    sources = _shared_sources(moe)
    if sources is None:
        return None
    experts = moe.experts
    fp8 = experts.w13.dtype == FP8
    names = ("w13", "w2", "w13_scale_inv", "w2_scale_inv") if fp8 else ("w13", "w2")
    cached: ExpertStack | None = moe.__dict__.get("_fused_experts")
    if (
        cached is not None
        and cached.sources == _ptrs(sources)
        and all(getattr(experts, n).data_ptr() == getattr(cached, n).data_ptr() for n in names)
    ):
        return cached
    num_routed = experts.w13.shape[0]
    with torch.inference_mode(False), torch.no_grad():  # real parameters, even when first called in a forward
        parts = _split(sources, moe.config.moe_intermediate_size)
        stacked = {
            n: torch.cat([getattr(experts, n), p.to(getattr(experts, n).device)])
            for n, p in zip(names, parts, strict=True)
        }
        for n in names:
            setattr(experts, n, nn.Parameter(stacked[n][:num_routed], requires_grad=False))
    stack = ExpertStack(
        stacked["w13"], stacked["w2"], stacked.get("w13_scale_inv"), stacked.get("w2_scale_inv"),
        parts[0].shape[0], _ptrs(sources),
    )  # fmt: skip
    moe.__dict__["_fused_experts"] = stack
    return stack
