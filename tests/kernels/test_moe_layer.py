"""A whole routed-expert MoE layer built from this package's ops, in both expert layouts, against the same layer
in fp32 on the dequantized BF16 weights (the issue's "FP8 experts within a stated tolerance" at layer level).

FP8 path: act_quant -> moe_route -> moe_permute -> fp8_grouped_gemm(_masked) (w1|w3) -> silu_mul_quant ->
fp8_grouped_gemm(_masked) (w2) -> moe_combine. Stated tolerance: relative L2 error <= 6 % and cosine >= 0.998
(FP8 e4m3 activations carry ~3 % rms error per 1x128 group, twice over). Under the interpreter, whose fp32 -> fp8
cast drops a carry on 2-3 % of the values (DESIGN §6), 15 % and 0.99."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import (
    RouteConfig,
    act_quant,
    fp8_grouped_gemm,
    fp8_grouped_gemm_masked,
    moe_combine,
    moe_permute,
    moe_route,
    silu_mul_quant,
    weight_dequant,
    weight_quant,
)
from moemesh.kernels.dispatch import interpreting

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REL_L2, MIN_COS = (0.15, 0.99) if interpreting() else (0.06, 0.998)


def _experts(e, hidden, inter, seed, device):
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(e, hidden, inter, generator=gen) * inter**-0.5).to(torch.bfloat16)
    q13 = [weight_quant(w.to(device)) for w in w13]
    q2 = [weight_quant(w.to(device)) for w in w2]
    stack = lambda qs, i: torch.stack([q[i] for q in qs])  # noqa: E731
    return stack(q13, 0), stack(q13, 1), stack(q2, 0), stack(q2, 1)


def _reference(x, ids, weights, w13, w13_s, w2, w2_s):
    """fp32 on dequantized weights, token by token."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = x[tok].float() @ weight_dequant(w13[e], w13_s[e]).T
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, weights[tok, slot][:, None] * (a @ weight_dequant(w2[e], w2_s[e]).T))
    return out


def _moe_fp8(x, cfg, gate, bias, w13, w13_s, w2, w2_s, masked: bool):
    route = moe_route(x.float() @ gate.T, cfg, bias)
    x_fp8, x_scale = act_quant(x)
    e = cfg.n_routed_experts
    if masked:
        p = moe_permute(x_fp8, route.ids, e, x_scale, max_m=x.shape[0])
        h = fp8_grouped_gemm_masked(p.x, p.x_scale, w13, w13_s, p.counts)
        h_fp8, h_scale = silu_mul_quant(h)
        y = fp8_grouped_gemm_masked(h_fp8, h_scale, w2, w2_s, p.counts)
    else:
        p = moe_permute(x_fp8, route.ids, e, x_scale)
        h = fp8_grouped_gemm(p.x, p.x_scale, w13, w13_s, p.offsets)
        h_fp8, h_scale = silu_mul_quant(h)
        y = fp8_grouped_gemm(h_fp8, h_scale, w2, w2_s, p.offsets)
    return moe_combine(y, route.weights, p.slot_rows), route


def _check(out, ref):
    out, ref = out.float().cpu(), ref.float().cpu()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert rel <= REL_L2 and cos >= MIN_COS, f"relative L2 {rel:.4f}, cosine {cos:.5f}"


@pytest.mark.parametrize("masked", [False, True])
def test_fp8_moe_layer_tiny_v3(masked):
    cfg = RouteConfig(2, 8, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    tokens, hidden, inter = 11, 256, 136  # inter not a multiple of 128
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).to(DEV)
    gate = (torch.randn(8, hidden, generator=gen) * hidden**-0.5).to(DEV)
    bias = (torch.randn(8, generator=gen) * 0.1).to(DEV)
    w13, w13_s, w2, w2_s = _experts(8, hidden, inter, seed=6, device=DEV)
    out, route = _moe_fp8(x, cfg, gate, bias, w13, w13_s, w2, w2_s, masked)
    _check(out, _reference(x, route.ids, route.weights, w13, w13_s, w2, w2_s))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_fp8_moe_layer_v3_shapes(masked):
    """DeepSeek-V3 expert shapes (hidden 7168, moe_intermediate 2048), 32 of its 256 experts, top-8 routing."""
    cfg = RouteConfig(8, 32, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    tokens, hidden, inter = 64 if masked else 512, 7168, 2048
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(32, hidden, device="cuda") * hidden**-0.5
    w13, w13_s, w2, w2_s = _experts(32, hidden, inter, seed=7, device="cuda")
    out, route = _moe_fp8(x, cfg, gate, None, w13, w13_s, w2, w2_s, masked)
    # reference on a token subset (the loop is slow)
    sub = torch.arange(0, tokens, 7, device="cuda")
    ref = _reference(x[sub], route.ids[sub], route.weights[sub], w13, w13_s, w2, w2_s)
    _check(out[sub], ref)
