"""MoE routing and permutation for 4096 tokens x 256 experts (DeepSeek-V3: top-8 of 8 groups, 4 kept), our
kernels vs the plain-torch versions (the references, on the GPU), timed as launched (CUDA events, launch gaps
included) and as CUDA-graph replays (device time alone). Decode sizes (1-64 tokens): the router's fp32 GEMM
inside the routing kernel (`moe_route_gemm`, one launch) against the GEMM then `moe_route` (the path before,
cuBLAS's two kernels + ours), at V2-Lite's router (64 x 2048) and V3's (256 x 7168); rows `router+route ...`.

    python -m bench.bench_moe_route [--out DIR]
"""

from __future__ import annotations

import argparse

import torch
import triton

from bench.harness import header, median_ms, print_table, save_plot, write_json
from moemesh.kernels.moe_permute import moe_combine, moe_permute, reference_combine, reference_permute
from moemesh.kernels.moe_route import RouteConfig, moe_route, reference
from moemesh.kernels.moe_route_gemm import fusable, moe_route_gemm, route_counters

V3 = RouteConfig(8, 256, n_group=8, topk_group=4, routed_scaling_factor=2.5)
V2_LITE = RouteConfig(6, 64, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy")
ROUTERS = {"V2-Lite 64x2048": (V2_LITE, 2048, (1, 8, 64)), "V3 256x7168": (V3, 7168, (1, 8, 16))}


def graph_ms(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def bench_tokens(tokens: int) -> list[dict]:
    rows = []
    logits = torch.randn(tokens, 256, device="cuda")
    bias = torch.randn(256, device="cuda") * 0.1
    x = torch.randn(tokens, 7168, device="cuda").to(torch.float8_e4m3fn)
    x_scale = torch.rand(tokens, 56, device="cuda")
    ids = moe_route(logits, V3, bias).ids
    weights = torch.rand(tokens, 8, device="cuda")
    y = torch.randn(tokens * 8, 7168, device="cuda", dtype=torch.bfloat16)
    slots = moe_permute(x, ids, 256, x_scale).slot_rows
    cases = {
        "route": (lambda: moe_route(logits, V3, bias), lambda: reference(logits, V3, bias)),
        "permute (fp8 x + scales)": (
            lambda: moe_permute(x, ids, 256, x_scale),
            lambda: reference_permute(x, ids, 256, x_scale),
        ),
        "route + permute": (
            lambda: moe_permute(x, moe_route(logits, V3, bias).ids, 256, x_scale),
            lambda: reference_permute(x, reference(logits, V3, bias).ids, 256, x_scale),
        ),
        "combine (bf16, H 7168)": (
            lambda: moe_combine(y, weights, slots),
            lambda: reference_combine(y, weights, slots),
        ),
    }
    for name, (ours, peer) in cases.items():
        r = dict(tokens=tokens, op=name, ours_us=median_ms(ours) * 1e3, torch_us=median_ms(peer) * 1e3)
        try:
            r["ours_graph_us"] = graph_ms(ours) * 1e3
        except RuntimeError as err:  # a path that syncs the host cannot be captured
            print(f"  {name}: no graph ({str(err).splitlines()[0][:80]})")
        try:
            r["torch_graph_us"] = graph_ms(peer) * 1e3
        except RuntimeError as err:
            print(f"  torch {name}: no graph ({str(err).splitlines()[0][:80]})")
        r["speedup"] = r["torch_us"] / r["ours_us"]
        rows.append(r)
    return rows


def bench_router() -> list[dict]:
    """The router GEMM fused into routing vs GEMM + moe_route, per decode size (peer: the path before)."""
    rows = []
    for name, (cfg, hidden, sizes) in ROUTERS.items():
        w = torch.randn(cfg.n_routed_experts, hidden, device="cuda") * hidden**-0.5
        bias = torch.randn(cfg.n_routed_experts, device="cuda") * 0.1 if cfg.v3 else None
        counters = route_counters("cuda")
        for tokens in sizes:
            assert fusable(tokens, cfg), (name, tokens)
            rows.append(_router_row(name, cfg, torch.randn(tokens, hidden, device="cuda"), w, bias, counters))
    return rows


def _router_row(name: str, cfg: RouteConfig, x, w, bias, counters) -> dict:
    def ours():
        return moe_route_gemm(x, w, cfg, bias, counters=counters)

    def peer():
        return moe_route(torch.nn.functional.linear(x, w), cfg, bias)

    same = torch.equal(ours().ids.sort(-1).values, peer().ids.sort(-1).values)
    r = dict(tokens=x.shape[0], op=f"router+route {name}", peer="F.linear + moe_route", same_ids=same,
             ours_us=median_ms(ours) * 1e3, torch_us=median_ms(peer) * 1e3,
             ours_graph_us=graph_ms(ours) * 1e3, torch_graph_us=graph_ms(peer) * 1e3)  # fmt: skip
    r["speedup"] = r["torch_graph_us"] / r["ours_graph_us"]  # in a graph, as the decode step runs
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = header()
    rows = []
    rows += bench_router()
    for tokens in (128, 1024, 4096, 16384):
        rows += bench_tokens(tokens)
    result["rows"] = rows
    print_table(rows, ["tokens", "op", "ours_us", "torch_us", "speedup", "ours_graph_us", "torch_graph_us"])
    print("wrote", write_json(f"moe_route-{_tag(result)}", result, args.out))
    series = {}
    for op in sorted({r["op"] for r in rows}):
        pts = [r for r in rows if r["op"] == op]
        series[f"ours {op}"] = ([r["tokens"] for r in pts], [r["ours_us"] for r in pts])
        series[f"torch {op}"] = ([r["tokens"] for r in pts], [r["torch_us"] for r in pts])
    panel = dict(title=f"MoE route/permute, 256 experts ({result['card']})", xlabel="tokens", ylabel="µs",
                 series=series, logx=True)  # fmt: skip
    save_plot(f"moe_route-{_tag(result)}", [panel], args.out)


def _tag(result: dict) -> str:
    return result["card"].replace(" ", "_")


if __name__ == "__main__":
    main()
