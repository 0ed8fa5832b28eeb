"""The mesh on one GPU against the in-process engine on the same GPU (issue 10): random-weight checkpoints of a
real DeepSeek shape (`moemesh make-checkpoint`, V2-Lite by default, BF16 and FP8), three ways of serving them —
in-process (`Engine.step()` as `LLM.generate` drives it), `moemesh up --topology colocated` and
`--topology pd` (P and D processes sharing the card, KV over UCX's CUDA transports) — at several concurrencies
and prompt lengths, greedy, ignore_eos.

Per case, three timed waves of `concurrency` requests, each metric the median of the waves': TTFT (client side,
mean over the wave), TPOT (mean over requests), output tokens/s over the wave, the TTFT
breakdown (`usage.ttft`: queue on D, prefill, the KV transfer's tail after P's forward, handoff, D's first
decode step), how many pd requests were prefilled remotely, the KV bytes per request and the rate of the
transfer's tail (bytes / tail: the whole transfer when the prompt is one step) against the device-to-device
copy bandwidth measured in the same run. Targets (issue 10): every pd request remote; pd TTFT <= 1.2x
colocated at concurrency 1 and <= 1.5x at 32; KV tail <= 10 % of TTFT; mesh TPOT <= 1.1x in-process;
colocated output throughput at 32 >= 0.95x in-process.

    python -m bench.bench_mesh_gpu                       # CUDA, the issue's grid (writes bench/results/mesh-gpu.*)
    python -m bench.bench_mesh_gpu --device cpu --shape tiny --layers 2 --concurrency 1,2 \\
        --prompt-tokens 40 --new-tokens 4 --dtypes bf16  # the reduced CPU form (mesh-gpu-cpu.*)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.harness import copy_bandwidth_gbs, header, print_table, save_plot, write_json

ROOT = Path(__file__).resolve().parent.parent
SPANS = ("queue_ms", "prefill_ms", "kv_transfer_ms", "handoff_ms", "first_decode_step_ms")
LOCAL_PREFILL_TOKENS = 16


WAVES = 3  # timed waves per case; each metric is their median


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)  # distinct random ids: no prefix-cache hits between requests
    return [[rng.randrange(1, 4096) for _ in range(length)] for _ in range(count)]


def summarize(times: list[list[float]], wall_s: float, ttfts: list) -> dict:
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1]
    out = {"ttft_ms": 1000 * statistics.mean(t[0] for t in times), "tpot_ms": 1000 * statistics.mean(tpot),
           "out_tok_s": sum(len(t) for t in times) / wall_s, "wall_s": wall_s}  # fmt: skip
    if ttfts:
        out["ttft_breakdown_ms"] = {s: statistics.mean(getattr(t, s) for t in ttfts) for s in SPANS}
        out["remote_prefills"] = sum(t.remote_prefill for t in ttfts)
        out["requests"] = len(ttfts)
    return out


def run_in_process(llm, work: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    from moemesh import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    waves = []
    for i in range(0, len(work), concurrency):
        start = time.monotonic()
        ids = [llm.engine.add_request(p, params) for p in work[i : i + concurrency]]
        times: dict[str, list[float]] = {r: [] for r in ids}
        done = 0
        while done < len(ids):
            for out in llm.engine.step():
                times[out.request_id] += [time.monotonic() - start] * len(out.new_token_ids)
                done += out.finished
        waves.append(summarize(list(times.values()), time.monotonic() - start, []))
    return _mean(waves)


def run_mesh(address: str, work: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    from moemesh.sdk import AsyncClient

    async def stream(client, prompt, start, ttfts) -> list[float]:
        times: list[float] = []
        async for chunk in client.generate(
            token_ids=prompt, max_tokens=new_tokens, temperature=0, ignore_eos=True
        ):
            times += [time.monotonic() - start] * len(chunk.token_ids)
            if chunk.usage is not None and chunk.usage.ttft is not None:
                ttfts.append(chunk.usage.ttft)
        return times

    async def body() -> dict:
        waves = []
        async with AsyncClient(address, timeout_s=600) as client:
            for i in range(0, len(work), concurrency):
                start, ttfts = time.monotonic(), []
                times = await asyncio.gather(
                    *(stream(client, p, start, ttfts) for p in work[i : i + concurrency])
                )
                waves.append(summarize(times, time.monotonic() - start, ttfts))
        return _mean(waves)

    return asyncio.run(body())


def _mean(waves: list[dict]) -> dict:
    """Each metric's median over the waves (three per case: one wave stalled by something else on the box
    moves a mean, not a median), with the number of waves."""
    out = {k: statistics.median(w[k] for w in waves) for k in ("ttft_ms", "tpot_ms", "out_tok_s", "wall_s")}
    out["waves"] = len(waves)
    if "ttft_breakdown_ms" in waves[0]:
        out["ttft_breakdown_ms"] = {
            s: statistics.median(w["ttft_breakdown_ms"][s] for w in waves) for s in SPANS
        }
        out["remote_prefills"] = sum(w["remote_prefills"] for w in waves)
        out["requests"] = sum(w["requests"] for w in waves)
    return out


class Mesh:
    """`moemesh up` as a child, with no MOEMESH_* / UCX_* variable: what a user gets."""

    def __init__(self, model: Path, topology: str, device: str) -> None:
        from moemesh.supervisor import free_ports

        port, http_port = free_ports(2)
        self.address = f"127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEMESH_", "UCX_"))}
        argv = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--topology", topology,
                "--device", device, "--port", str(port), "--http-port", str(http_port)]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=ROOT, bufsize=1)  # fmt: skip
        self.lines: list[str] = []
        self.workers: dict[str, str] = {}
        ready = threading.Event()

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip())
                if m := re.match(r"started (\S+) pid=\d+ on (\S+)", line):
                    self.workers[m[1]] = m[2]
                if line.startswith("ready on"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 600
        while not ready.wait(0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mesh did not start:\n" + "\n".join(self.lines[-60:]))

    def fallbacks(self) -> int:
        import grpc

        from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc

        total = 0
        for name, address in self.workers.items():
            if name.startswith(("decode", "colocated")):
                with grpc.insecure_channel(address) as channel:
                    load = worker_pb2_grpc.DecodeWorkerStub(channel).GetLoad(
                        worker_pb2.GetLoadRequest(), timeout=10
                    )
                    total += load.num_prefill_fallbacks
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def kv_bytes_per_token(model: Path) -> int:
    from moemesh.model.config import ModelConfig

    c = ModelConfig.from_file(model / "config.json")
    return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2  # bf16 latent cache, every layer


def bench_model(model: Path, label: str, args, cases) -> list[dict]:
    from moemesh import LLM

    rows = []
    work = {(n, c): prompts(WAVES * c, n, seed=n + c) for n, c in cases}  # WAVES timed waves of c requests
    # Warm-up: one short prompt, and with --warm-up cases one untimed wave of every case (other prompts, 4 new
    # tokens): the first wave of a shape otherwise pays Triton compiles (or cache loads) that only it meets —
    # issue 10's first run showed in-process 512 x8 at 283 ms TTFT against 116 ms at x32.
    warm = [(prompts(c, n, seed=n + c + 10_000), c) for n, c in cases] if args.warm_up == "cases" else []
    if "in-process" in args.modes:
        llm = LLM(model, device=args.device)
        run_in_process(llm, prompts(1, 32, 0), 4, 1)  # warm-up
        for w, c in warm:
            run_in_process(llm, w, 4, c)
        for n, c in cases:
            rows.append({"model": label, "mode": "in-process", "prompt_tokens": n, "concurrency": c,
                         **run_in_process(llm, work[n, c], args.new_tokens, c)})  # fmt: skip
            print(rows[-1], flush=True)
        del llm
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for topology in [m for m in args.modes if m != "in-process"]:
        mesh = Mesh(model, topology, args.device)
        try:
            run_mesh(mesh.address, prompts(1, 32, 1), 4, 1)  # warm-up (graphs, kernels, UCX endpoints)
            for w, c in warm:
                run_mesh(mesh.address, w, 4, c)
            for n, c in cases:
                row = {"model": label, "mode": topology, "prompt_tokens": n, "concurrency": c,
                       **run_mesh(mesh.address, work[n, c], args.new_tokens, c)}  # fmt: skip
                row["kv_bytes_per_request"] = n * kv_bytes_per_token(model) if topology == "pd" else 0
                tail_ms = row["ttft_breakdown_ms"]["kv_transfer_ms"]
                row["kv_tail_gbs"] = row["kv_bytes_per_request"] / tail_ms / 1e6 if tail_ms > 0 else 0.0
                row["kv_tail_share_of_ttft"] = tail_ms / row["ttft_ms"]
                rows.append(row)
                print(row, flush=True)
            rows[-1]["prefill_fallbacks"] = mesh.fallbacks()
        finally:
            mesh.stop()
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    def get(model, mode, n, c):
        return next((r for r in rows if (r["model"], r["mode"], r["prompt_tokens"], r["concurrency"]) == (model, mode, n, c)), None)  # fmt: skip

    out = []
    for r in rows:
        if r["mode"] != "pd":
            continue
        key = (r["model"], r["prompt_tokens"], r["concurrency"])
        co, local = get(r["model"], "colocated", *key[1:]), get(r["model"], "in-process", *key[1:])
        parts = [f"{key}: remote {r['remote_prefills']}/{r['requests']}",
                 f"KV tail {100 * r['kv_tail_share_of_ttft']:.1f} % of TTFT (<= 10 %)"]  # fmt: skip
        if co:
            limit = 1.2 if r["concurrency"] == 1 else 1.5
            parts.append(f"pd/colocated TTFT {r['ttft_ms'] / co['ttft_ms']:.2f}x (<= {limit}x)")
        if local:
            parts.append(f"pd TPOT / in-process {r['tpot_ms'] / local['tpot_ms']:.2f}x (<= 1.1x)")
            if co:
                parts.append(
                    f"colocated tok/s / in-process {co['out_tok_s'] / local['out_tok_s']:.2f}x (>= 0.95x at 32)"
                )
        out.append("; ".join(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="v2-lite")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtypes", default="bf16,fp8", help="checkpoints to make: bf16 and/or fp8")
    parser.add_argument("--models", default="", help="existing checkpoint dirs instead (label=DIR,...)")
    parser.add_argument("--modes", default="in-process,colocated,pd")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--prompt-tokens", default="512,4096")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warm-up", default="cases", choices=("cases", "short"),
                        help="cases: an untimed wave of every case first; short: one 32-token prompt only")  # fmt: skip
    parser.add_argument("--work", default="", help="where checkpoints are made (default: a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    cases = [(int(n), int(c)) for n in args.prompt_tokens.split(",") for c in args.concurrency.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    from moemesh.make_checkpoint import shape_config, write_random_checkpoint

    work_dir = Path(args.work or tempfile.mkdtemp(prefix="moemesh-bench-"))
    models = {}
    if args.models:
        models = {item.split("=")[0]: Path(item.split("=")[1]) for item in args.models.split(",")}
    else:
        for dtype in args.dtypes.split(","):
            out = work_dir / f"{args.shape}-{args.layers}-{dtype}"
            if not (out / "config.json").is_file():
                write_random_checkpoint(shape_config(args.shape, args.layers), out, fp8=dtype == "fp8",
                                        device=args.device)  # fmt: skip
            models[f"{args.shape}-{args.layers}L-{dtype}"] = out
    copy_gbs = copy_bandwidth_gbs(1 << 30) if args.device == "cuda" else None
    name = "mesh-gpu" if args.device == "cuda" else "mesh-gpu-cpu"
    rows: list[dict] = []
    for label, path in models.items():  # the JSON so far after each model: a run cut short keeps its results
        rows += bench_model(path, label, args, cases)
        write_json(
            name, {**header(), "partial": True, "copy_bandwidth_gbs": copy_gbs, "rows": rows}, args.out
        )
    columns = ["model", "mode", "prompt_tokens", "concurrency", "ttft_ms", "tpot_ms", "out_tok_s",
               "remote_prefills", "kv_bytes_per_request", "kv_tail_gbs", "kv_tail_share_of_ttft"]  # fmt: skip
    print_table(rows, columns)
    for r in rows:
        if "ttft_breakdown_ms" in r:
            spans = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in r["ttft_breakdown_ms"].items())
            print(
                f"{r['model']} {r['mode']} {r['prompt_tokens']} tok x{r['concurrency']}: TTFT spans (ms) {spans}"
            )
    lines = verdicts(rows)
    print("\n".join(lines))
    print(f"device-to-device copy bandwidth: {copy_gbs} GB/s (read + write)")
    payload = {**header(), "shape": args.shape, "layers": args.layers, "new_tokens": args.new_tokens,
               "warm_up": args.warm_up, "copy_bandwidth_gbs": copy_gbs, "rows": rows, "verdicts": lines}  # fmt: skip
    print("wrote", write_json(name, payload, args.out))
    panels = []
    for label in models:
        for n in sorted({n for n, _ in cases}):
            series = {}
            for mode in args.modes:
                pts = [(r["concurrency"], r["ttft_ms"]) for r in rows
                       if (r["model"], r["mode"], r["prompt_tokens"]) == (label, mode, n)]  # fmt: skip
                series[mode] = ([x for x, _ in pts], [y for _, y in pts])
            panels.append({"title": f"TTFT, {label}, {n}-token prompts", "xlabel": "concurrency",
                           "ylabel": "ms", "series": series, "logx": True})  # fmt: skip
    save_plot(name, panels, args.out)


if __name__ == "__main__":
    main()
