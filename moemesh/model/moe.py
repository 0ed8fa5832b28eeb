"""Mixture of experts: the router, the routed experts (behind the `ExpertBackend` boundary) and shared experts.

Routing, per token:
* V3 (`scoring_func="sigmoid"`): s = sigmoid(logits); the correction bias is added for *selection only*; a
  group's score is the sum of its two best biased scores; the `topk_group` best groups stay; top-k within them;
  weights are the unbiased s of the chosen experts, normalized if `norm_topk_prob`, times
  `routed_scaling_factor`.
* V2 (`scoring_func="softmax"`): s = softmax(logits); `greedy` takes the top-k, `group_limited_greedy` first
  keeps the `topk_group` groups with the best single score; weights are normalized if `norm_topk_prob`, else
  scaled by `routed_scaling_factor` (DeepSeek's reference).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import NormOutputs
from moemesh.model.config import ModelConfig
from moemesh.model.layers import MLP, InputFormats
from moemesh.model.moe_fused import combine_deferred, deferred_shared, fused_moe
from moemesh.model.moe_fused import route as fused_route


def route(
    logits: torch.Tensor, config: ModelConfig, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits fp32 [T, E] -> (weights fp32 [T, k], expert ids int64 [T, k])."""
    num_tokens, num_experts = logits.shape
    groups, k = config.num_groups, config.num_experts_per_tok
    if config.scoring_func == "sigmoid":
        scores = logits.sigmoid()
        choice = scores + bias if bias is not None else scores
        if groups > 1:
            group_scores = choice.view(num_tokens, groups, -1).topk(2, dim=-1).values.sum(-1)
            choice = _mask_groups(choice, group_scores, config.group_topk, float("-inf"))
        ids = choice.topk(k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if config.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * config.routed_scaling_factor, ids
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if config.topk_method == "group_limited_greedy" and groups > 1:
        group_scores = scores.view(num_tokens, groups, -1).amax(dim=-1)
        scores = _mask_groups(scores, group_scores, config.group_topk, 0.0)
    weights, ids = scores.topk(k, dim=-1, sorted=False)
    if k > 1 and config.norm_topk_prob:
        return weights / (weights.sum(-1, keepdim=True) + 1e-20), ids
    return weights * config.routed_scaling_factor, ids


def _mask_groups(scores: torch.Tensor, group_scores: torch.Tensor, keep: int, fill: float) -> torch.Tensor:
    num_tokens, groups = group_scores.shape
    top = group_scores.topk(keep, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
    mask = mask[:, :, None].expand(-1, -1, scores.shape[1] // groups).reshape(num_tokens, -1)
    return scores.masked_fill(~mask, fill)


class ExpertBackend(Protocol):
    """Where routed experts run: in this process (`LocalExperts`) or in the expert pool (transport side)."""

    def __call__(
        self, layer_idx: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, D], topk_ids int64 [T, k], topk_weights fp32 [T, k] -> sum_k w * expert_k(hidden) [T, D]."""
        ...


class PendingExperts(Protocol):
    def result(self) -> torch.Tensor: ...


@runtime_checkable
class DeferredExpertBackend(ExpertBackend, Protocol):
    """A backend whose experts run elsewhere: `submit` sends the layer's tokens and returns at once, so the
    shared experts run here while the routed ones are away; `result()` waits for the combined output [T, D]
    (each slot's row weighted and summed as `LocalExperts` does) or, with `unweighted`, for every slot's
    bare expert row [T * k, D] in (token, slot) order, computed by the fused path's expert GEMMs
    (`moe_fused.expert_rows`), for the caller's own combine."""

    def submit(
        self, layer_idx: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        *, unweighted: bool = False,
    ) -> PendingExperts: ...  # fmt: skip


def combine_slots(slots: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """slots [T * k, D] (token-major, each already weighted) -> [T, D]: every token's k rows summed in slot
    order. The one combine of every expert path (local, grouped, remote), so where the experts ran never
    changes the sum's rounding."""
    return slots.view(num_tokens, top_k, -1).sum(dim=1).to(dtype)


class LocalExperts(nn.Module):
    """All routed experts of one layer, stacked: w13 [E, 2 * I, D] (gate rows then up rows), w2 [E, D, I].
    An expert-pool worker holds one with only its own experts (local indices 0..E'-1)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def __call__(self, layer_idx, hidden, topk_ids, topk_weights):  # noqa: D102 — see ExpertBackend
        return self.forward(hidden, topk_ids, topk_weights)

    def forward(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """The reference (CPU) path, and the expert pool's: every token's k weighted slot rows, summed in slot
        order. On CUDA the MoE block takes `moe_fused.fused_moe` instead."""
        num_tokens, k = topk_ids.shape
        token_of = torch.arange(num_tokens, device=hidden.device).repeat_interleave(k)  # [T*k]
        slots = self.slot_outputs(hidden, token_of, topk_ids.flatten(), topk_weights.flatten())
        return combine_slots(slots, num_tokens, k, hidden.dtype)

    def slot_outputs(
        self, hidden: torch.Tensor, token_of: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """One row per slot s: weights[s] * expert[expert_ids[s]](hidden[token_of[s]]), in hidden.dtype.

        hidden [T, D]; token_of, expert_ids int64 [S] (indices into hidden and into w13 / w2); weights fp32
        [S]. BF16 on CUDA (an expert-pool worker): one grouped GEMM, no host sync; else a loop over the experts
        that got tokens, each on its tokens in slot order (so a worker holding a subset of the slots computes
        the same rows)."""
        if hidden.is_cuda and hidden.dtype == torch.bfloat16:
            return self._slots_grouped(hidden, token_of, expert_ids, weights)
        out = torch.empty(expert_ids.numel(), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        order = expert_ids.argsort(stable=True)
        counts = torch.bincount(expert_ids, minlength=self.w13.shape[0]).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start : start + count]
            start += count
            gate, up = F.linear(hidden[token_of[rows]], self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert])
            out[rows] = (y * weights[rows, None]).to(out.dtype)
        return out

    def _slots_grouped(
        self, hidden: torch.Tensor, token_of: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Slots sorted by expert, then `torch._grouped_mm` over the stacked weights (experts without tokens
        read nothing); no host sync. Needs 16-byte aligned rows (hidden and intermediate sizes multiples of 8
        in BF16)."""
        num_experts = self.w13.shape[0]
        order = expert_ids.argsort(stable=True)  # [S] slots grouped by expert
        counts = torch.zeros(num_experts, dtype=torch.int32, device=hidden.device)
        counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
        x = hidden[token_of[order]]  # [S, D]
        gate, up = torch._grouped_mm(x, self.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [S, I] each
        y = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offs)  # [S, D]
        y = y * weights[order, None].to(y.dtype)
        out = torch.empty_like(y)
        out[order] = y  # back to slot order
        return out


class MoE(nn.Module):
    """The MoE block. Two paths, by device: on CUDA the fused one — with local experts `moe_fused.fused_moe`
    (our kernels, a handful of launches, no host sync, CUDA-graph safe) — else the torch one: the router, the
    expert backend (`LocalExperts` / `Fp8Experts` here: the torch reference) and the shared MLP. `use_fused`
    overrides the choice (None: by device; `moe_fused.set_fused` sets it on a whole model).

    With the routed experts away (`RemoteExperts`, a `DeferredExpertBackend`) the block computes what it
    computes with them here on the same path (`deferred`): on the fused path it routes with `moe_route`, the
    pool returns unweighted rows of the fused path's GEMMs and `moe_combine` sums them with the shared
    experts' rows (computed here meanwhile, as `fused_moe`'s grouped GEMMs compute them) in fp32; on the torch path it routes with the router, the
    pool returns weighted rows summed as `LocalExperts` sums them, then the shared output is added."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.use_fused: bool | None = None
        self.gate = Router(config)
        self.experts = LocalExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.set_expert_backend(self.experts)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        """Routes this layer's experts elsewhere (the expert pool); a plain attribute, not a submodule, so the
        state dict keeps only the local weights."""
        object.__setattr__(self, "expert_backend", backend)

    def on_fused_path(self, x: torch.Tensor) -> bool:
        """Whether the block takes the fused path (its experts here or away)."""
        return x.is_cuda if self.use_fused is None else self.use_fused

    def fused(self, x: torch.Tensor) -> bool:
        """Whether `fused_moe` computes the block: the fused path with local experts."""
        return self.expert_backend is self.experts and self.on_fused_path(x)

    def input_formats(self, x: torch.Tensor) -> InputFormats:
        """The fused path's router reads x in fp32, its FP8 experts (and then its shared experts) x quantized."""
        if not self.on_fused_path(x):
            return InputFormats()
        return InputFormats(fp32=x.dtype != torch.float32, fp8=self.experts.w13.dtype == torch.float8_e4m3fn)

    def forward(self, x: torch.Tensor, normed: NormOutputs | None = None) -> torch.Tensor:
        """`normed`: the norm's outputs x came from (`input_formats` says what the fused path reads there)."""
        if self.fused(x):
            return fused_moe(self, x, normed)
        backend = self.expert_backend
        if isinstance(backend, DeferredExpertBackend):  # routed experts away: shared ones meanwhile
            stages = self.deferred(x, normed)
            pending = next(stages)
            try:
                stages.send(pending.result())
            except StopIteration as done:
                return done.value
            raise RuntimeError("MoE.deferred yielded twice")
        weights, ids = self.gate(x)
        out = backend(self.layer_idx, x, ids, weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return out if shared is None else out + shared

    def deferred(self, x: torch.Tensor, normed: NormOutputs | None = None):
        """The block with its routed experts away (a `DeferredExpertBackend`), as a generator: routes, submits
        (yields the PendingExperts), runs the shared experts meanwhile, is sent the pending's result and
        returns the block's output — what the block computes with local experts on its current path."""
        backend = self.expert_backend
        if self.on_fused_path(x):  # fused_moe's routing, rows and combine
            routed = fused_route(self, x, normed)
            pending = backend.submit(self.layer_idx, x, routed.ids, routed.weights, unweighted=True)
            shared = deferred_shared(self, x, normed)  # the shared experts' rows as fused_moe computes them
            rows = yield pending  # [T * k, D] unweighted, in (token, slot) order
            return combine_deferred(shared, routed, rows).to(x.dtype)
        weights, ids = self.gate(x)
        pending = backend.submit(self.layer_idx, x, ids, weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        out = yield pending
        return out if shared is None else out + shared


class Router(nn.Module):
    """weight [E, D] (kept in fp32) and, for V3, e_score_correction_bias [E]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.scoring_func == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.float()
        return route(logits, self.config, bias)
