"""The expert wire at DeepSeek-V2-Lite shapes (random BF16 weights; 64 routed experts, top-6, hidden 2048, expert
intermediate 1408): one MoE layer's dispatch + combine through an expert-pool worker in another process on the
same GPU, against the local MoE compute of the same tokens, at 1, 64 and 512 tokens, in one run.

* local: `LocalExperts.forward` (grouped GEMM) in this process — what a colocated worker spends on the layer;
* remote: `RemoteExperts` round trip — encode the tokens (BF16 or FP8 1x128), UCX to the expert process, its
  `LocalExperts.slot_outputs` over all 64 experts, the BF16 rows back, the combine; wall time on the host,
  median of `--iters` calls (the engine waits for exactly this in a step);
* wire: remote - local, the price of the disaggregation per layer.
Wires: `device` (the buffers stay in GPU memory; UCX picks cuda_ipc between the two processes) and `host`
(staged through host memory) — each with its own expert process; a wire that fails is recorded with its
error, the other still runs.

    python -m bench.bench_expert                       # the GPU run: JSON + PNG under bench/results/
    python -m bench.bench_expert --device cpu --wires host --tokens 1,8 --iters 5 --small   # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bench.harness import header, print_table, save_plot, write_json

V2_LITE_MOE = dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6)
SMALL_MOE = dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2)
LAYER = 1
ROOT = Path(__file__).resolve().parents[1]


def moe_config(shape: dict):
    from moemesh.model.config import ModelConfig

    return ModelConfig.from_dict({
        "model_type": "deepseek_v2", "vocab_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 2,
        "num_attention_heads": 16, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "first_k_dense_replace": 1, **shape,
    })  # fmt: skip


def build_experts(shape: dict, device: str):
    """The layer's 64 routed experts with seeded random weights (the same in both processes)."""
    from moemesh.model.moe import LocalExperts

    gen = torch.Generator().manual_seed(0)
    experts = LocalExperts(shape["n_routed_experts"], shape["hidden_size"], shape["moe_intermediate_size"])
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return experts.to(device=device, dtype=torch.bfloat16).requires_grad_(False)


def ucx_options(device: str):
    """One set per process (UCX runs once): on a GPU machine UCX picks its transports (cuda_ipc for device
    buffers, shared memory for host ones); on a CPU box TCP over loopback."""
    from moemesh.transport.ucx import UcxOptions

    if device.startswith("cuda"):
        return UcxOptions("", "", progress_mode="thread", notifier_thread=True)
    return UcxOptions("tcp,self", "lo", progress_mode="thread", notifier_thread=True)


# ------------------------------------------------------------------------------------------ the expert process


async def serve(args: argparse.Namespace) -> None:
    from moemesh.model.expert_shard import ExpertShard
    from moemesh.services.expert.worker import ExpertWorker
    from moemesh.transport.expert_server import UcxExpertServer

    shape = SMALL_MOE if args.small else V2_LITE_MOE
    device = torch.device(args.device)
    config = moe_config(shape)
    shard = ExpertShard(
        config, tuple(range(config.n_routed_experts)), {LAYER: build_experts(shape, args.device)}
    )
    worker = ExpertWorker("bench-expert", shard, device, torch.bfloat16)
    wire_device = device if args.wire == "device" else torch.device("cpu")
    server = UcxExpertServer(worker.compute, options=ucx_options(args.device), wire_device=wire_device)
    print("address", await server.start(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until the parent is done
    await server.close()
    worker.close()


# ------------------------------------------------------------------------------------------ the decode side


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn, device: str, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def routing(num_tokens: int, shape: dict, device: str):
    gen = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, shape["hidden_size"], generator=gen).to(device, torch.bfloat16)
    logits = torch.randn(num_tokens, shape["n_routed_experts"], generator=gen)
    weights, ids = logits.softmax(-1).topk(shape["num_experts_per_tok"], dim=-1)
    return hidden, ids.to(device), weights.to(device)


def start_expert(args: argparse.Namespace, wire: str) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "bench.bench_expert", "--serve", "--wire", wire, "--device", args.device]
    if args.small:
        argv.append("--small")
    child = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "UCXPY_PROGRESS_MODE": "thread"})  # fmt: skip
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("address "):
            return child, line.split()[1]
    raise RuntimeError(f"the expert process ({wire}) exited with {child.wait()} before listening")


def measure_wire(args: argparse.Namespace, wire: str, local_ms: dict[int, float]) -> list[dict]:
    from moemesh.services.remote_experts import token_encoder
    from moemesh.transport.expert_client import PoolWorker, RemoteExperts, RemoteExpertsOptions

    shape = SMALL_MOE if args.small else V2_LITE_MOE
    child, address = start_expert(args, wire)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    rows = []
    try:
        for fmt in args.formats.split(","):
            remote = RemoteExperts([LAYER], shape["n_routed_experts"], token_encoder(fmt),
                                   RemoteExpertsOptions(fmt, timeout_s=60.0), ucx_options(args.device),
                                   wire_device=args.device if wire == "device" else "cpu")  # fmt: skip
            asyncio.run_coroutine_threadsafe(remote.start(), loop).result()
            remote.add_worker(
                PoolWorker("bench-expert", address, {LAYER: tuple(range(shape["n_routed_experts"]))})
            )
            for tokens in args.token_counts:
                hidden, ids, weights = routing(tokens, shape, args.device)
                ms = timed_ms(
                    lambda h=hidden, i=ids, w=weights, r=remote: r(LAYER, h, i, w), args.device, args.iters
                )
                rows.append({"wire": wire, "format": fmt, "tokens": tokens, "local_ms": local_ms[tokens],
                             "remote_ms": ms, "wire_ms": ms - local_ms[tokens],
                             "ratio": ms / local_ms[tokens]})  # fmt: skip
                print_table(rows[-1:], list(rows[-1]))
            asyncio.run_coroutine_threadsafe(remote.close(), loop).result(timeout=30)
    finally:
        with contextlib.suppress(Exception):
            child.stdin.write("\n")
            child.stdin.flush()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", default="1,64,512")
    p.add_argument("--formats", default="bf16,fp8")
    p.add_argument("--wires", default="device,host")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--wire", default="host", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    args.token_counts = [int(t) for t in args.tokens.split(",")]
    shape = SMALL_MOE if args.small else V2_LITE_MOE
    experts = build_experts(shape, args.device)
    local_ms = {}
    for tokens in args.token_counts:
        hidden, ids, weights = routing(tokens, shape, args.device)
        with torch.no_grad():
            local_ms[tokens] = timed_ms(lambda h=hidden, i=ids, w=weights: experts(LAYER, h, i, w), args.device,
                                        args.iters)  # fmt: skip
    rows, failures = [], {}
    for wire in args.wires.split(","):
        try:
            rows += measure_wire(args, wire, local_ms)
        except Exception as err:  # record it; the other wire still runs
            failures[wire] = f"{type(err).__name__}: {err}"
            print(f"wire {wire} failed: {failures[wire]}")
    meta = header()
    name = "bench_expert-" + meta["card"].replace(" ", "_")
    payload = {**meta, "shape": shape, "layer": "one MoE layer, all experts in one expert process",
               "local_ms": local_ms, "rows": rows, "failures": failures}  # fmt: skip
    print(f"wrote {write_json(name, payload, args.out)}")
    print_table(rows, ["wire", "format", "tokens", "local_ms", "remote_ms", "wire_ms", "ratio"])
    series = {f"{w}/{f}": ([r["tokens"] for r in rows if (r["wire"], r["format"]) == (w, f)],
                           [r["remote_ms"] for r in rows if (r["wire"], r["format"]) == (w, f)])
              for w, f in sorted({(r["wire"], r["format"]) for r in rows})}  # fmt: skip
    series["local MoE compute"] = (args.token_counts, [local_ms[t] for t in args.token_counts])
    save_plot(name, [{"title": f"MoE layer dispatch+combine vs local ({meta['card']}, {meta['commit']})",
                      "xlabel": "tokens", "ylabel": "ms per layer", "series": series, "logx": True}],
              args.out)  # fmt: skip


if __name__ == "__main__":
    main()
