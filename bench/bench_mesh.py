"""Time per output token through the pd mesh (`moemesh up --topology pd`: gateway, one prefill and one decode
process, gRPC + UCX over loopback) against the same engine in this process (`Engine.step()` as `LLM.generate`
drives it), on the demo model, CPU, at concurrency 1 and 32. Target (issue 6): mesh <= 1.3x in-process at 32.

* the work: prompts cut from the held-out corpus text (32 tokens each), 64 and 200 new tokens each, greedy,
  ignore_eos; concurrency C = C requests started together (C=1: 4 requests one after another). With 64 new
  tokens a wave's prefills (on P, while D already decodes the first requests) are a larger share of it.
* every case runs `--repeats` times (default 3) and the run with the median TPOT counts;
* both sides run with 1 and with all torch threads (per worker process on the mesh side; `moemesh up`'s
  default on CPU is the cores split among the workers: 1 each for P and D on 2 cores), the faster counts.
* TPOT of a request: (time of its last token - time of its first token) / (tokens - 1); the table gives the
  mean over requests, plus TTFT and the wall time of the whole batch. The mesh side measures at the client
  (SDK), so it includes the gateway's detokenization and two gRPC hops per token.
* TTFT breakdown of the mesh: the mean of each request's `usage.ttft` spans (queue on D, prefill on P, the
  KV transfer's tail after P's forward, the handoff, D's first decode step), next to TTFT at the client.

    python -m bench.bench_mesh [--model demo|DIR] [--new-tokens 64,200] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import time
from pathlib import Path

import torch

from bench.harness import header, print_table, save_plot, write_json

CONCURRENCY = (1, 32)
PROMPT_TOKENS = 32
TARGET_RATIO_AT_32 = 1.3
ROOT = Path(__file__).resolve().parent.parent


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    ids = tokenizer.encode((ROOT / "models" / "demo" / "corpus" / "heldout.txt").read_text()[:200_000])
    step = len(ids) // (count + 1)
    return [ids[i * step : i * step + PROMPT_TOKENS] for i in range(count)]


def summarize(times: list[list[float]], start: float, end: float) -> dict:
    """times[r]: when each token of request r arrived."""
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1]
    return {
        "tpot_ms": 1000 * statistics.mean(tpot),
        "ttft_ms": 1000 * statistics.mean(t[0] for t in times),  # from the batch's start
        "wall_s": end - start,
        "tokens": sum(len(t) for t in times),
    }


def run_in_process(llm, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    from moemesh import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine = llm.engine
    results = []
    for wave in range(0, len(prompts), concurrency):
        batch = prompts[wave : wave + concurrency]
        start = time.monotonic()
        ids = [engine.add_request(p, params) for p in batch]
        times: dict[str, list[float]] = {i: [] for i in ids}
        done = 0
        while done < len(ids):
            for out in engine.step():
                now = time.monotonic() - start
                times[out.request_id] += [now] * len(out.new_token_ids)
                done += out.finished
        results.append(summarize(list(times.values()), 0.0, time.monotonic() - start))
    return _merge(results)


TTFT_SPANS = ("queue_ms", "prefill_ms", "kv_transfer_ms", "handoff_ms", "first_decode_step_ms")


async def _stream(client, prompt: list[int], new_tokens: int, start: float, ttfts: list) -> list[float]:
    times: list[float] = []
    async for chunk in client.generate(
        token_ids=prompt, max_tokens=new_tokens, temperature=0, ignore_eos=True
    ):
        times += [time.monotonic() - start] * len(chunk.token_ids)
        if chunk.usage is not None and chunk.usage.ttft is not None:
            ttfts.append(chunk.usage.ttft)
    return times


def run_mesh(address: str, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    from moemesh.sdk import AsyncClient

    async def body() -> dict:
        results, ttfts = [], []
        async with AsyncClient(address, timeout_s=600) as client:
            for wave in range(0, len(prompts), concurrency):
                batch = prompts[wave : wave + concurrency]
                start = time.monotonic()
                times = await asyncio.gather(*(_stream(client, p, new_tokens, start, ttfts) for p in batch))
                results.append(summarize(times, 0.0, time.monotonic() - start))
        merged = _merge(results)
        merged["ttft_breakdown_ms"] = {
            span: statistics.mean(getattr(t, span) for t in ttfts) for span in TTFT_SPANS
        }
        merged["remote_prefills"] = sum(t.remote_prefill for t in ttfts)
        return merged

    return asyncio.run(body())


def median_run(run, repeats: int) -> dict:
    """The run with the median TPOT of `repeats` (this box is shared: single runs vary by 10-20 %), with every
    run's TPOT beside it."""
    results = sorted((run() for _ in range(repeats)), key=lambda r: r["tpot_ms"])
    return {**results[len(results) // 2], "tpot_ms_runs": [r["tpot_ms"] for r in results]}


def _merge(results: list[dict]) -> dict:
    return {
        "tpot_ms": statistics.mean(r["tpot_ms"] for r in results),
        "ttft_ms": statistics.mean(r["ttft_ms"] for r in results),
        "wall_s": sum(r["wall_s"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--new-tokens", default="64,200", help="comma-separated output lengths")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median TPOT counts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lengths = [int(n) for n in args.new_tokens.split(",")]

    from moemesh import LLM
    from tests.integration.mesh_tiny import start_mesh

    cases = [(n, c) for n in lengths for c in CONCURRENCY]
    llm = LLM(args.model, device="cpu")
    work = {c: make_prompts(llm.tokenizer, 4 if c == 1 else c) for c in CONCURRENCY}
    run_in_process(llm, work[1][:1], 4, 1)  # warm-up
    local, local_threads, by_threads = {}, {}, {}
    for n, c in cases:  # the peer at its best: torch on every core, or on one (less OpenMP spinning)
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            result = by_threads[n, c, threads] = median_run(
                functools.partial(run_in_process, llm, work[c], n, c), args.repeats
            )
            if (n, c) not in local or result["tpot_ms"] < local[n, c]["tpot_ms"]:
                local[n, c], local_threads[n, c] = result, threads
    del llm
    remote, remote_threads = {}, {}
    for threads in sorted({1, os.cpu_count() or 1}):  # `up`'s default on 2 cores is 1 per worker
        mesh = start_mesh(args.model, "pd", knobs={}, torch_threads=threads)  # otherwise the default knobs
        try:
            run_mesh(mesh.address, work[1][:1], 4, 1)  # warm-up (lazy inits)
            for n, c in cases:
                result = median_run(functools.partial(run_mesh, mesh.address, work[c], n, c), args.repeats)
                if (n, c) not in remote or result["tpot_ms"] < remote[n, c]["tpot_ms"]:
                    remote[n, c], remote_threads[n, c] = result, threads
        finally:
            mesh.stop()
    rows = []
    for n, c in cases:
        mine, peer, same = remote[n, c], local[n, c], by_threads[n, c, remote_threads[n, c]]
        rows.append({"new_tokens": n, "concurrency": c, "in_process_threads": local_threads[n, c],
                     "mesh_threads_per_worker": remote_threads[n, c],
                     "in_process_tpot_ms": peer["tpot_ms"], "mesh_tpot_ms": mine["tpot_ms"],
                     "ratio": mine["tpot_ms"] / peer["tpot_ms"],
                     "in_process_same_threads_tpot_ms": same["tpot_ms"],
                     "ratio_same_threads": mine["tpot_ms"] / same["tpot_ms"],
                     "in_process_ttft_ms": peer["ttft_ms"], "mesh_ttft_ms": mine["ttft_ms"],
                     "in_process_wall_s": peer["wall_s"], "mesh_wall_s": mine["wall_s"],
                     "in_process_tpot_ms_runs": peer["tpot_ms_runs"], "mesh_tpot_ms_runs": mine["tpot_ms_runs"],
                     "mesh_ttft_breakdown_ms": mine["ttft_breakdown_ms"],
                     "mesh_remote_prefills": mine["remote_prefills"]})  # fmt: skip
    print_table(rows, [k for k in rows[0] if k != "mesh_ttft_breakdown_ms" and not k.endswith("_runs")])
    for row in rows:
        spans = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in row["mesh_ttft_breakdown_ms"].items())
        print(f"mesh TTFT, {row['new_tokens']} new tokens, concurrency {row['concurrency']}: "
              f"{row['mesh_ttft_ms']:.1f} ms at the client; mean spans (ms): {spans}")  # fmt: skip
    for row in rows:
        if row["concurrency"] == 32:
            verdict = "meets" if row["ratio"] <= TARGET_RATIO_AT_32 else "misses"
            print(f"pd mesh / in-process TPOT at concurrency 32, {row['new_tokens']} new tokens: "
                  f"{row['ratio']:.2f}x ({verdict} the <= {TARGET_RATIO_AT_32}x target)")  # fmt: skip
    payload = {**header(), "model": args.model, "prompt_tokens": PROMPT_TOKENS, "new_tokens": lengths,
               "target_ratio_at_32": TARGET_RATIO_AT_32, "rows": rows}  # fmt: skip
    print("wrote", write_json("mesh-cpu", payload, args.out))
    xs = list(CONCURRENCY)

    def series(n: int, key: str) -> tuple[list[int], list[float]]:
        return xs, [next(r[key] for r in rows if r["new_tokens"] == n and r["concurrency"] == c) for c in xs]

    save_plot("mesh-cpu", [
        {"title": f"TPOT, {args.model} model, CPU", "xlabel": "concurrency", "ylabel": "ms per output token",
         "series": {**{f"in-process, {n} new": series(n, "in_process_tpot_ms") for n in lengths},
                    **{f"pd mesh (SDK client), {n} new": series(n, "mesh_tpot_ms") for n in lengths}},
         "logx": True},
        {"title": "mesh / best in-process", "xlabel": "concurrency", "ylabel": "TPOT ratio",
         "series": {f"{n} new tokens": series(n, "ratio") for n in lengths},
         "hline": (TARGET_RATIO_AT_32, "target at 32"), "logx": True},
    ], args.out)  # fmt: skip


if __name__ == "__main__":
    main()
