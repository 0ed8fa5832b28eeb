"""Load: N concurrent greedy streams (default 500) against a CPU mesh on the demo model (float32), each checked
against its own prompt sent alone through the same mesh; latency percentiles; every process's memory before
and after; what the gateway says once its in-flight limit is full.

    python -m bench.bench_load [--streams 500] [--distinct 50] [--max-tokens 24] [--topology pd]

Writes bench/results/load-cpu.json and .png (card, date, commit). The peer is the same prompts sent one at a
time (the single-request latency); the ratio is p50 latency under load over that.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.sdk import AsyncClient, Overloaded


@dataclass
class Wave:
    """What a wave of concurrent streams got back, in request order; refused: Overloaded messages."""

    tokens: list[list[int] | None] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def make_work(num_streams: int, num_distinct: int, vocab_size: int, seed: int = 7) -> list[list[int]]:
    """`num_streams` prompts (4..40 tokens) drawn from `num_distinct` distinct ones, in shuffled order."""
    rng = random.Random(seed)
    distinct = [
        [rng.randrange(1, vocab_size) for _ in range(rng.randrange(4, 41))] for _ in range(num_distinct)
    ]
    work = [distinct[i % num_distinct] for i in range(num_streams)]
    rng.shuffle(work)
    return work


async def _one(client: AsyncClient, ids: list[int], max_tokens: int, wave: Wave, index: int) -> None:
    start = time.monotonic()
    tokens: list[int] = []
    try:
        async for chunk in client.generate(
            token_ids=ids, max_tokens=max_tokens, temperature=0, ignore_eos=True
        ):
            if not tokens and chunk.token_ids:
                wave.ttft_s[index] = time.monotonic() - start
            tokens += chunk.token_ids
    except Overloaded as err:
        wave.refused.append(str(err))
        return
    wave.tokens[index] = tokens
    wave.latency_s[index] = time.monotonic() - start


async def run_wave(address: str, work: list[list[int]], max_tokens: int, timeout_s: float = 300.0) -> Wave:
    """All of `work` at once, over one channel; a stream refused with RESOURCE_EXHAUSTED is recorded, any
    other error raises."""
    wave = Wave([None] * len(work), [0.0] * len(work), [0.0] * len(work))
    start = time.monotonic()
    async with AsyncClient(address, timeout_s=timeout_s) as client:
        await asyncio.gather(*(_one(client, ids, max_tokens, wave, i) for i, ids in enumerate(work)))
    wave.wall_s = time.monotonic() - start
    return wave


async def run_alone(address: str, prompts: list[list[int]], max_tokens: int) -> tuple[dict, list[float]]:
    """Each distinct prompt sent alone: {tuple(prompt): tokens}, and each one's latency."""
    alone: dict[tuple[int, ...], list[int]] = {}
    latencies = []
    async with AsyncClient(address, timeout_s=120) as client:
        for ids in prompts:
            start = time.monotonic()
            done = await client.complete(token_ids=ids, max_tokens=max_tokens, temperature=0, ignore_eos=True)
            latencies.append(time.monotonic() - start)
            alone[tuple(ids)] = done.token_ids
    return alone, latencies


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(args: argparse.Namespace) -> tuple[dict, Wave, float]:
    """One mesh: the distinct prompts alone, then the wave, then the wave plus 20 over the gateway's limit.
    Returns the result record, the wave and the median latency alone."""
    from bench.harness import header
    from tests.integration.mesh_tiny import TINY_ENV, start_mesh

    knobs = {**TINY_ENV, "MOEMESH_PAGE_SIZE": "16", "MOEMESH_NUM_KV_PAGES": "4096", "MOEMESH_MAX_NUM_SEQS": "128",
             "MOEMESH_MAX_NUM_BATCHED_TOKENS": "1024", "MOEMESH_KV_CHECKSUM": "0",
             "MOEMESH_MAX_INFLIGHT": str(args.streams)}  # fmt: skip
    mesh = start_mesh("demo", args.topology, knobs=knobs, timeout_s=300)
    try:
        work = make_work(args.streams, args.distinct, vocab_size=4096)
        distinct = list({tuple(w): w for w in work}.values())
        alone, alone_s = asyncio.run(run_alone(mesh.address, distinct, args.max_tokens))
        rss_before = {name: rss_bytes(pid) for name, pid in mesh.pids.items()}
        wave = asyncio.run(run_wave(mesh.address, work, args.max_tokens))
        rss_after = {name: rss_bytes(pid) for name, pid in mesh.pids.items()}
        over = asyncio.run(run_wave(mesh.address, work + work[:20], args.max_tokens))
        leaked = mesh.wait_settled()
    finally:
        mesh.stop()
    mismatched = sum(got != alone[tuple(ids)] for ids, got in zip(work, wave.tokens, strict=True))
    p50, p99 = percentile(wave.latency_s, 50), percentile(wave.latency_s, 99)
    result = {
        "name": "load",
        **header(),
        "config": {**vars(args), "model": "demo (float32)", "max_inflight": args.streams},
        "metrics": {
            "streams": args.streams, "completed": sum(t is not None for t in wave.tokens), "mismatched": mismatched,
            "refused": len(wave.refused), "wall_s": wave.wall_s,
            "p50_latency_s": p50, "p99_latency_s": p99,
            "p50_ttft_s": percentile(wave.ttft_s, 50), "p99_ttft_s": percentile(wave.ttft_s, 99),
            "output_tokens_per_s": args.streams * args.max_tokens / wave.wall_s,
            "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
            "over_limit_refused": len(over.refused), "over_limit_message": over.refused[0] if over.refused else "",
            "leaked_pages": leaked,
        },
        "peer": {"name": "each distinct prompt sent alone", "median_latency_s": statistics.median(alone_s)},
        "ratio": p50 / statistics.median(alone_s),
    }  # fmt: skip
    return result, wave, statistics.median(alone_s)


def main(argv: list[str] | None = None) -> int:
    from bench.harness import write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--distinct", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--topology", default="pd", choices=("pd", "colocated"))
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    result, wave, alone_s = measure(args)
    path = write_json("load-cpu", result, args.out_dir)
    _plot(wave, alone_s, path.with_suffix(".png"))
    m = result["metrics"]
    mismatched, p50, p99 = m["mismatched"], m["p50_latency_s"], m["p99_latency_s"]
    leaked = m["leaked_pages"]
    print(f"{m['completed']}/{args.streams} streams, {mismatched} differ from alone; p50 {p50:.2f} s, p99 {p99:.2f} s "
          f"(alone {alone_s:.3f} s); {m['over_limit_refused']} refused over the limit; "
          f"leaked pages {leaked}; wrote {path}")  # fmt: skip
    return 0 if mismatched == 0 and m["completed"] == args.streams else 1


def _plot(wave: Wave, alone_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(wave.latency_s, bins=40, label=f"{len(wave.latency_s)} concurrent streams")
    ax.axvline(alone_s, color="k", linestyle="--", label=f"one stream alone ({alone_s:.3f} s)")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("streams")
    ax.set_title("CPU demo mesh under load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
