"""MoE routing of DeepSeek-V2/V3 in one kernel: router logits -> expert ids and weights per token.

`moe_route(logits [T, E] fp32, config, e_score_correction_bias fp32 [E] | None) -> RouteResult(ids [T, k],
weights fp32 [T, k])`, ids in the order chosen (best first), int32 (or int64 with `ids_dtype`).

* V3 (`scoring_func="sigmoid"`, `topk_method="noaux_tc"`): `s = sigmoid(logits)`; selection uses
  `s + e_score_correction_bias`; group score = sum of the top-2 biased scores of each of `n_group` groups; the
  `topk_group` best groups are kept (others masked to -inf), then the top-k experts among them; weights are the
  *unbiased* `s` of those experts, divided by (their sum + 1e-20) if `norm_topk_prob`, times
  `routed_scaling_factor`.
* V2 (`scoring_func="softmax"`): `s = softmax(logits)`; `topk_method="greedy"` takes the plain top-k;
  `"group_limited_greedy"` scores each group by its max, keeps the `topk_group` best groups (others masked to
  0) and takes the top-k; then, DeepSeek's reference semantics: if `top_k > 1` and `norm_topk_prob`, weights are
  divided by (their sum + 1e-20), else multiplied by `routed_scaling_factor`.

Ties go to the lower expert / group index in the kernel (torch.topk leaves them unspecified). Any expert count
runs in the kernel (padded to a power of two: Kimi-K2's 384, DeepSeek-V2's 160) except group-limited routing
over a non-power-of-two expert or group count, which takes the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton

_METHODS = {"sigmoid": ("noaux_tc",), "softmax": ("greedy", "group_limited_greedy")}


@dataclass(frozen=True)
class RouteConfig:
    """The gate's config.json fields (names as DeepSeek spells them)."""

    num_experts_per_tok: int
    n_routed_experts: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"

    def __post_init__(self):
        if self.scoring_func not in _METHODS:
            raise ValueError(f"scoring_func={self.scoring_func!r} must be one of {sorted(_METHODS)}")
        if self.topk_method not in _METHODS[self.scoring_func]:
            raise ValueError(
                f"topk_method={self.topk_method!r} does not go with scoring_func={self.scoring_func!r}"
            )
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.n_routed_experts}]"
            )
        if self.grouped and self.num_experts_per_tok > self.topk_group * (
            self.n_routed_experts // self.n_group
        ):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group groups"
            )

    @property
    def grouped(self) -> bool:
        return self.topk_method in ("noaux_tc", "group_limited_greedy")

    @property
    def v3(self) -> bool:
        return self.scoring_func == "sigmoid"


@dataclass(frozen=True)
class RouteResult:
    ids: torch.Tensor  # int32 / int64 [T, k], best first
    weights: torch.Tensor  # fp32 [T, k]


def reference(logits: torch.Tensor, config: RouteConfig, e_score_correction_bias=None, ids_dtype=torch.int32):
    """DeepSeek's gate in plain torch (fp32)."""
    _validate(logits, config, e_score_correction_bias)
    t, e = logits.shape
    k, g = config.num_experts_per_tok, config.n_group
    logits = logits.float()
    if config.v3:
        scores = logits.sigmoid()
        choice = scores + (e_score_correction_bias.float() if e_score_correction_bias is not None else 0.0)
        group_scores = choice.view(t, g, e // g).topk(min(2, e // g), dim=-1)[0].sum(-1)
        fill = float("-inf")
    else:
        scores = logits.softmax(dim=-1)
        choice = scores
        group_scores = scores.view(t, g, e // g).amax(-1)
        fill = 0.0
    if config.grouped:
        group_idx = group_scores.topk(config.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // g, dim=1), fill)
    ids = choice.topk(k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if config.v3:
        if config.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * config.routed_scaling_factor
    elif k > 1 and config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    else:
        weights = weights * config.routed_scaling_factor
    return RouteResult(ids.to(ids_dtype), weights)


@triton.jit
def _argmax_low(x, idx):
    """Per row of `x [R, C]`: the lowest `idx` holding the row's max."""
    best = tl.max(x, axis=1)
    return tl.min(tl.where(x == best[:, None], idx, 1 << 30), axis=1)


@triton.jit
def _route_tile(
    x, rows, row_ok, cols, real, bias_ptr, ids_ptr, w_ptr, scaling,
    E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    V3: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Routes one tile of logits `x [BLOCK_T, E]` fp32 (rows past T zero, padded expert columns -inf) and stores
    the ids and weights of rows `rows` (`row_ok` the real ones): scores, group limit, top-k, weights."""
    if V3:
        scores = 1.0 / (1.0 + tl.exp(-x))
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + cols, mask=real, other=0.0).to(tl.float32)[None, :]
    else:
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = ex / tl.sum(ex, axis=1)[:, None]
        choice = scores
    choice = tl.where(real[None, :], choice, float("-inf"))
    cidx = tl.broadcast_to(cols[None, :], (BLOCK_T, E))
    if GROUPED:
        GS: tl.constexpr = E // G
        c3 = tl.reshape(choice, (BLOCK_T, G, GS))
        i3 = tl.reshape(cidx, (BLOCK_T, G, GS)) % GS
        first = tl.max(c3, axis=2)
        if V3 and GS > 1:  # sum of the top two of each group
            at = tl.min(tl.where(c3 == first[:, :, None], i3, 1 << 30), axis=2)
            second = tl.max(tl.where(i3 == at[:, :, None], float("-inf"), c3), axis=2)
            group_score = first + second
        else:
            group_score = first
        gidx = tl.broadcast_to(tl.arange(0, G)[None, :], (BLOCK_T, G))
        keep_g = tl.zeros((BLOCK_T, G), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            g_at = _argmax_low(group_score, gidx)
            hit = gidx == g_at[:, None]
            keep_g = tl.where(hit, 1, keep_g)
            group_score = tl.where(hit, float("-inf"), group_score)
        keep = tl.reshape(tl.broadcast_to(keep_g[:, :, None], (BLOCK_T, G, GS)), (BLOCK_T, E))
        choice = tl.where(keep != 0, choice, float("-inf") if V3 else 0.0)
    kidx = tl.arange(0, K_PAD)[None, :]
    out_ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    out_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for j in tl.static_range(K):
        at = _argmax_low(choice, cidx)
        hit = cidx == at[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        out_ids = tl.where(kidx == j, at[:, None], out_ids)
        out_w = tl.where(kidx == j, w[:, None], out_w)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        out_w = out_w / (tl.sum(out_w, axis=1)[:, None] + 1e-20)
    out_w = out_w * scaling
    out_mask = row_ok[:, None] & (kidx < K)
    offs = rows[:, None].to(tl.int64) * K + kidx
    tl.store(ids_ptr + offs, out_ids.to(ids_ptr.dtype.element_ty), mask=out_mask)
    tl.store(w_ptr + offs, out_w, mask=out_mask)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, ids_ptr, w_ptr, T, stride_l, scaling,
    E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    V3: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, E_REAL: tl.constexpr,
):  # fmt: skip
    """E: the expert count padded to a power of two (E_REAL the real one; padding only when not GROUPED)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, E)
    real = cols < E_REAL
    x = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
        mask=row_ok[:, None] & real[None, :], other=float("-inf"),
    )  # fmt: skip
    x = tl.where(row_ok[:, None], x.to(tl.float32), 0.0)
    _route_tile(x, rows, row_ok, cols, real, bias_ptr, ids_ptr, w_ptr, scaling, E, G, TOPK_GROUP, K, K_PAD, V3,
                GROUPED, HAS_BIAS, NORM, BLOCK_T)  # fmt: skip


def _validate(logits, config, bias):
    if logits.dim() != 2 or logits.shape[1] != config.n_routed_experts or not logits.is_floating_point():
        raise ValueError(
            f"logits must be float [T, n_routed_experts={config.n_routed_experts}], got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (config.n_routed_experts,) or bias.device != logits.device):
        raise ValueError(f"e_score_correction_bias has shape {tuple(bias.shape)} on {bias.device}, expected "
                         f"({config.n_routed_experts},) on {logits.device}")  # fmt: skip


def moe_route(
    logits: torch.Tensor,
    config: RouteConfig,
    e_score_correction_bias: torch.Tensor | None = None,
    ids_dtype: torch.dtype = torch.int32,
) -> RouteResult:
    """Route every token (semantics in the module docstring). `logits [T, E]` the router's fp32 output."""
    _validate(logits, config, e_score_correction_bias)
    if ids_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_dtype={ids_dtype} must be torch.int32 or torch.int64")
    e = config.n_routed_experts
    # keeping every group is no grouping; real grouping needs power-of-two experts and groups (tl.reshape)
    grouped = config.grouped and config.topk_group < config.n_group
    if not use_triton(logits) or (grouped and (e & (e - 1) or config.n_group & (config.n_group - 1))):
        return reference(logits, config, e_score_correction_bias, ids_dtype)
    t, k = logits.shape[0], config.num_experts_per_tok
    ids = torch.empty(t, k, dtype=ids_dtype, device=logits.device)
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    if t == 0:
        return RouteResult(ids, weights)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bias = e_score_correction_bias
    norm = config.norm_topk_prob and (config.v3 or k > 1)
    scaling = config.routed_scaling_factor if (config.v3 or not norm) else 1.0
    e_pad = triton.next_power_of_2(e)
    block_t = max(1, min(16, 4096 // e_pad))
    _route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias if bias is not None else logits, ids, weights, t, logits.stride(0), float(scaling),
        E=e_pad, E_REAL=e, G=config.n_group, TOPK_GROUP=config.topk_group, K=k, K_PAD=triton.next_power_of_2(k),
        V3=config.v3, GROUPED=grouped, HAS_BIAS=bias is not None, NORM=norm, BLOCK_T=block_t,
        num_warps=4,
    )  # fmt: skip
    return RouteResult(ids, weights)
