"""The expert wire at DeepSeek-V2-Lite shapes (random BF16 weights; 64 routed experts, top-6, hidden 2048, expert
intermediate 1408): one MoE layer's dispatch + combine through an expert-pool worker in another process on the
same GPU, against the local MoE compute of the same tokens, at 1, 64 and 512 tokens, in one run.

* local: the routed experts' part of the block in this process — what a colocated worker spends on the layer;
* remote: `RemoteExperts` round trip — encode the tokens (BF16 or FP8 1x128), UCX to the expert process, its
  expert rows over all 64 experts, the BF16 rows back, the combine; wall time on the host, median of `--iters`
  calls (the engine waits for exactly this in a step);
* wire: remote - local, the price of the disaggregation per layer.
Both on the block's `--path` (default: by device, as a worker picks it): `fused` (the CUDA default) — local
`moe_fused.expert_rows` (`moe_permute`, then the decode kernel `moe_grouped_gemm` or `torch._grouped_mm`, picked by
the layer's rows) and `moe_combine`; remote: the pool's unweighted rows of the same `expert_rows`, the same
`moe_combine` — or `torch` (the CPU default) — local `LocalExperts.forward` (one `torch._grouped_mm` on CUDA),
remote the pool's weighted rows summed per token.
Wires: `device` (the buffers stay in GPU memory; UCX picks cuda_ipc between the two processes) and `host`
(staged through host memory) — each with its own expert process, both driven from one event loop here (ucxx
binds its notifier to the first loop it serves); a wire that fails is recorded with its error, the other still
runs.

Where a round trip goes (`hops` in the JSON, table printed): both ends mark each batch's events
(transport/expert_hops.py: built, engine -> loop hop, sends, the expert's receive, compute, the answer, the
loop -> engine hop, combine) on the host's monotonic clock; per (wire, format, tokens) the median time of each
event since submit and the median step from the event before it.

    python -m bench.bench_expert                       # the GPU run: JSON + PNG under bench/results/
    python -m bench.bench_expert --device cpu --quick  # CPU: tiny shapes, 1 and 8 tokens, both wires, BF16
    python -m bench.bench_expert --progress polling    # the same with UCX progressed on the event loops
    python -m bench.bench_expert --path torch          # the torch path's rows (weighted, summed per token)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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


PROGRESS = ("thread", "thread-poll", "polling", "blocking")


def ucx_options(device: str, progress: str = "thread"):
    """One set per process (UCX runs once): the transports a worker on `device` runs by default — on a GPU
    `tcp,self,sm,cuda_copy,cuda_ipc` (cuda_ipc for device buffers, shared memory for host ones), on a CPU TCP —
    over loopback. (Before, a GPU run let UCX pick among all transports and devices, which a worker does not.)
    progress: "thread" = ucxx's progress thread + its notifier thread completing each request's future (what
    the workers run); "thread-poll" = the progress thread, futures polled from the event loop; "polling" /
    "blocking" = progress on the event loop."""
    from moemesh.config.mesh import CPU_UCX_TRANSPORTS, CUDA_UCX_TRANSPORTS
    from moemesh.transport.ucx import UcxOptions

    transports, devices = (CUDA_UCX_TRANSPORTS if device.startswith("cuda") else CPU_UCX_TRANSPORTS), "lo"
    mode = "thread" if progress.startswith("thread") else progress
    return UcxOptions(transports, devices, progress_mode=mode, notifier_thread=progress == "thread")


# ------------------------------------------------------------------------------------------ the expert process


async def serve(args: argparse.Namespace) -> None:
    from moemesh.model.expert_shard import ExpertShard
    from moemesh.services.expert.worker import ExpertWorker
    from moemesh.transport.expert_hops import HopLog
    from moemesh.transport.expert_server import UcxExpertServer
    from moemesh.transport.ucx import UcxRuntime

    shape = SMALL_MOE if args.small else V2_LITE_MOE
    device = torch.device(args.device)
    config = moe_config(shape)
    shard = ExpertShard(
        config, tuple(range(config.n_routed_experts)), {LAYER: build_experts(shape, args.device)}
    )
    worker = ExpertWorker("bench-expert", shard, device, torch.bfloat16)
    worker.hop_log = hops = HopLog()
    wire_device = device if args.wire == "device" else torch.device("cpu")
    server = UcxExpertServer(worker.compute, options=ucx_options(args.device, args.progress), wire_device=wire_device,
                             hop_log=hops)  # fmt: skip
    address = await server.start()  # its wire device: the host when UCX cannot move device memory
    print("address", address, server.wire_device.type, flush=True)
    loop = asyncio.get_running_loop()
    while (
        await loop.run_in_executor(None, sys.stdin.readline)
    ).strip() == "hops":  # until the parent is done
        print("hops", json.dumps(hops.export()), flush=True)
        hops.batches.clear()
    await server.close()
    worker.close()
    UcxRuntime.stop_notifier()  # else its thread keeps the process alive


# ------------------------------------------------------------------------------------------ the decode side


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn, device: str, iters: int, warmup: int = 5) -> float:
    """Median wall time of `fn` (ms), device synced after each call."""
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


PATHS = ("fused", "torch")


def layer_fn(path: str, experts_or_remote, shape: dict, hidden, ids, weights):
    """One call of the layer's routed experts on `path`: local (`LocalExperts`) or remote (`RemoteExperts`)."""
    from moemesh.kernels import moe_combine
    from moemesh.model.moe_fused import expert_rows
    from moemesh.transport.expert_client import RemoteExperts

    if path == "torch":
        return lambda: experts_or_remote(LAYER, hidden, ids, weights)
    num, rows = shape["n_routed_experts"], ids.numel()
    slot_rows = torch.arange(rows, dtype=torch.int32, device=hidden.device)
    if isinstance(experts_or_remote, RemoteExperts):

        def remote():
            y = experts_or_remote.submit(LAYER, hidden, ids, weights, unweighted=True).result()
            return moe_combine(y, weights, slot_rows)

        return remote
    return lambda: moe_combine(expert_rows(experts_or_remote, hidden, ids, rows, num), weights, slot_rows)


def routing(num_tokens: int, shape: dict, device: str):
    gen = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, shape["hidden_size"], generator=gen).to(device, torch.bfloat16)
    logits = torch.randn(num_tokens, shape["n_routed_experts"], generator=gen)
    weights, ids = logits.softmax(-1).topk(shape["num_experts_per_tok"], dim=-1)
    return hidden, ids.to(device), weights.to(device)


def start_expert(args: argparse.Namespace, wire: str) -> tuple[subprocess.Popen, str]:
    """The expert process for `wire`; -> (process, its UCX address)."""
    argv = [sys.executable, "-m", "bench.bench_expert", "--serve", "--wire", wire, "--device", args.device,
            "--progress", args.progress]  # fmt: skip
    if args.small:
        argv.append("--small")
    child = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "UCXPY_PROGRESS_MODE": ucx_options(args.device, args.progress).progress_mode})  # fmt: skip
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("address "):
            _, address, device = line.split()
            if wire == "device" and device != torch.device(args.device).type:
                stop_expert(child)
                raise RuntimeError(
                    f"the expert process cannot receive {args.device} memory over UCX (its log says why)"
                )
            return child, address
    raise RuntimeError(f"the expert process ({wire}) exited with {child.wait()} before listening")


def expert_marks(child: subprocess.Popen) -> dict[int, dict[str, int]]:
    """The expert process's hop marks since the last call (batch id -> event -> ns); it forgets them."""
    child.stdin.write("hops\n")
    child.stdin.flush()
    for line in child.stdout:
        if line.startswith("hops "):
            return {int(k): v for k, v in json.loads(line[5:]).items()}
    raise RuntimeError(f"the expert process exited with {child.wait()} before sending its hop marks")


def stop_expert(child: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        child.stdin.write("quit\n")
        child.stdin.flush()
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()


def measure_wire(
    args: argparse.Namespace, wire: str, local_ms: dict[int, float], local_out: dict[int, torch.Tensor], loop
) -> list[dict]:
    """One expert process for `wire`; one RemoteExperts per token format on `loop` (the bench's one event loop:
    ucxx completes every request on the loop it first served). -> rows with their hop timelines."""
    from moemesh.services.remote_experts import token_encoder
    from moemesh.transport.expert_client import RemoteExperts, RemoteExpertsOptions
    from moemesh.transport.expert_hops import HopLog, timeline_ms
    from moemesh.transport.expert_table import PoolWorker

    shape = SMALL_MOE if args.small else V2_LITE_MOE
    child, address = start_expert(args, wire)
    rows = []
    try:
        for fmt in args.formats.split(","):
            remote = RemoteExperts([LAYER], shape["n_routed_experts"], token_encoder(fmt),
                                   RemoteExpertsOptions(fmt, timeout_s=60.0), ucx_options(args.device, args.progress),
                                   wire_device=args.device if wire == "device" else "cpu")  # fmt: skip
            asyncio.run_coroutine_threadsafe(remote.start(), loop).result()
            if wire == "device" and remote.wire_device.type != torch.device(args.device).type:
                raise RuntimeError(f"UCX cannot send {args.device} memory here (the log above says why)")
            remote.add_worker(
                PoolWorker("bench-expert", address, {LAYER: tuple(range(shape["n_routed_experts"]))})
            )
            remote.hop_log = HopLog()
            timed_batches = []  # (row index, the client's marks of its timed calls)
            for tokens in args.token_counts:
                hidden, ids, weights = routing(tokens, shape, args.device)
                call = layer_fn(args.path, remote, shape, hidden, ids, weights)
                ms = timed_ms(call, args.device, args.iters, args.warmup)
                timed = sorted(remote.hop_log.batches)[-args.iters :]  # one batch per call: the timed ones
                # the layer's output against the local one (BF16 tokens: 0, the pool computes the same rows)
                diff = float((call().float() - local_out[tokens].float()).abs().max())
                rows.append({"wire": wire, "format": fmt, "path": args.path, "tokens": tokens,
                             "local_ms": local_ms[tokens],
                             "remote_ms": ms, "wire_ms": ms - local_ms[tokens],
                             "ratio": ms / local_ms[tokens], "max_abs_diff_vs_local": diff})  # fmt: skip
                timed_batches.append((len(rows) - 1, {b: remote.hop_log.batches[b] for b in timed}))
                print_table(rows[-1:], list(rows[-1]))
            asyncio.run_coroutine_threadsafe(remote.close(), loop).result(timeout=30)
            server = expert_marks(child)  # batch ids count from 1 in each RemoteExperts: join per format
            for index, client in timed_batches:
                rows[index]["hops"] = timeline_ms([{**client[b], **server.get(b, {})} for b in client])
    finally:
        stop_expert(child)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", default="1,64,512")
    p.add_argument("--formats", default="bf16,fp8")
    p.add_argument("--wires", default="device,host")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--progress", default="thread", choices=PROGRESS,
                   help="UCX progress on both ends (thread: the workers' setting)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--path", choices=PATHS, default=None,
                   help="the block's path (default: fused on CUDA, torch on CPU, as a worker picks it)")  # fmt: skip
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--quick", action="store_true",
                   help="a CPU-sized run: --small --tokens 1,8 --formats bf16 --iters 20 --warmup 3")  # fmt: skip
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--wire", default="host", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.small, args.tokens, args.formats, args.iters, args.warmup = True, "1,8", "bf16", 20, 3
    for name in ("iters", "warmup"):
        if getattr(args, name) < (1 if name == "iters" else 0):
            p.error(f"--{name}={getattr(args, name)} must be >= {1 if name == 'iters' else 0}")
    if args.path is None:
        args.path = "fused" if args.device.startswith("cuda") else "torch"
    bad = [w for w in args.wires.split(",") if w not in ("device", "host")]
    if bad:
        p.error(f"--wires={args.wires!r}: {bad} not among device, host")
    return args


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve(args))
        return None
    args.token_counts = [int(t) for t in args.tokens.split(",")]
    shape = SMALL_MOE if args.small else V2_LITE_MOE
    experts = build_experts(shape, args.device)
    local_ms, local_out = {}, {}
    for tokens in args.token_counts:
        hidden, ids, weights = routing(tokens, shape, args.device)
        call = layer_fn(args.path, experts, shape, hidden, ids, weights)
        with torch.no_grad():
            local_ms[tokens] = timed_ms(call, args.device, args.iters, args.warmup)
            local_out[tokens] = call()
    rows, failures = [], {}
    loop = asyncio.new_event_loop()  # one for every wire: ucxx serves one loop per process
    thread = threading.Thread(target=loop.run_forever, name="bench-loop", daemon=True)
    thread.start()
    try:
        for wire in args.wires.split(","):
            try:
                rows += measure_wire(args, wire, local_ms, local_out, loop)
            except Exception as err:  # record it; the other wire still runs
                failures[wire] = f"{type(err).__name__}: {err}"
                print(f"wire {wire} failed: {failures[wire]}")
    finally:
        from moemesh.transport.ucx import UcxRuntime

        UcxRuntime.stop_notifier()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    meta = header()
    name = "bench_expert-" + meta["card"].replace(" ", "_") + ("-quick" if args.quick else "")
    name += "" if args.progress == "thread" else f"-{args.progress}"
    name += "" if args.path == ("fused" if args.device.startswith("cuda") else "torch") else f"-{args.path}"
    payload = {**meta, "shape": shape, "layer": "one MoE layer, all experts in one expert process",
               "progress": args.progress, "path": args.path,
               "ucx_transports": ucx_options(args.device, args.progress).transports,
               "local_ms": local_ms, "rows": rows, "failures": failures}  # fmt: skip
    path = write_json(name, payload, args.out)
    for row in rows:
        print(
            f"\nwhere {row['wire']}/{row['format']} at {row['tokens']} tokens goes ({row['remote_ms']:.3f} ms):"
        )
        print_table(row.get("hops", []), ["event", "since_submit_ms", "step_ms"])
    print(f"wrote {path}")
    print_table(rows, ["wire", "format", "tokens", "local_ms", "remote_ms", "wire_ms", "ratio",
                       "max_abs_diff_vs_local"])  # fmt: skip
    series = {f"{w}/{f}": ([r["tokens"] for r in rows if (r["wire"], r["format"]) == (w, f)],
                           [r["remote_ms"] for r in rows if (r["wire"], r["format"]) == (w, f)])
              for w, f in sorted({(r["wire"], r["format"]) for r in rows})}  # fmt: skip
    series["local MoE compute"] = (args.token_counts, [local_ms[t] for t in args.token_counts])
    save_plot(name, [{"title": f"MoE layer dispatch+combine vs local, {args.path} path ({meta['card']}, "
                               f"{meta['commit']})",
                      "xlabel": "tokens", "ylabel": "ms per layer", "series": series, "logx": True}],
              args.out)  # fmt: skip
    return path


if __name__ == "__main__":
    main()
