"""MoE routing and permutation for 4096 tokens x 256 experts (DeepSeek-V3: top-8 of 8 groups, 4 kept), our
kernels vs the plain-torch versions (the references, on the GPU), timed as launched (CUDA events, launch gaps
included) and as CUDA-graph replays (device time alone).

    python -m bench.bench_moe_route [--out DIR]
"""

from __future__ import annotations

import argparse

import torch
import triton

from bench.harness import header, median_ms, print_table, save_plot, write_json
from moemesh.kernels.moe_permute import moe_combine, moe_permute, reference_combine, reference_permute
from moemesh.kernels.moe_route import RouteConfig, moe_route, reference

V3 = RouteConfig(8, 256, n_group=8, topk_group=4, routed_scaling_factor=2.5)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = header()
    rows = []
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
