"""`sample` at DeepSeek-V3's vocabulary (129280) vs the sort-based torch path (`sample.reference` on the GPU,
the usual top-k/top-p implementation) and vs the time to read the logits once at the copy bandwidth.

    python -m bench.bench_sample [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.harness import copy_bandwidth_gbs, header, median_ms, print_table, save_plot, write_json
from moemesh.kernels.sample import SamplingTensors, reference, sample

VOCAB = 129_280
MODES = {
    "greedy": dict(temperature=0.0),
    "temp": dict(temperature=0.8),
    "top_k50+top_p0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p0.95+min_p": dict(temperature=0.8, top_p=0.95, min_p=0.05),
    "top_p0.9": dict(temperature=0.8, top_p=0.9),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", default=None, help="render the PNG of a result JSON (no GPU needed)")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.out)
        return
    result = header()
    result["copy_gbs"] = copy_bandwidth_gbs()
    rows = []
    for batch in (1, 16, 64, 256):
        logits = torch.randn(batch, VOCAB, device="cuda") * 4
        counts = torch.zeros(batch, VOCAB, dtype=torch.int32, device="cuda")
        counts[:, :64] = 1
        for mode, kw in MODES.items():
            params = SamplingTensors.filled(batch, "cuda", seed=1, **kw)
            ours = median_ms(lambda p=params, lg=logits: sample(lg, p))
            pen = SamplingTensors.filled(batch, "cuda", seed=1, repetition_penalty=1.1, **kw)
            ours_pen = median_ms(lambda p=pen, lg=logits, c=counts: sample(lg, p, c))
            peer = median_ms(lambda p=params, lg=logits: reference(lg, p))
            floor_us = batch * VOCAB * 4 / result["copy_gbs"] / 1e3
            rows.append(
                dict(
                    batch=batch,
                    mode=mode,
                    ours_us=ours * 1e3,
                    ours_penalties_us=ours_pen * 1e3,
                    torch_sort_us=peer * 1e3,
                    speedup=peer / ours,
                    read_once_us=floor_us,
                )
            )
    result["rows"] = rows
    print_table(
        rows, ["batch", "mode", "ours_us", "ours_penalties_us", "torch_sort_us", "speedup", "read_once_us"]
    )
    print("wrote", write_json(f"sample-{_tag(result)}", result, args.out))
    plot(result, args.out)


def plot(result: dict, out_dir: str | None) -> None:
    rows = result["rows"]
    series = {}
    for mode in MODES:
        pts = [r for r in rows if r["mode"] == mode]
        series[f"ours {mode}"] = ([r["batch"] for r in pts], [r["ours_us"] for r in pts])
        series[f"torch sort {mode}"] = ([r["batch"] for r in pts], [r["torch_sort_us"] for r in pts])
    panel = dict(
        title=f"sample, V={VOCAB} ({result['card']})", xlabel="batch", ylabel="µs", series=series, logx=True
    )
    save_plot(f"sample-{_tag(result)}", [panel], out_dir)


def _tag(result: dict) -> str:
    return result["card"].replace(" ", "_")


if __name__ == "__main__":
    main()
