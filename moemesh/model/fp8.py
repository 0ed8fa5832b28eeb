"""FP8 weights kept as FP8: DeepSeek's 128x128-block layout in memory, FP8 GEMMs at run time.

* `Fp8Linear`: `weight` float8_e4m3fn [N, K] and `weight_scale_inv` fp32 [ceil(N/128), ceil(K/128)] — the
  checkpoint's own tensors, loaded without conversion. forward: 1x128 activation quant, then the block-scaled
  GEMM (`moemesh.kernels.act_quant`, `fp8_gemm`), BF16 out.
* `Fp8Experts`: one layer's routed experts, stacked: `w13` [E, 2I, D] (gate rows, then up rows) and `w2`
  [E, D, I] in e4m3 with per-expert block scales. forward (an `ExpertBackend`): quantize tokens, sort them by
  expert, grouped GEMM, fused SiLU-and-mul + requant, grouped GEMM, weighted combine; no host sync.

`to_fp8(model)` swaps these in for the projections DeepSeek quantizes (every `*_proj` inside the layers);
embeddings, norms, the router and the LM head stay in the compute dtype. Gate and up are quantized as separate
checkpoint tensors, so stacking them needs `moe_intermediate_size % 128 == 0` (true for V2/V3); other expert
shapes stay dequantized.
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.kernels import act_quant, fp8_gemm, fp8_grouped_gemm, moe_combine, moe_permute, silu_mul_quant
from moemesh.kernels.fp8_gemm import SplitKWorkspace
from moemesh.model.moe import LocalExperts, MoE

BLOCK = 128
FP8 = torch.float8_e4m3fn


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


class Fp8Linear(nn.Module):
    """`workspace`: the split-K GEMM's slabs and counters, shared by the model's projections (`to_fp8`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        workspace: SplitKWorkspace | None = None,
    ):
        super().__init__()
        self.workspace = workspace or SplitKWorkspace()
        if bias:
            raise ValueError("Fp8Linear has no bias (DeepSeek's quantized projections have none)")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(_blocks(out_features), _blocks(in_features), dtype=torch.float32), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype (computed with FP8 operands, fp32 accumulation, BF16 result)."""
        lead = x.shape[:-1]
        x_fp8, x_scale = act_quant(x.reshape(-1, self.in_features))
        y = fp8_gemm(x_fp8, x_scale, self.weight, self.weight_scale_inv, workspace=self.workspace)
        return y.to(x.dtype).view(*lead, self.out_features)


class Fp8Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        e, d, i = num_experts, hidden_size, intermediate_size
        self.num_experts, self.intermediate_size = e, i
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, d, dtype=FP8), requires_grad=False)
        self.w13_scale_inv = nn.Parameter(torch.empty(e, _blocks(2 * i), _blocks(d)), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, d, i, dtype=FP8), requires_grad=False)
        self.w2_scale_inv = nn.Parameter(torch.empty(e, _blocks(d), _blocks(i)), requires_grad=False)

    def __call__(self, layer_idx, hidden, topk_ids, topk_weights):  # see moe.ExpertBackend
        return self.forward(hidden, topk_ids, topk_weights)

    def forward(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, D] -> sum_k w[t, k] * expert_{ids[t, k]}(hidden[t])  [T, D] in hidden's dtype."""
        x_fp8, x_scale = act_quant(hidden)
        sorted_ = moe_permute(x_fp8, topk_ids, self.num_experts, x_scale=x_scale)  # contiguous layout
        h = fp8_grouped_gemm(sorted_.x, sorted_.x_scale, self.w13, self.w13_scale_inv, sorted_.offsets)
        a_fp8, a_scale = silu_mul_quant(h)  # [T*k, I] e4m3 + 1x128 scales
        y = fp8_grouped_gemm(a_fp8, a_scale, self.w2, self.w2_scale_inv, sorted_.offsets)  # [T*k, D] BF16
        return moe_combine(y, topk_weights, sorted_.slot_rows).to(hidden.dtype)


FP8_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
FP8_MLP = ("gate_proj", "up_proj", "down_proj")


def to_fp8(model: nn.Module) -> nn.Module:
    """Replaces, in place, the projections and routed experts that DeepSeek stores in FP8 (call on a model built
    on the meta device, before its weights are loaded). Returns the model. The projections share one split-K
    workspace: the model's forwards run one at a time."""
    workspace = SplitKWorkspace()
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in FP8_PROJECTIONS:
            _swap_linear(attn, name, workspace)
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            if mlp.shared_experts is not None:
                for name in FP8_MLP:
                    _swap_linear(mlp.shared_experts, name, workspace)
            ex: LocalExperts = mlp.experts
            if ex.intermediate_size % BLOCK == 0:
                num_experts, _, hidden = ex.w13.shape
                mlp.experts = Fp8Experts(num_experts, hidden, ex.intermediate_size).to(ex.w13.device)
                mlp.set_expert_backend(mlp.experts)
        else:
            for name in FP8_MLP:
                _swap_linear(mlp, name, workspace)
    return model


def _swap_linear(parent: nn.Module, name: str, workspace: SplitKWorkspace) -> None:
    linear = getattr(parent, name, None)
    if isinstance(linear, nn.Linear) and linear.bias is None:
        fp8 = Fp8Linear(linear.in_features, linear.out_features, workspace=workspace)
        setattr(parent, name, fp8.to(linear.weight.device))
