"""The fused MoE path (`moemesh.model.moe_fused`) against the plain torch MoE block: routing ids equal, outputs
within the BF16 tolerance (FP8: within the stated relative L2 of the fp32 layer on the dequantized weights).
Under `TRITON_INTERPRET=1` every kernel of the path runs; on a GPU the `gpu` cases run V2-Lite-sized layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moemesh.kernels import moe_permute, moe_route, weight_dequant, weight_quant
from moemesh.kernels.dispatch import interpreting
from moemesh.kernels.moe_permute import moe_combine, reference_combine
from moemesh.model.config import ModelConfig
from moemesh.model.fp8 import Fp8Experts, Fp8Linear
from moemesh.model.moe import MoE, route
from moemesh.model.moe_fused import (
    expert_rows,
    fused_moe,
    route_config,
    routed_gemms,
    set_fused,
    stack_gate_up,
)
from tests.kernels.checks import assert_close

# FP8 against fp32, as tests/kernels/test_moe_layer.py states (the interpreter's fp8 cast drops a carry)
REL_L2, MIN_COS = (0.15, 0.99) if interpreting() else (0.06, 0.998)

BASE = dict(
    vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=2, kv_lora_rank=32,
    q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
)  # fmt: skip
V3 = dict(
    model_type="deepseek_v3", n_group=4, topk_group=2, routed_scaling_factor=2.5,
    scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
)  # fmt: skip
V2 = dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)


def make_moe(kind: str, device="cpu", dtype=torch.bfloat16, seed=0, **overrides) -> MoE:
    config = ModelConfig.from_dict({**BASE, **(V3 if kind == "v3" else V2), **overrides})
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(config, layer_idx=1)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "bias" in name else 0.08))
    moe = moe.to(device=device, dtype=dtype)
    moe.gate.float()  # the router stays fp32, as the checkpoint loader keeps it
    return moe


def _fp8_copy(moe: MoE) -> tuple[MoE, MoE]:
    """(moe with FP8 routed and shared experts, moe with those weights dequantized: the fp32 oracle)."""
    fp8 = MoE(moe.config, moe.layer_idx)
    fp8.load_state_dict(moe.state_dict())
    fp8.gate.float()
    fp8 = fp8.to(moe.experts.w13.device)
    e, two_i, d = moe.experts.w13.shape
    experts = Fp8Experts(e, d, two_i // 2).to(moe.experts.w13.device)
    oracle = MoE(moe.config, moe.layer_idx).to(moe.experts.w13.device).float()
    oracle.gate.load_state_dict(moe.gate.state_dict())
    for name in ("w13", "w2"):
        for i in range(e):
            q, s = weight_quant(getattr(moe.experts, name)[i].bfloat16())
            getattr(experts, name)[i].copy_(q)
            getattr(experts, f"{name}_scale_inv")[i].copy_(s)
            getattr(oracle.experts, name).data[i] = weight_dequant(q, s, torch.float32)
    fp8.experts = experts
    fp8.set_expert_backend(experts)
    for name in ("gate_proj", "up_proj", "down_proj"):
        linear: nn.Linear = getattr(moe.shared_experts, name)
        q, s = weight_quant(linear.weight.bfloat16())
        f = Fp8Linear(linear.in_features, linear.out_features).to(q.device)
        f.weight.copy_(q)
        f.weight_scale_inv.copy_(s)
        setattr(fp8.shared_experts, name, f)
        getattr(oracle.shared_experts, name).weight.data = weight_dequant(q, s, torch.float32)
    set_fused(oracle, False)  # the fp32 oracle is the torch path on every device
    return fp8, oracle


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_route_config_matches_the_torch_router(kind):
    moe = make_moe(kind)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
    logits = torch.nn.functional.linear(x, moe.gate.weight)
    bias = moe.gate.e_score_correction_bias
    got = moe_route(logits, route_config(moe.config), bias)
    weights, ids = route(logits, moe.config, bias)
    order = ids.sort(dim=1)
    assert got.ids.sort(dim=1).values.tolist() == order.values.tolist()
    assert_close(got.weights.sort(dim=1).values, weights.gather(1, order.indices).sort(dim=1).values)


@pytest.mark.parametrize("kind,tokens", [("v3", 1), ("v3", 7), ("v2", 5)])
def test_fused_bf16_equals_the_torch_block(kind, tokens):
    moe = make_moe(kind)
    x = (torch.randn(tokens, 64, generator=torch.Generator().manual_seed(2))).bfloat16()
    ref = moe(x)  # router, per-expert loop, shared MLP: plain torch
    out = fused_moe(moe, x)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref)
    # the shared experts' gate and up are views into one stacked weight now; the block's own path is unchanged
    stacked = stack_gate_up(moe.shared_experts)
    assert moe.shared_experts.gate_proj.weight.data_ptr() == stacked.weight.data_ptr()
    assert_close(moe(x), ref)


def test_fused_fp32_equals_the_torch_block():
    """fp32 models (the CPU oracle tests) take the gathered-weight GEMV path, which captures in graphs too."""
    moe = make_moe("v3", dtype=torch.float32)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    assert_close(fused_moe(moe, x), moe(x))


def test_fused_fp8_within_the_fp8_tolerance_of_fp32():
    moe = make_moe("v3", moe_intermediate_size=128, hidden_size=128, n_shared_experts=1)
    fp8, oracle = _fp8_copy(moe)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    out = fused_moe(fp8, x).float()
    ref = oracle(x.float())
    rel = ((out - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert rel <= REL_L2 and cos >= MIN_COS, f"relative L2 {rel:.4f}, cosine {cos:.5f}"


def test_combine_adds_the_shared_output_once():
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(6, 16, generator=gen).bfloat16()
    weights = torch.rand(3, 2, generator=gen)
    rows = torch.tensor([0, 3, 1, -1, 5, 2], dtype=torch.int32)
    shared = torch.randn(3, 16, generator=gen).bfloat16()
    out = moe_combine(y, weights, rows, shared=shared)
    assert_close(out, reference_combine(y, weights, rows, shared))
    assert_close(out, (reference_combine(y, weights, rows).float() + shared.float()).bfloat16())
    with pytest.raises(ValueError, match=r"shared must be \[T=3, N=16\]"):
        moe_combine(y, weights, rows, shared=shared[:2])


@pytest.mark.parametrize("fp8", [False, True])
def test_stacked_projections_equal_the_separate_ones(fp8):
    """MLA's q_proj + kv_a_proj_with_mqa as one GEMM (576 rows: a partial last scale block in FP8)."""
    from moemesh.model.stacked import stack_linears

    gen = torch.Generator().manual_seed(6)
    owner = nn.Module()
    for name, rows in (("q_proj", 256), ("kv_a_proj_with_mqa", 72), ("odd", 72)):
        w = (torch.randn(rows, 128, generator=gen) * 0.1).bfloat16()
        if fp8:
            q, s = weight_quant(w)
            linear = Fp8Linear(128, rows)
            linear.weight.data.copy_(q)
            linear.weight_scale_inv.data.copy_(s)
        else:
            linear = nn.Linear(128, rows, bias=False).bfloat16()
            linear.weight.data.copy_(w)
        setattr(owner, name, linear)
    x = torch.randn(5, 128, generator=gen).bfloat16()
    separate = torch.cat([owner.q_proj(x), owner.kv_a_proj_with_mqa(x)], dim=-1)
    stacked = stack_linears(owner, ("q_proj", "kv_a_proj_with_mqa"))
    assert stacked.sizes == (256, 72)
    assert owner.kv_a_proj_with_mqa.weight.data_ptr() == stacked.weight[256:].data_ptr()
    assert stack_linears(owner, ("q_proj", "kv_a_proj_with_mqa")) is stacked  # once
    assert_close(stacked(x), separate)
    assert_close(torch.cat([owner.q_proj(x), owner.kv_a_proj_with_mqa(x)], dim=-1), separate)
    # FP8: a first part of 72 rows would put two parts in one scale block
    assert (stack_linears(owner, ("odd", "q_proj")) is None) == fp8


@pytest.mark.parametrize(("tokens", "skew"), [(5, False), (60, True)])
def test_expert_rows_of_a_pool_worker_equal_the_layers_rows(tokens, skew):
    """An expert-pool worker's part of a fused layer (`expert_rows`: its experts, its slots, the layer's shape)
    gives the rows `fused_moe` computes for those slots, bit for bit, through the decode kernel (60 tokens
    skewed onto experts 0-1: the worker's own rows per expert would pick another tile). The grouped GEMM's
    form: tests/model/test_remote_expert_rows.py."""
    moe = make_moe("v2")
    num_experts, k = moe.config.n_routed_experts, moe.config.num_experts_per_tok
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, moe.config.hidden_size, generator=gen).to(torch.bfloat16)
    logits = torch.randn(tokens, num_experts, generator=gen)
    if skew:
        logits[:, :2] += 20.0
    ids = logits.topk(k, dim=-1).indices
    permuted = moe_permute(hidden, ids, num_experts)
    w13, w2 = moe.experts.w13, moe.experts.w2
    layer = routed_gemms(permuted.x, w13, w2, permuted.offsets, ids.numel(), num_experts)
    layer = layer[permuted.slot_rows.long()].view(tokens, k, -1)
    checked = 0
    for hosted in ([0, 1, 2], [3, 4, 5, 6, 7]):
        local = torch.full((num_experts,), -1, dtype=torch.int64)
        local[hosted] = torch.arange(len(hosted))
        mine = local[ids]  # [T, k], -1: another worker's slot
        if not bool((mine >= 0).any()):  # skewed: nothing for this worker (the pool sends it no batch)
            continue
        experts = nn.Module()
        experts.w13, experts.w2 = nn.Parameter(w13[hosted]), nn.Parameter(w2[hosted])
        rows = expert_rows(experts, hidden, mine, ids.numel(), num_experts)
        assert rows.shape[0] == int((mine >= 0).sum())
        assert torch.equal(rows, layer[mine >= 0]), hosted
        checked += rows.shape[0]
    assert checked == ids.numel()  # every slot of the layer, by one worker or the other
