"""`moe_route_gemm` (the router's fp32 GEMM inside the routing kernel, decode-sized batches) against
`moe_route`'s torch reference on the logits torch computes: the same expert ids, weights within fp32
tolerance, at V2-Lite's (64 x 2048) and V3's (256 x 7168) router shapes and small odd ones; counters left at
zero, repeat launches bitwise equal; larger batches take the separate GEMM."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.checks import assert_close

route = importlib.import_module("moemesh.kernels.moe_route")
fused = importlib.import_module("moemesh.kernels.moe_route_gemm")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

V2_LITE = route.RouteConfig(6, 64, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy")
V3 = route.RouteConfig(8, 256, n_group=8, topk_group=4, routed_scaling_factor=2.5)
SHAPES = {  # name: (config, hidden, row counts)
    "v2_lite": (V2_LITE, 2048, (1, 19, 64)),
    "v3": (V3, 7168, (1, 16)),
    "tiny_8_experts": (route.RouteConfig(2, 8, routed_scaling_factor=2.5), 64, (1, 3, 64)),
    "v2_160_odd_hidden": (route.RouteConfig(6, 160, scoring_func="softmax", topk_method="greedy"), 200, (5,)),
    "v2_group_limited": (
        route.RouteConfig(
            6, 64, n_group=8, topk_group=3, scoring_func="softmax", topk_method="group_limited_greedy"
        ),
        96,
        (7,),
    ),
}
CASES = [(name, t) for name, (_, _, rows) in SHAPES.items() for t in rows]


def _sorted(ids, weights):
    order = ids.long().argsort(-1)
    return ids.long().gather(1, order), weights.gather(1, order)


def _inputs(cfg, hidden, tokens, seed, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(cfg.n_routed_experts, hidden, generator=gen) * hidden**-0.5
    bias = torch.randn(cfg.n_routed_experts, generator=gen) * 0.1 if cfg.v3 else None
    return x.to(device), w.to(device), None if bias is None else bias.to(device)


def _check(cfg, x, w, bias, counters):
    assert fused.fusable(x.shape[0], cfg)
    got = fused.moe_route_gemm(x, w, cfg, bias, counters=counters)
    ref = route.reference(F.linear(x.cpu(), w.cpu()), cfg, None if bias is None else bias.cpu())
    assert got.ids.dtype == torch.int32 and got.ids.shape == (x.shape[0], cfg.num_experts_per_tok)
    g_ids, g_w = _sorted(got.ids.cpu(), got.weights.cpu())
    r_ids, r_w = _sorted(ref.ids, ref.weights)
    assert torch.equal(g_ids, r_ids)
    assert_close(g_w, r_w)
    assert counters.count_nonzero().item() == 0  # the last program of each row block reset its counter
    return got


@pytest.mark.parametrize(("name", "tokens"), CASES)
def test_fused_router_matches_the_reference(name, tokens):
    cfg, hidden, _ = SHAPES[name]
    x, w, bias = _inputs(cfg, hidden, tokens, seed=tokens)
    _check(cfg, x, w, bias, fused.route_counters(DEV))


def test_repeat_launches_are_bitwise_equal_and_reuse_the_counters():
    cfg, hidden, _ = SHAPES["v2_lite"]
    x, w, _ = _inputs(cfg, hidden, 19, seed=3)
    counters = fused.route_counters(DEV)
    a = fused.moe_route_gemm(x, w, cfg, counters=counters)
    b = fused.moe_route_gemm(x, w, cfg, counters=counters)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)
    assert counters.count_nonzero().item() == 0


def test_splits_keep_the_partials_small_and_cover_the_hidden_size():
    for t, e, h in (
        (1, 64, 2048),
        (64, 64, 2048),
        (1, 256, 7168),
        (16, 256, 7168),
        (3, 8, 64),
        (5, 160, 200),
    ):
        block_e, k_chunk, split_k = fused.plan_splits(t, e, h)
        assert k_chunk % fused.BLOCK_K == 0 and (split_k - 1) * k_chunk < h <= split_k * k_chunk
        assert split_k * min(t, fused.BLOCK_T) * triton_pow2(e) * 4 <= fused.PARTIAL_BYTES or split_k == 1
        assert 16 <= block_e <= 64  # tl.dot needs N >= 16
    assert fused.plan_splits(1, 64, 2048)[2] == 64  # batch 1 at V2-Lite: 64 programs of 32 columns each


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_larger_batches_take_the_separate_gemm():
    cfg, hidden, _ = SHAPES["v2_lite"]
    assert not fused.fusable(65, cfg) and not fused.fusable(0, cfg)
    assert fused.fusable(17, V3) is False  # 17 x 256 experts exceeds the fused size
    x, w, _ = _inputs(cfg, hidden, 70, seed=1)
    got = fused.moe_route_gemm(x, w, cfg)
    ref = route.reference(F.linear(x.cpu(), w.cpu()), cfg)
    assert torch.equal(_sorted(got.ids.cpu(), got.weights.cpu())[0], _sorted(ref.ids, ref.weights)[0])


def test_bad_shapes_name_the_value():
    cfg, hidden, _ = SHAPES["v2_lite"]
    x, w, _ = _inputs(cfg, hidden, 2, seed=0)
    with pytest.raises(ValueError, match=r"weight must be \[n_routed_experts=64, hidden=2048\]"):
        fused.moe_route_gemm(x, w[:, :100], cfg)
    with pytest.raises(ValueError, match="counters must be int32"):
        fused.moe_route_gemm(x, w, cfg, counters=torch.zeros(4, dtype=torch.int64, device=DEV))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "tokens"), [*CASES, ("v2_lite", 8), ("v2_lite", 33), ("v3", 8)])
def test_gpu_fused_router_matches_the_reference_and_is_deterministic(name, tokens):
    """On the GPU: ids equal the reference on torch's fp32 logits (IEEE, no TF32), the counters come back to
    zero, and 20 launches in a row (many programs racing for the counter) give bitwise-equal results."""
    cfg, hidden, _ = SHAPES[name]
    x, w, bias = _inputs(cfg, hidden, tokens, seed=tokens, device="cuda")
    counters = fused.route_counters("cuda")
    first = _check(cfg, x, w, bias, counters)
    for _ in range(20):
        again = fused.moe_route_gemm(x, w, cfg, bias, counters=counters)
        assert torch.equal(again.ids, first.ids) and torch.equal(again.weights, first.weights)
    torch.cuda.synchronize()
    assert counters.count_nonzero().item() == 0
