"""The shared experts riding in the routed grouped GEMMs: `moe_permute(..., num_shared=S)` and `moe_combine(...,
num_shared=S)` against their references, the stacked weights against the shared MLP (`shared_fusion`), and the
fused block against the torch block, colocated and with its routed experts away (bit for bit)."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import moe_permute
from moemesh.kernels.moe_permute import moe_combine, reference_combine, reference_permute
from moemesh.model.moe_fused import (
    SHARED_FUSION_MAX_TOKENS,
    combine_deferred,
    deferred_shared,
    fused_moe,
    route,
)
from moemesh.model.shared_fusion import fused_experts, shared_experts
from tests.kernels.checks import assert_close
from tests.kernels.test_fp8_gemm import DEV
from tests.kernels.test_moe_fused import _fp8_copy, make_moe

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("tokens, k, experts, shared", [(5, 2, 8, 2), (3, 6, 64, 1), (90, 6, 16, 2)])
def test_permute_and_combine_with_shared_slots(tokens, k, experts, shared):
    """Every token gets `shared` more assignments to experts E .. E+S-1, after its k routed ones (90 tokens:
    the three-launch permute, 720 assignments)."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 40, generator=gen).to(torch.bfloat16).to(DEV)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).to(DEV)
    got = moe_permute(x, ids, experts, num_shared=shared)
    ref = reference_permute(x.cpu(), ids.cpu(), experts, num_shared=shared)
    n = tokens * (k + shared)
    assert got.slot_rows.shape == (n,) and got.offsets.shape == (experts + shared + 1,)
    assert got.counts.cpu()[experts:].tolist() == [tokens] * shared
    assert torch.equal(got.offsets.cpu(), ref.offsets) and torch.equal(got.slot_rows.cpu(), ref.slot_rows)
    assert torch.equal(got.x.cpu(), ref.x)
    # the shared slots' rows hold their token: expert E + j's rows are the tokens in order
    rows = got.slot_rows.cpu().long().view(tokens, k + shared)
    for j in range(shared):
        assert torch.equal(got.x.cpu()[rows[:, k + j]], x.cpu())
    y = torch.randn(n, 24, generator=gen).to(torch.bfloat16).to(DEV)
    weights = torch.rand(tokens, k, generator=gen).to(DEV)
    out = moe_combine(y, weights, got.slot_rows, num_shared=shared)
    assert_close(out, reference_combine(y.cpu(), weights.cpu(), got.slot_rows.cpu(), num_shared=shared))
    by_hand = sum(y.cpu().float()[rows[:, k + j]] for j in range(shared)) + (
        y.cpu().float()[rows[:, :k]] * weights.cpu()[..., None]
    ).sum(1)
    assert_close(out, by_hand.to(torch.bfloat16))
    wrong = shared + 1
    with pytest.raises(
        ValueError, match=rf"slot_rows \[T\*\(k\+{wrong}\)\], got \({tokens}, {k}\) and \({n},\)"
    ):
        moe_combine(y, weights, got.slot_rows, num_shared=wrong)


def test_permute_with_only_shared_slots():
    """k = 0: the deferred path's shared rows alone."""
    x = torch.randn(4, 16).to(torch.bfloat16).to(DEV)
    got = moe_permute(x, torch.empty(4, 0, dtype=torch.int64, device=DEV), 0, num_shared=2)
    assert got.offsets.cpu().tolist() == [0, 4, 8]
    assert torch.equal(got.x.cpu(), torch.cat([x, x]).cpu())
    assert got.slot_rows.cpu().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def _act(stack, x):
    gate, up = torch.einsum("td,end->etn", x, stack.w13).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_shared_experts_stack_as_routed_sized_experts(kind):
    """The shared MLP (intermediate 2 x 32) as two experts of the routed shape: their outputs sum to the MLP's;
    the routed experts' parameters become views of the fused stack."""
    moe = make_moe(kind, dtype=torch.float32)
    stack = shared_experts(moe)
    assert stack.num_shared == 2 and stack.w13.shape == (2, 64, 64) and stack.w2.shape == (2, 64, 32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    out = torch.einsum("eti,edi->td", _act(stack, x), stack.w2)
    assert_close(out, moe.shared_experts(x))
    routed = moe.experts.w13.detach().clone()
    fused = fused_experts(moe)
    assert fused.w13.shape == (10, 64, 64) and fused.num_shared == 2
    assert moe.experts.w13.data_ptr() == fused.w13.data_ptr() and torch.equal(moe.experts.w13, routed)
    assert torch.equal(fused.w13[8:], stack.w13) and torch.equal(fused.w2[8:], stack.w2)
    assert fused_experts(moe) is fused  # once
    moe.shared_experts.down_proj.weight = torch.nn.Parameter(moe.shared_experts.down_proj.weight * 2)
    assert fused_experts(moe) is not fused  # a reload stacks again
    fused = fused_experts(moe)
    with torch.no_grad():
        moe.shared_experts.up_proj.weight.mul_(3)  # load_state_dict copies in place
    assert not torch.equal(fused_experts(moe).w13[8:], fused.w13[8:])
    stack = shared_experts(moe)
    assert_close(torch.einsum("edi,eti->td", stack.w2, _act(stack, x)), moe.shared_experts(x))
    moe.shared_experts = None
    assert fused_experts(moe) is None and shared_experts(moe) is None


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [5, SHARED_FUSION_MAX_TOKENS + 3])
def test_deferred_shared_rows_give_the_fused_block_bit_for_bit(fp8, tokens):
    """The block with its routed experts away computes the shared experts' rows apart (`deferred_shared`) and
    combines them with the pool's rows: the colocated fused block's output, bit for bit — with the shared experts
    riding in the grouped GEMMs (few tokens) and apart (more than SHARED_FUSION_MAX_TOKENS)."""
    if fp8:
        moe = make_moe("v3", moe_intermediate_size=128, hidden_size=128, n_shared_experts=2)
        moe = _fp8_copy(moe)[0]
    else:
        moe = make_moe("v2")
    x = torch.randn(tokens, moe.config.hidden_size, generator=torch.Generator().manual_seed(9)).bfloat16()
    moe, x = moe.to(DEV), x.to(DEV)
    here = fused_moe(moe, x)
    assert fused_experts(moe).num_shared == 2
    routed = route(moe, x)
    # the pool's rows: the colocated layer's routed rows in (token, slot) order
    from moemesh.model.moe_fused import _expert_rows

    rows, y = _expert_rows(moe, moe.experts, x, None, routed.ids, 0)
    pool_rows = y[rows.slot_rows.long()]
    there = combine_deferred(deferred_shared(moe, x), routed, pool_rows).to(x.dtype)
    assert torch.equal(there, here)
    # an attention worker frees its routed experts (services/remote_experts.detach_routed_experts)
    for param in moe.experts.parameters():
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    moe.__dict__.pop("_shared_as_experts", None)
    assert torch.equal(combine_deferred(deferred_shared(moe, x), routed, pool_rows).to(x.dtype), here)


@pytest.mark.gpu
@gpu
def test_gpu_permute_with_shared_v2_lite():
    """V2-Lite's 64 routed + 2 shared experts, 256 tokens (the three-launch permute) and 1 (one launch)."""
    for tokens in (1, 256):
        x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(64, device="cuda")[:6] for _ in range(tokens)])
        got = moe_permute(x, ids, 64, num_shared=2)
        ref = reference_permute(x, ids, 64, num_shared=2)
        assert torch.equal(got.slot_rows, ref.slot_rows) and torch.equal(got.x, ref.x)
        y = torch.randn(tokens * 8, 2048, device="cuda", dtype=torch.bfloat16)
        w = torch.rand(tokens, 6, device="cuda")
        assert_close(
            moe_combine(y, w, got.slot_rows, num_shared=2),
            reference_combine(y, w, got.slot_rows, num_shared=2),
        )
