"""FP8 block-scaled GEMMs at DeepSeek-V3 shapes vs PyTorch's FP8 GEMMs measured in the same run.

* grouped contiguous (`fp8_grouped_gemm`, 1x128 x 128x128 block scales) vs `torch._scaled_grouped_mm` with
  row-wise scales (coarser scaling, cuBLAS/CUTLASS), experts 4-32, 64-8192 rows each, (N, K) = (4096, 7168)
  (gate+up) and (7168, 2048) (down);
* grouped masked (`fp8_grouped_gemm_masked`) with every expert at its max_m rows;
* dense `fp8_gemm` vs `torch._scaled_mm` (row-wise) at the attention projection shapes, M 1-8192;
* the dense FP8 ceiling: `torch._scaled_mm` at 8192^3.

TFLOP/s = 2 M N K / median time (CUDA events). Targets (issue 5): contiguous >= 1.1x the row-wise peer,
masked at 256 rows per expert >= 700 TFLOP/s.

    python -m bench.bench_fp8_gemm [--out DIR] [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.harness import header, median_ms, print_table, save_plot, write_json
from moemesh.kernels import act_quant, fp8_gemm, fp8_grouped_gemm, fp8_grouped_gemm_masked
from moemesh.kernels.fp8_gemm import SplitKWorkspace, TileConfig, pick_config

EXPERT_SHAPES = [(4096, 7168), (7168, 2048)]  # (N, K): gate+up of 2 x 2048, down
ATTN_SHAPES = {  # (N, K) of DeepSeek-V3's attention projections
    "q_a_proj": (1536, 7168),
    "kv_a_proj_with_mqa": (576, 7168),
    "q_b_proj": (24576, 1536),
    "kv_b_proj": (32768, 512),
    "o_proj": (7168, 16384),
}
SWEEP = [
    TileConfig(128, 128, 8, 3),
    TileConfig(128, 128, 8, 3, mode=1),
    TileConfig(128, 128, 8, 4, mode=1),
    TileConfig(128, 128, 8, 2, mode=1),
    TileConfig(256, 128, 8, 3, mode=1),
    TileConfig(64, 128, 4, 4, mode=1),
    TileConfig(64, 128, 4, 5, mode=1),
]


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / ms / 1e9


def weights(e: int, n: int, k: int):
    b = (torch.randn(e, n, k, device="cuda") * 0.05).to(torch.float8_e4m3fn)
    b_s = torch.rand(e, -(-n // 128), -(-k // 128), device="cuda") * 1e-2 + 1e-3
    return b, b_s


def rowwise(a_bf16: torch.Tensor):
    """Row-wise FP8 for the PyTorch peers: one scale per row."""
    s = a_bf16.float().abs().amax(-1).clamp_min(1e-10) / 448.0
    return (a_bf16.float() / s[..., None]).to(torch.float8_e4m3fn), s


def peer_grouped(a_bf16, b, offsets):
    """torch._scaled_grouped_mm with row-wise scales; returns a callable or None where it refuses."""
    a_q, a_s = rowwise(a_bf16)
    b_s = torch.rand(b.shape[0], b.shape[1], device="cuda") * 1e-2 + 1e-3
    b_t = b.transpose(1, 2)  # [E, K, N] column-major, as cuBLAS wants
    offs = offsets[1:].contiguous()

    def run():
        return torch._scaled_grouped_mm(a_q, b_t, a_s, b_s, offs=offs, out_dtype=torch.bfloat16)

    try:
        run()
    except (RuntimeError, TypeError) as err:
        print(f"  _scaled_grouped_mm refused: {str(err).splitlines()[0][:100]}")
        return None
    return run


def bench_contiguous(quick: bool, rows_list, experts_list):
    rows_out = []
    for n, k in EXPERT_SHAPES:
        for e in experts_list:
            b, b_s = weights(e, n, k)
            for rows in rows_list:
                m = e * rows
                if m * k > (1 << 31):
                    continue
                a_bf16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                a, a_s = act_quant(a_bf16)
                offsets = torch.arange(0, m + 1, rows, device="cuda", dtype=torch.int32)
                ours = median_ms(
                    lambda a=a, a_s=a_s, b=b, b_s=b_s, o=offsets: fp8_grouped_gemm(a, a_s, b, b_s, o)
                )
                peer = peer_grouped(a_bf16, b, offsets)
                peer_ms = median_ms(peer) if peer else None
                r = dict(n=n, k=k, experts=e, rows=rows, ours_tflops=tflops(m, n, k, ours))
                r["peer_tflops"] = tflops(m, n, k, peer_ms) if peer_ms else None
                r["ratio"] = r["ours_tflops"] / r["peer_tflops"] if peer_ms else None
                rows_out.append(r)
                del a_bf16, a, a_s
            del b, b_s
            torch.cuda.empty_cache()
    return rows_out


def bench_masked(experts_list, max_m_list):
    out = []
    for n, k in EXPERT_SHAPES:
        for e in experts_list:
            b, b_s = weights(e, n, k)
            for max_m in max_m_list:
                a, a_s = act_quant(torch.randn(e, max_m, k, device="cuda", dtype=torch.bfloat16))
                counts = torch.full((e,), max_m, device="cuda", dtype=torch.int32)
                ms = median_ms(
                    lambda a=a, a_s=a_s, b=b, b_s=b_s, c=counts: fp8_grouped_gemm_masked(a, a_s, b, b_s, c)
                )
                out.append(dict(n=n, k=k, experts=e, max_m=max_m, ours_tflops=tflops(e * max_m, n, k, ms)))
            del b, b_s
            torch.cuda.empty_cache()
    return out


def bench_dense(m_list):
    out = []
    workspace = SplitKWorkspace()  # as a model's projections share one: split-K without a memset a call
    for name, (n, k) in ATTN_SHAPES.items():
        b, b_s = weights(1, n, k)
        b_peer_s = torch.rand(1, n, device="cuda") * 1e-2 + 1e-3
        for m in m_list:
            a_bf16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a, a_s = act_quant(a_bf16)
            ours = median_ms(
                lambda a=a, a_s=a_s, w=b[0], w_s=b_s[0]: fp8_gemm(a, a_s, w, w_s, workspace=workspace)
            )
            a_q, a_rs = rowwise(a_bf16)
            peer_ms = None
            if k % 16 == 0 and n % 16 == 0:
                try:
                    peer_ms = median_ms(
                        lambda a_q=a_q, a_rs=a_rs, w=b[0], w_s=b_peer_s: torch._scaled_mm(
                            a_q, w.T, a_rs[:, None], w_s, out_dtype=torch.bfloat16
                        )
                    )
                except RuntimeError as err:
                    print(f"  _scaled_mm refused {name} m={m}: {str(err).splitlines()[0][:80]}")
            r = dict(proj=name, n=n, k=k, m=m, ours_us=ours * 1e3, ours_tflops=tflops(m, n, k, ours))
            r["peer_us"] = peer_ms * 1e3 if peer_ms else None
            r["speedup"] = peer_ms / ours if peer_ms else None
            out.append(r)
    return out


def dense_ceiling() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    ms = median_ms(lambda: torch._scaled_mm(a, b.T, one, one, out_dtype=torch.bfloat16))
    return tflops(n, n, n, ms)


def sweep_configs():
    """Tile configs on the reference point of the issue (8 experts x 1024 rows, N 4096, K 7168) and on masked 256."""
    out = []
    n, k, e, rows = 4096, 7168, 8, 1024
    b, b_s = weights(e, n, k)
    a, a_s = act_quant(torch.randn(e * rows, k, device="cuda", dtype=torch.bfloat16))
    offsets = torch.arange(0, e * rows + 1, rows, device="cuda", dtype=torch.int32)
    a_s_mn = a_s.T.contiguous().T  # M-major scales: coalesced loads per K step
    am, am_s = act_quant(torch.randn(e, 256, k, device="cuda", dtype=torch.bfloat16))
    counts = torch.full((e,), 256, device="cuda", dtype=torch.int32)
    for cfg in SWEEP:
        try:
            c_ms = median_ms(lambda cfg=cfg: fp8_grouped_gemm(a, a_s, b, b_s, offsets, config=cfg))
            m_ms = median_ms(lambda cfg=cfg: fp8_grouped_gemm_masked(am, am_s, b, b_s, counts, config=cfg))
            mn_ms = median_ms(lambda cfg=cfg: fp8_grouped_gemm(a, a_s_mn, b, b_s, offsets, config=cfg))
        except Exception as err:  # noqa: BLE001 - a config that does not compile is reported, not fatal
            print(f"  {cfg} failed: {str(err).splitlines()[0][:100]}")
            continue
        out.append(
            dict(
                config=f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} m{cfg.mode}",
                contiguous_tflops=tflops(e * rows, n, k, c_ms),
                contiguous_m_major_scales_tflops=tflops(e * rows, n, k, mn_ms),
                masked256_tflops=tflops(e * 256, n, k, m_ms),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--only", default="ceiling,sweep,contiguous,masked,dense")
    parser.add_argument("--replot", default=None, help="render the PNG of a result JSON (no GPU needed)")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.out)
        return
    only = set(args.only.split(","))
    torch.manual_seed(0)
    result = header()
    print(result)
    if "ceiling" in only:
        result["scaled_mm_8192_tflops"] = dense_ceiling()
        print(f"torch._scaled_mm 8192^3 (tensor-wise): {result['scaled_mm_8192_tflops']:.0f} TFLOP/s")
    if args.sweep and "sweep" in only:
        result["sweep"] = sweep_configs()
        print_table(
            result["sweep"],
            ["config", "contiguous_tflops", "contiguous_m_major_scales_tflops", "masked256_tflops"],
        )
    rows_list = [256, 1024, 4096] if args.quick else [64, 256, 1024, 4096, 8192]
    experts_list = [8] if args.quick else [4, 8, 32]
    if "contiguous" in only:
        result["contiguous"] = bench_contiguous(args.quick, rows_list, experts_list)
        print_table(
            result["contiguous"], ["n", "k", "experts", "rows", "ours_tflops", "peer_tflops", "ratio"]
        )
    if "masked" in only:
        result["masked"] = bench_masked([8] if args.quick else [8, 32], [64, 128, 256])
        print_table(result["masked"], ["n", "k", "experts", "max_m", "ours_tflops"])
    if "dense" in only:
        result["dense"] = bench_dense([1, 16, 128, 1024, 4096, 8192])
        print_table(result["dense"], ["proj", "m", "ours_us", "peer_us", "ours_tflops", "speedup"])
    result["default_configs"] = {str(m): str(pick_config(m, 4096)) for m in (1, 64, 1024)}
    path = write_json(f"fp8_gemm-{_tag(result)}", result, args.out)
    print(f"wrote {path}")
    plot(result, args.out)


def plot(result: dict, out_dir: str | None) -> None:
    panels = []
    for n, k in EXPERT_SHAPES:
        series = {}
        for e in sorted({r["experts"] for r in result.get("contiguous", [])}):
            pts = [r for r in result["contiguous"] if r["n"] == n and r["k"] == k and r["experts"] == e]
            series[f"ours E={e}"] = ([r["rows"] for r in pts], [r["ours_tflops"] for r in pts])
            peer = [r for r in pts if r["peer_tflops"]]
            series[f"torch._scaled_grouped_mm E={e}"] = (
                [r["rows"] for r in peer],
                [r["peer_tflops"] for r in peer],
            )
        masked = [r for r in result.get("masked", []) if r["n"] == n and r["k"] == k]
        for e in sorted({r["experts"] for r in masked}):
            pts = [r for r in masked if r["experts"] == e]
            series[f"ours masked E={e}"] = ([r["max_m"] for r in pts], [r["ours_tflops"] for r in pts])
        panels.append(
            dict(
                title=f"grouped FP8, N={n} K={k} ({result['card']})",
                xlabel="rows per expert",
                ylabel="TFLOP/s",
                series=series,
                logx=True,
                hline=(result["scaled_mm_8192_tflops"], "torch._scaled_mm 8192^3")
                if "scaled_mm_8192_tflops" in result
                else None,
            )
        )
    if result.get("dense"):
        series = {}
        for proj in ATTN_SHAPES:
            pts = [r for r in result["dense"] if r["proj"] == proj and r["speedup"]]
            series[proj] = ([r["m"] for r in pts], [r["speedup"] for r in pts])
        panels.append(
            dict(
                title="fp8_gemm speed-up over torch._scaled_mm",
                xlabel="M",
                ylabel="x",
                series=series,
                logx=True,
            )
        )
    if panels:
        save_plot(f"fp8_gemm-{_tag(result)}", panels, out_dir)


def _tag(result: dict) -> str:
    return result["card"].replace(" ", "_")


if __name__ == "__main__":
    main()
