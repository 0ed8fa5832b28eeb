"""`moe_route` (V3 sigmoid + bias + groups, V2 softmax greedy / group-limited) and `moe_permute` / `moe_combine`
vs their references, including empty experts, out-of-range ids and the masked layout."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.checks import assert_close

route = importlib.import_module("moemesh.kernels.moe_route")
perm = importlib.import_module("moemesh.kernels.moe_permute")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

V3_TINY = route.RouteConfig(6, 64, n_group=8, topk_group=3, routed_scaling_factor=2.5)
CONFIGS = {
    "v3": V3_TINY,
    "v3_unnormalized": route.RouteConfig(4, 32, n_group=4, topk_group=2, norm_topk_prob=False),
    "v3_groups_of_one": route.RouteConfig(2, 8, n_group=8, topk_group=4),
    "v2_greedy": route.RouteConfig(
        6, 64, scoring_func="softmax", topk_method="greedy", routed_scaling_factor=16.0
    ),
    "v2_group_limited": route.RouteConfig(
        6,
        32,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        scoring_func="softmax",
        topk_method="group_limited_greedy",
    ),
    "kimi_k2_like_384": route.RouteConfig(8, 384, n_group=1, topk_group=1, routed_scaling_factor=2.827),
    "v2_160_greedy": route.RouteConfig(6, 160, scoring_func="softmax", topk_method="greedy"),
    "v2_lite_unnormalized": route.RouteConfig(
        6, 64, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy", routed_scaling_factor=1.0
    ),
}


def _sorted(ids, weights):
    order = ids.long().argsort(-1)
    return ids.long().gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 19])
def test_route_matches_reference(name, tokens):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, cfg.n_routed_experts, generator=gen).to(DEV)
    bias = (torch.randn(cfg.n_routed_experts, generator=gen) * 0.5).to(DEV) if cfg.v3 else None
    got = route.moe_route(logits, cfg, bias)
    ref = route.reference(logits.cpu(), cfg, bias.cpu() if bias is not None else None)
    assert got.ids.dtype == torch.int32 and got.ids.shape == (tokens, cfg.num_experts_per_tok)
    g_ids, g_w = _sorted(got.ids.cpu(), got.weights.cpu())
    r_ids, r_w = _sorted(ref.ids, ref.weights)
    assert torch.equal(g_ids, r_ids)
    assert_close(g_w, r_w)


def test_route_v3_semantics_by_hand():
    """Bias steers selection but not weights; groups chosen by their top-2 sum."""
    cfg = route.RouteConfig(2, 8, n_group=4, topk_group=1, routed_scaling_factor=2.0)
    logits = torch.tensor([[3.0, -3.0, 2.0, 2.0, 0.0, 0.0, 1.0, -5.0]], device=DEV)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9], device=DEV)
    # group sums of biased sigmoid: g0 = s(3)+s(-3) = 1.0, g1 = 2 s(2) = 1.76, g2 = 1.0, g3 = s(1)+s(-5)+0.9 = 1.64
    out = route.moe_route(logits, cfg, bias)
    assert sorted(out.ids[0].tolist()) == [2, 3]
    assert_close(out.weights, torch.tensor([[1.0, 1.0]], device=DEV))
    out = route.moe_route(
        logits, route.RouteConfig(2, 8, n_group=4, topk_group=2, norm_topk_prob=False), bias
    )
    assert out.ids[0].tolist() == [7, 2]  # biased 0.907 beats s(2) = 0.881; weights stay unbiased
    assert_close(out.weights, torch.sigmoid(torch.tensor([[-5.0, 2.0]], device=DEV)))


def test_route_bad_config():
    with pytest.raises(ValueError, match="topk_method"):
        route.RouteConfig(2, 8, scoring_func="softmax", topk_method="noaux_tc")
    with pytest.raises(ValueError, match="n_group"):
        route.RouteConfig(2, 8, n_group=3)
    with pytest.raises(ValueError, match="logits"):
        route.moe_route(torch.zeros(3, 7), V3_TINY)


@pytest.mark.parametrize(
    "tokens, k, experts, max_m",
    [(37, 3, 8, None), (5, 2, 16, None), (300, 4, 6, None), (41, 3, 8, 9), (9, 6, 6, None), (7, 3, 8, 2)],
)  # up to 512 assignments the one-launch permute (over several id blocks at 111 / 123), above it three launches
def test_permute_and_combine(tokens, k, experts, max_m):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, k), generator=gen, dtype=torch.int32)
    ids[ids == 1] = 2  # expert 1 stays empty
    ids[0, 0] = -1  # an assignment routed elsewhere
    ids[-1, -1] = experts  # and one past the last expert (an expert-parallel shard's foreign id)
    x = torch.randn(tokens, 72, generator=gen).to(torch.bfloat16)
    x_scale = torch.rand(tokens, 3, generator=gen)
    got = perm.moe_permute(x.to(DEV), ids.to(DEV), experts, x_scale.to(DEV), max_m=max_m)
    ref = perm.reference_permute(x, ids, experts, x_scale, max_m=max_m)
    assert torch.equal(got.counts.cpu(), ref.counts) and torch.equal(got.offsets.cpu(), ref.offsets)
    assert torch.equal(got.slot_rows.cpu(), ref.slot_rows)
    assert got.counts[1] == 0 and got.slot_rows[0] == -1
    written = ref.slot_rows[ref.slot_rows >= 0].long()
    assert torch.equal(got.x.cpu().view(-1, 72)[written], ref.x.view(-1, 72)[written])
    assert torch.equal(got.x_scale.cpu().view(-1, 3)[written], ref.x_scale.view(-1, 3)[written])
    # expert outputs: any function of the row; combine must weight and sum them per token
    y = (got.x.float() * 2 + 1).to(torch.bfloat16)
    weights = torch.rand(tokens, k, generator=gen).to(DEV)
    out = perm.moe_combine(y, weights, got.slot_rows)
    assert_close(out, perm.reference_combine(y.cpu(), weights.cpu(), ref.slot_rows))


def test_permute_rows_follow_experts():
    ids = torch.tensor([[2, 0], [0, 2], [1, 0]], dtype=torch.int32)
    x = torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 4)
    got = perm.moe_permute(x.to(DEV), ids.to(DEV), 3)
    assert got.offsets.tolist() == [0, 3, 4, 6]
    assert got.x[:, 0].tolist() == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0]  # expert 0: tokens 0, 1, 2; 1: 2; 2: 0, 1
    assert got.slot_rows.tolist() == [4, 0, 1, 5, 3, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_v3_route_and_permute_4096_tokens():
    cfg = route.RouteConfig(8, 256, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    logits = torch.randn(4096, 256, device="cuda")
    bias = torch.randn(256, device="cuda") * 0.1
    got = route.moe_route(logits, cfg, bias)
    ref = route.reference(logits, cfg, bias)
    g_ids, g_w = _sorted(got.ids, got.weights)
    r_ids, r_w = _sorted(ref.ids, ref.weights)
    assert torch.equal(g_ids, r_ids)
    assert_close(g_w, r_w)
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    p = perm.moe_permute(x, got.ids, 256)
    pr = perm.reference_permute(x, got.ids, 256)
    assert torch.equal(p.slot_rows, pr.slot_rows) and torch.equal(p.x, pr.x)
    assert_close(
        perm.moe_combine(p.x, got.weights, p.slot_rows), perm.reference_combine(p.x, got.weights, p.slot_rows)
    )
