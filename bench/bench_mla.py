"""MLA decode and KV pack/unpack at DeepSeek-V3 shapes, against the copy bandwidth of the same run.

mla_decode: 128 heads, kv_lora_rank 512 + rope 64, page 64, every sequence of the batch at the same context;
achieved GB/s = (cache bytes read + q bytes) / time, for the BF16 and the FP8 cache, and for the plain-torch
absorbed peer (gather + two einsums); every op timed as CUDA-graph replays (as a serving decode step runs), so
launch and host overhead stay out. At 128 heads the work is 2 * 128 * (512 + 576) FLOP per 1152 cache bytes
(242 FLOP/B): the tensor-core rate bounds it as much as the memory (TFLOPs column). pack/unpack: random pages of a stacked [L, P, 64, 576] cache, GB/s counting
bytes read plus written.

    python -m bench.bench_mla [--out DIR] [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.harness import (
    copy_bandwidth_gbs,
    graph_median_ms,
    header,
    median_ms,
    print_table,
    save_plot,
    write_json,
)
from moemesh.kernels import mla_decode, pack_kv, store_kv, unpack_kv
from moemesh.kernels.mla_decode import DecodeConfig
from moemesh.kernels.paged_kv import fp8_row_bytes

NUM_HEADS, RANK, ROPE, PAGE = 128, 512, 64, 64
SCALE = 192**-0.5


def decode_inputs(batch: int, ctx: int, fp8: bool, gen: torch.Generator):
    pages_per_seq = -(-ctx // PAGE)
    num_pages = batch * pages_per_seq
    page_table = torch.randperm(num_pages, device="cuda", generator=gen).int().view(batch, pages_per_seq)
    if fp8:
        cache = torch.empty(
            num_pages, PAGE, fp8_row_bytes(RANK, ROPE), dtype=torch.float8_e4m3fn, device="cuda"
        )
        chunk = 1 << 20
        for start in range(0, num_pages * PAGE, chunk):
            n = min(chunk, num_pages * PAGE - start)
            latent = torch.randn(n, RANK, device="cuda", dtype=torch.bfloat16, generator=gen)
            k_pe = torch.randn(n, ROPE, device="cuda", dtype=torch.bfloat16, generator=gen)
            slots = torch.arange(start, start + n, device="cuda")
            store_kv(cache, latent, k_pe, slots)
    else:
        cache = torch.randn(num_pages, PAGE, RANK + ROPE, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(batch, NUM_HEADS, RANK + ROPE, device="cuda", dtype=torch.bfloat16, generator=gen)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, cache, page_table, seq_lens


def torch_absorbed(q, cache, page_table, seq_lens):
    """The plain-torch peer: gather every sequence's rows, scores by einsum, softmax in fp32, weighted latents."""
    batch, pages = page_table.shape
    kv = cache[page_table.long()].view(batch, pages * PAGE, RANK + ROPE)
    scores = torch.einsum("bhd,btd->bht", q, kv).float() * SCALE
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.einsum("bht,btc->bhc", p, kv[..., :RANK])


def decode_bytes(batch: int, ctx: int, fp8: bool) -> int:
    row = fp8_row_bytes(RANK, ROPE) if fp8 else 2 * (RANK + ROPE)
    return batch * ctx * row + batch * NUM_HEADS * (RANK + ROPE) * 2


def bench_decode(batches, contexts, copy_gbs, with_torch=True):
    rows, gen = [], torch.Generator(device="cuda").manual_seed(0)
    for batch in batches:
        for ctx in contexts:
            row = {"batch": batch, "ctx": ctx}
            for fp8 in (False, True):
                args = decode_inputs(batch, ctx, fp8, gen)
                ms = graph_median_ms(lambda a=args: mla_decode(*a, SCALE, RANK))
                key = "fp8" if fp8 else "bf16"
                row[f"{key}_us"] = 1e3 * ms
                row[f"{key}_GBs"] = decode_bytes(batch, ctx, fp8) / ms / 1e6
                row[f"{key}_pct_copy"] = 100 * row[f"{key}_GBs"] / copy_gbs
                row[f"{key}_TFLOPs"] = 2 * batch * NUM_HEADS * ctx * (2 * RANK + ROPE) / ms / 1e9
                if not fp8 and with_torch and batch * ctx <= 128 * 8192:
                    ms_t = graph_median_ms(lambda a=args: torch_absorbed(*a))
                    row["torch_us"] = 1e3 * ms_t
                    row["torch_pct_copy"] = 100 * decode_bytes(batch, ctx, False) / ms_t / 1e6 / copy_gbs
                del args
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


SWEEP = {
    False: [  # BF16 cache: TMA kernel, and the pointer kernel for comparison
        DecodeConfig(64, 64, 8, 2),
        DecodeConfig(64, 64, 8, 2, lazy_rescale=False),
        DecodeConfig(64, 64, 8, 3),
        DecodeConfig(64, 32, 8, 2),
        DecodeConfig(64, 64, 16, 2),
        DecodeConfig(64, 64, 8, 2, tma=False),
    ],
    True: [  # FP8 cache: TMA kernel with in-register dequant, and the pointer kernel
        DecodeConfig(64, 64, 8, 2),
        DecodeConfig(64, 64, 8, 2, lazy_rescale=False),
        DecodeConfig(64, 32, 8, 2),
        DecodeConfig(64, 64, 8, 1, tma=False),
    ],
}


def sweep_decode(shapes, copy_gbs):
    rows, gen = [], torch.Generator(device="cuda").manual_seed(1)
    for batch, ctx, fp8 in shapes:
        args = decode_inputs(batch, ctx, fp8, gen)
        for cfg in SWEEP[fp8]:
            for splits in (None,):
                try:
                    ms = graph_median_ms(
                        lambda a=args, c=cfg, s=splits: mla_decode(*a, SCALE, RANK, num_splits=s, config=c)
                    )
                except Exception as e:  # noqa: BLE001 - an out-of-resources config is a result, not a failure
                    print(f"config {cfg} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                gbs = decode_bytes(batch, ctx, fp8) / ms / 1e6
                rows.append(
                    {
                        "batch": batch,
                        "ctx": ctx,
                        "fp8": fp8,
                        "cfg": f"h{cfg.block_h}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"
                        + ("" if cfg.tma else "-ptr")
                        + ("" if cfg.lazy_rescale else "-eager"),
                        "splits": splits,
                        "us": 1e3 * ms,
                        "pct_copy": 100 * gbs / copy_gbs,
                    }
                )
        del args
        torch.cuda.empty_cache()
    return rows


def bench_pack(copy_gbs, num_layers=16, num_pages=4096, picks=(64, 1024)):
    gen = torch.Generator(device="cuda").manual_seed(2)
    cache = torch.randn(
        num_layers, num_pages, PAGE, RANK + ROPE, device="cuda", dtype=torch.bfloat16, generator=gen
    )
    rows = []
    for n in picks:
        ids = torch.randperm(num_pages, device="cuda", generator=gen)[:n]
        dst_ids = torch.randperm(num_pages, device="cuda", generator=gen)[:n]
        buf = pack_kv(cache, ids)
        assert torch.equal(buf, cache[:, ids])
        moved = 2 * buf.numel() * buf.element_size()
        for name, fn in (
            ("pack_all_layers", lambda i=ids, b=buf: pack_kv(cache, i, out=b)),
            ("unpack_all_layers", lambda i=dst_ids, b=buf: unpack_kv(b, cache, i)),
            ("torch_index_select", lambda i=ids: cache.index_select(1, i)),
        ):
            ms = median_ms(fn)
            rows.append({"op": name, "pages": n, "layers": num_layers, "MB": moved / 2e6, "us": 1e3 * ms,
                         "GBs": moved / ms / 1e6, "pct_copy": 100 * moved / ms / 1e6 / copy_gbs})  # fmt: skip
        one = buf[0].clone()
        ms = median_ms(lambda i=ids, o=one: pack_kv(cache[3], i, out=o))
        moved = 2 * one.numel() * one.element_size()
        rows.append({"op": "pack_one_layer", "pages": n, "layers": 1, "MB": moved / 2e6, "us": 1e3 * ms,
                     "GBs": moved / ms / 1e6, "pct_copy": 100 * moved / ms / 1e6 / copy_gbs})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configs")
    parser.add_argument("--plot", default=None, help="only redraw the PNG of this results JSON")
    args = parser.parse_args()
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        print(save_plot(Path(args.plot).stem, decode_panels(result), args.out or str(Path(args.plot).parent)))
        return
    meta = header()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{meta['card']}  commit {meta['commit']}  copy bandwidth {copy_gbs:.0f} GB/s")
    result = {**meta, "copy_GBs": copy_gbs}
    if args.sweep:
        result["sweep"] = sweep_decode([(64, 4096, False), (128, 8192, False), (2, 16384, False), (64, 4096, True)],
                                       copy_gbs)  # fmt: skip
        print_table(result["sweep"], ["batch", "ctx", "fp8", "cfg", "splits", "us", "pct_copy"])
    batches = [1, 64, 128] if args.quick else [1, 8, 32, 64, 128]
    contexts = [4096] if args.quick else [1024, 4096, 16384, 32768]
    result["decode"] = bench_decode(batches, contexts, copy_gbs)
    cols = ["batch", "ctx", "bf16_us", "bf16_GBs", "bf16_pct_copy", "bf16_TFLOPs", "fp8_us", "fp8_pct_copy"]
    print_table(result["decode"], cols + ["torch_us", "torch_pct_copy"])
    result["pack"] = bench_pack(copy_gbs)
    print_table(result["pack"], ["op", "pages", "layers", "MB", "us", "GBs", "pct_copy"])
    name = f"mla_decode-{meta['card'].replace(' ', '_')}"
    print(f"wrote {write_json(name, result, args.out)}")
    save_plot(name, decode_panels(result), args.out)


def decode_panels(result: dict) -> list[dict]:
    """% of copy bandwidth against context, one line per batch and cache kind; pack/unpack against pages."""
    series, styles = {}, {}
    batches = sorted({r["batch"] for r in result["decode"]})
    for kind, linestyle in (("bf16", "-"), ("fp8", "--"), ("torch", ":")):
        for i, batch in enumerate(batches):
            pts = [(r["ctx"], r[f"{kind}_pct_copy"]) for r in result["decode"]
                   if r["batch"] == batch and f"{kind}_pct_copy" in r]  # fmt: skip
            if pts:
                series[f"{kind} b={batch}"] = tuple(zip(*pts, strict=True))
                styles[f"{kind} b={batch}"] = {"linestyle": linestyle, "color": f"C{i}"}
    pack = {}
    for op in sorted({r["op"] for r in result["pack"]}):
        pts = [(r["pages"], r["pct_copy"]) for r in result["pack"] if r["op"] == op]
        pack[op] = tuple(zip(*pts, strict=True))
    title = f"{result['card']}, copy {result['copy_GBs']:.0f} GB/s, {result['commit']}"
    return [
        {"title": f"mla_decode (128 heads, page 64)\n{title}", "xlabel": "context", "ylabel": "% of copy bandwidth",
         "series": series, "styles": styles, "hline": (80, "target 80%"), "logx": True},
        {"title": f"pack / unpack\n{title}", "xlabel": "pages", "ylabel": "% of copy bandwidth", "series": pack,
         "hline": (80, "target 80%"), "logx": True},
    ]  # fmt: skip


if __name__ == "__main__":
    main()
