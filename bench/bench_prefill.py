"""MLA prefill attention at DeepSeek-V3 shapes (128 heads, q/k 192, v 128, causal) against torch SDPA's cuDNN
backend on the same shapes, same run. TFLOP/s count the causal half: 2 * H * (n^2 / 2) * (192 + 128) per
sequence (plus 2 * H * n * prefix * 320 with a cached prefix).

    python -m bench.bench_prefill [--out DIR] [--sweep]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import header, median_ms, print_table, save_plot, write_json
from moemesh.kernels import mla_prefill
from moemesh.kernels.mla_prefill import PrefillConfig, Prefix

NUM_HEADS, QK, V = 128, 192, 128
SCALE = QK**-0.5
SHAPES = [(4, 4096, 0), (1, 8192, 0), (16, 1024, 0), (2, 2048, 4096)]  # (batch, chunk, prefix)


def inputs(batch, n, prefix_len, gen):
    t = batch * n
    q = torch.randn(t, NUM_HEADS, QK, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(t, NUM_HEADS, QK, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(t, NUM_HEADS, V, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.arange(0, t + 1, n, device="cuda", dtype=torch.int32)
    prefix = None
    if prefix_len:
        pk = torch.randn(
            batch * prefix_len, NUM_HEADS, QK, device="cuda", dtype=torch.bfloat16, generator=gen
        )
        pv = torch.randn(batch * prefix_len, NUM_HEADS, V, device="cuda", dtype=torch.bfloat16, generator=gen)
        pcu = torch.arange(0, batch * prefix_len + 1, prefix_len, device="cuda", dtype=torch.int32)
        prefix = Prefix(pk, pv, pcu)
    return q, k, v, cu, prefix


def flops(batch, n, prefix_len):
    return batch * NUM_HEADS * (QK + V) * 2 * (n * n / 2 + n * prefix_len)


def cudnn(q, k, v, batch, n):
    qb, kb, vb = (x.view(batch, n, NUM_HEADS, -1).transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=SCALE)


def bench_shape(batch, n, prefix_len, configs, gen) -> dict:
    q, k, v, cu, prefix = inputs(batch, n, prefix_len, gen)
    fl = flops(batch, n, prefix_len)
    row = {"batch": batch, "chunk": n, "prefix": prefix_len}
    best = None
    for cfg in configs:
        try:
            ms = median_ms(lambda c=cfg: mla_prefill(q, k, v, cu, SCALE, n, prefix, config=c))
        except Exception as e:  # noqa: BLE001 - a config out of resources is a result
            print(f"{cfg}: {type(e).__name__} {str(e)[:80]}")
            continue
        name = (
            f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"
            + ("" if cfg.tma else "ptr")
            + ("" if cfg.lazy_rescale else "eager")
        )
        row[f"{name}_TFLOPs"] = fl / ms / 1e9
        if best is None or ms < best[0]:
            best = (ms, name)
    row["ours_us"], row["ours_cfg"] = 1e3 * best[0], best[1]
    row["ours_TFLOPs"] = fl / best[0] / 1e9
    if not prefix_len:
        ms_c = median_ms(lambda: cudnn(q, k, v, batch, n))
        row["cudnn_us"] = 1e3 * ms_c
        row["cudnn_TFLOPs"] = fl / ms_c / 1e9
        row["vs_cudnn"] = ms_c / best[0]
    return row


def bench(shapes, configs):
    rows, gen = [], torch.Generator(device="cuda").manual_seed(0)
    for batch, n, prefix_len in shapes:
        rows.append(bench_shape(batch, n, prefix_len, configs, gen))
        torch.cuda.empty_cache()
    return rows


SWEEP = [
    PrefillConfig(128, 64, 8, 3, tma=False),
    PrefillConfig(128, 64, 8, 3, lazy_rescale=False),
    PrefillConfig(128, 64, 8, 3),
    PrefillConfig(128, 64, 8, 4),
    PrefillConfig(128, 128, 8, 2),
    PrefillConfig(128, 32, 4, 3),
    PrefillConfig(64, 64, 4, 3),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    meta = header()
    print(f"{meta['card']}  commit {meta['commit']}")
    rows = bench(SHAPES, SWEEP if args.sweep else [PrefillConfig()])
    print_table(rows, ["batch", "chunk", "prefix", "ours_cfg", "ours_us", "ours_TFLOPs", "cudnn_us",
                       "cudnn_TFLOPs", "vs_cudnn"])  # fmt: skip
    if args.sweep:
        cfgs = sorted({k[: -len("_TFLOPs")] for r in rows for k in r if k.startswith("m") and "_TFLOPs" in k})
        print_table(rows, ["batch", "chunk", "prefix"] + [f"{c}_TFLOPs" for c in cfgs])
    name = f"mla_prefill-{meta['card'].replace(' ', '_')}"
    print(f"wrote {write_json(name, {**meta, 'prefill': rows}, args.out)}")
    labels = [f"{r['batch']}x{r['chunk']}" + (f"+{r['prefix']}" if r["prefix"] else "") for r in rows]
    series = {"ours": (labels, [r["ours_TFLOPs"] for r in rows])}
    cud = [(lab, r["cudnn_TFLOPs"]) for lab, r in zip(labels, rows, strict=True) if "cudnn_TFLOPs" in r]
    series["torch SDPA cuDNN"] = tuple(zip(*cud, strict=True))
    save_plot(name, [{"title": f"mla_prefill, 128 heads, qk 192 / v 128, causal\n{meta['card']} {meta['commit']}",
                      "xlabel": "batch x chunk (+prefix)", "ylabel": "TFLOP/s", "series": series}], args.out)  # fmt: skip


if __name__ == "__main__":
    main()
