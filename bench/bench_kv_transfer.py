"""P -> D KV transfer over UCX (UcxKvSender -> UcxKvReceiver, two processes, one GPU each) against the NCCL
all-reduce bus bandwidth between the same two GPUs, measured in the same run. Target (issue 6): the best UCX
configuration moves >= 50 % of the NCCL bus bandwidth.

* the work: DeepSeek-V3 shapes: pages of 64 tokens x 576 bf16 (kv_lora_rank + qk_rope_head_dim, 72 KiB per page
  per layer), 61 layers; one prompt's KV (1k, 4k, 16k tokens) from P's contiguous `[layers, pages, 64, 576]`
  buffer (what pack_kv hands the sender) into shuffled pages of D's paged cache (PagedKvSink, as D runs it).
* swept: chunk size (one chunk per layer, as the prefill worker sends, or fewer pages per chunk; a chunk never
  spans layers: the chunk header names one layer) and sends in flight (1, 4, 16, all; a lane takes the next chunk
  when its previous send was acked).
* timed on P: first send to last ack. GB/s = payload bytes / time / 1e9, the median over repetitions, after a
  warm-up transfer. D poisons its cache (0xFF) before every transfer and checks every page byte afterwards
  against the same seeded generator P used, and that no other page changed: `verified` per row.
* the peer: torch.distributed all-reduce between two processes on the same two devices (NCCL on cuda, gloo on
  cpu), fp32, busbw = 2 (n-1)/n * bytes / time, the best over sizes, as nccl-tests reports it.
* UCX options as the workers run them (progress thread + notifier thread); on cuda UCX picks its transports
  (cuda_ipc over NVLink where it finds it), on cpu tcp over loopback. Each process sees every GPU with its own
  first (CUDA_VISIBLE_DEVICES rotated, as dask-cuda does), since ucxx makes its CUDA context on device 0.

    python -m bench.bench_kv_transfer --device cuda [--devices 0,1] [--out DIR]
    python -m bench.bench_kv_transfer --device cpu [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from bench.harness import header, print_table, save_plot, write_json
from bench.kv_transfer_child import (
    PAGE_BYTES,
    PAGE_SIZE,
    BusBandwidth,
    Connected,
    Landed,
    Listening,
    Quit,
    Ready,
    Sent,
    Setup,
    Trial,
    decode,
    encode,
)
from moemesh.supervisor import free_ports

TARGET_FRACTION = 0.5
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sweep:
    num_layers: int
    prompt_tokens: tuple[int, ...]
    chunk_pages: tuple[int, ...]  # pages per send; 0 = one chunk per layer
    inflight: tuple[int, ...]  # sends in flight; 0 = all
    reps: int
    allreduce_bytes: tuple[int, ...]
    allreduce_iters: int


SWEEPS = {
    "cuda": Sweep(61, (1024, 4096, 16384), (0, 16, 64), (1, 4, 16, 0), 3,
                  tuple(1 << s for s in range(20, 29, 2)), 20),  # 1 MiB .. 256 MiB
    "cpu": Sweep(61, (1024, 4096), (0, 16), (1, 4, 16, 0), 2, (1 << 20, 4 << 20, 16 << 20), 5),
    "quick": Sweep(4, (512,), (0, 2), (0,), 1, (1 << 16, 1 << 20), 3),
}  # fmt: skip


# --- the bench: spawns the children, drives them, reports -------------------------------------------------


class Child:
    """A child process speaking the line protocol; every read has a timeout, stop() always ends it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.name = argv[argv.index("--role") + 1]
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.kv_transfer_child", *argv], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):  # UCX may print its own lines
                self.lines.put(line)
        self.lines.put(None)

    def tell(self, msg) -> None:
        self.proc.stdin.write(encode(msg) + "\n")
        self.proc.stdin.flush()

    def expect(self, cls, timeout_s: float):
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no {cls.__name__} within {timeout_s} s") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited with {self.proc.wait(5)} before saying {cls.__name__}")
        msg = decode(line)
        if not isinstance(msg, cls):
            raise RuntimeError(f"{self.name} said {msg}, expected a {cls.__name__}")
        return msg

    def stop(self, timeout_s: float = 20.0) -> int:
        """Asks it to quit (stdin EOF), kills it if it has not exited after timeout_s; returns its exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                return self.proc.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        return self.proc.wait()


def child_env(device: str, gpu: int) -> dict[str, str]:
    """On cuda every GPU stays visible (cuda_ipc and NCCL peer access) with `gpu` first, as the child's cuda:0."""
    env = dict(os.environ)  # cwd is the repository root: `-m bench...` finds the code
    if device == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        order = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(order[gpu:] + order[:gpu])
    else:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def measure_allreduce(args: argparse.Namespace, sweep: Sweep) -> list[BusBandwidth]:
    (port,) = free_ports(1)
    ranks = [Child(["--role", "allreduce", "--rank", str(rank), "--port", str(port), "--child-device", args.device,
                    "--sizes", json.dumps(list(sweep.allreduce_bytes)), "--iters", str(sweep.allreduce_iters),
                    "--timeout-s", str(args.timeout_s)],
                   child_env(args.device, gpu)) for rank, gpu in enumerate(args.devices)]  # fmt: skip
    try:
        results = [ranks[0].expect(BusBandwidth, args.timeout_s) for _ in sweep.allreduce_bytes]
    finally:
        codes = [rank.stop() for rank in ranks]
    if any(codes):
        raise RuntimeError(f"all-reduce ranks exited with {codes}")
    return results


def make_trials(sweep: Sweep, capacity_pages: int, seed: int) -> list[Trial]:
    """Every distinct (pages, chunk, in flight) once per repetition, repetitions interleaved; shuffled pages."""
    generator = torch.Generator().manual_seed(seed)
    configs = {}
    for tokens in sweep.prompt_tokens:
        num_pages = tokens // PAGE_SIZE
        for chunk in sweep.chunk_pages:
            chunk = min(chunk or num_pages, num_pages)
            num_chunks = sweep.num_layers * -(-num_pages // chunk)
            for inflight in sweep.inflight:
                configs[num_pages, chunk, min(inflight or num_chunks, num_chunks)] = None
    trials = []
    for _ in range(sweep.reps):
        for num_pages, chunk, inflight in configs:
            page_ids = tuple(torch.randperm(capacity_pages, generator=generator)[:num_pages].tolist())
            trials.append(Trial(len(trials) + 2, page_ids, chunk, inflight))  # lease 1 is the warm-up
    return trials


def transfer(recv: Child, send: Child, trial: Trial, timeout_s: float) -> tuple[Sent, Landed]:
    recv.tell(trial)
    recv.expect(Ready, timeout_s)
    send.tell(trial)
    sent = send.expect(Sent, timeout_s)
    return sent, recv.expect(Landed, timeout_s)


@dataclass(frozen=True)
class UcxRun:
    rows: list[dict]  # one per configuration (summarize)
    sender: Connected
    receiver: Listening
    warmup_verified: bool


def measure_ucx(args: argparse.Namespace, sweep: Sweep) -> UcxRun:
    trials = make_trials(sweep, max(sweep.prompt_tokens) // PAGE_SIZE, args.seed)
    setup = Setup(args.device, sweep.num_layers, max(sweep.prompt_tokens) // PAGE_SIZE, args.ucx_transports,
                  args.ucx_net_devices, args.progress_mode, args.seed, args.timeout_s)  # fmt: skip
    argv = ["--setup", json.dumps(asdict(setup))]
    recv = Child(["--role", "recv", *argv], child_env(args.device, args.devices[1]))
    send = Child(["--role", "send", *argv], child_env(args.device, args.devices[0]))  # both start at once
    children = [recv, send]
    try:
        listening = recv.expect(Listening, args.timeout_s)
        send.tell(listening)
        connected = send.expect(Connected, args.timeout_s)
        biggest = max(trials, key=lambda t: (len(t.page_ids), t.chunk_pages, t.inflight))
        _, warm = transfer(recv, send, replace(biggest, lease_id=1), args.timeout_s)
        results = [transfer(recv, send, trial, args.timeout_s) for trial in trials]
        for child in children:
            child.tell(Quit())
    finally:
        codes = [child.stop() for child in children]
    if any(codes):
        raise RuntimeError(f"UCX children exited with {codes}")
    return UcxRun(summarize(trials, results, sweep.num_layers), connected, listening, warm.verified)


def summarize(trials: list[Trial], results: list[tuple[Sent, Landed]], num_layers: int) -> list[dict]:
    by_config: dict[tuple[int, int, int], list[tuple[Sent, Landed]]] = {}
    for trial, result in zip(trials, results, strict=True):
        by_config.setdefault((len(trial.page_ids), trial.chunk_pages, trial.inflight), []).append(result)
    rows = []
    for (num_pages, chunk, inflight), runs in by_config.items():
        num_bytes = runs[0][0].num_bytes
        seconds = statistics.median(sent.seconds for sent, _ in runs)
        rows.append({"prompt_tokens": num_pages * PAGE_SIZE, "pages_per_layer": num_pages, "chunk_pages": chunk,
                     "chunk_MiB": chunk * PAGE_BYTES / 2**20, "chunks": num_layers * -(-num_pages // chunk),
                     "inflight": inflight, "MB": num_bytes / 1e6, "ms": 1000 * seconds,
                     "GBs": num_bytes / seconds / 1e9,
                     "GBs_best": num_bytes / min(sent.seconds for sent, _ in runs) / 1e9,
                     "verified": all(landed.verified and landed.num_bytes == num_bytes for _, landed in runs)})  # fmt: skip
    return rows


def plot(name: str, rows: list[dict], busbw: float, title: str, out: str | None) -> None:
    panels = []
    for tokens in sorted({r["prompt_tokens"] for r in rows}):
        series = {}
        for chunk in sorted({r["chunk_pages"] for r in rows if r["prompt_tokens"] == tokens}):
            points = sorted(
                (r["inflight"], r["GBs"])
                for r in rows
                if (r["prompt_tokens"], r["chunk_pages"]) == (tokens, chunk)
            )
            label = f"{chunk} pages ({chunk * PAGE_BYTES / 2**20:.1f} MiB) per send"
            series[label] = ([x for x, _ in points], [y for _, y in points])  # fmt: skip
        panels.append({"title": f"{tokens} tokens, {title}", "xlabel": "sends in flight", "ylabel": "GB/s",
                       "series": series, "logx": True, "hline": (TARGET_FRACTION * busbw, f"{TARGET_FRACTION:.0%} of all-reduce busbw")})  # fmt: skip
    save_plot(name, panels, out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--devices", default="0,1", help="P's and D's GPU (positions in CUDA_VISIBLE_DEVICES)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few pages and layers, two configurations (tests)"
    )
    parser.add_argument("--progress-mode", default="thread", choices=("thread", "blocking", "polling"))
    parser.add_argument(
        "--ucx-transports", default=None, help='UCX_TLS; default "tcp,self" on cpu, "" (any) on cuda'
    )
    parser.add_argument(
        "--ucx-net-devices", default=None, help='UCX_NET_DEVICES; default "lo" on cpu, "" on cuda'
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout-s", type=float, default=60.0, help="bounds every wait, here and in the children"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.devices = [int(d) for d in args.devices.split(",")]
    if len(args.devices) != 2:
        parser.error(f"--devices={args.devices} must name two GPUs, P's and D's")
    if args.device == "cuda" and torch.cuda.device_count() < max(args.devices) + 1:
        parser.error(f"--devices={args.devices} but {torch.cuda.device_count()} GPUs are visible")
    cpu = args.device == "cpu"
    args.ucx_transports = ("tcp,self" if cpu else "") if args.ucx_transports is None else args.ucx_transports
    args.ucx_net_devices = ("lo" if cpu else "") if args.ucx_net_devices is None else args.ucx_net_devices
    return args


def main() -> None:
    args = parse_args()
    sweep = SWEEPS["quick" if args.quick else args.device]
    start = time.monotonic()
    peer = measure_allreduce(args, sweep)
    ucx = measure_ucx(args, sweep)
    rows = ucx.rows
    print_table(rows, list(rows[0]))
    print_table([asdict(p) for p in peer], [f.name for f in fields(BusBandwidth)])
    best = max(rows, key=lambda r: r["GBs"])
    busbw = max(p.busbw_gbs for p in peer)
    ratio = best["GBs"] / busbw
    verified = ucx.warmup_verified and all(r["verified"] for r in rows)
    verdict = "meets" if ratio >= TARGET_FRACTION else "misses"
    print(
        f"P {ucx.sender.device_name} -> D {ucx.receiver.device_name}, UCX {ucx.sender.ucx_version} "
        f"(may use {','.join(ucx.sender.active_transports)}), {time.monotonic() - start:.0f} s"
    )
    print(f"best UCX {best['GBs']:.2f} GB/s ({best['prompt_tokens']} tokens, {best['chunk_pages']} pages per send, "
          f"{best['inflight']} in flight) / {peer[0].backend} all-reduce busbw {busbw:.2f} GB/s = {ratio:.0%} "
          f"({verdict} the >= {TARGET_FRACTION:.0%} target); every transfer's pages verified: {verified}")  # fmt: skip
    meta = header()
    name = f"kv_transfer-{meta['card'].replace(' ', '_')}{'-quick' if args.quick else ''}"
    payload = {**meta, "device": args.device, "devices": args.devices, "p_device": ucx.sender.device_name,
               "d_device": ucx.receiver.device_name, "sweep": asdict(sweep), "page_bytes": PAGE_BYTES,
               "progress_mode": args.progress_mode,
               "ucx": {**asdict(ucx.sender), "requested_tls": args.ucx_transports,
                       "requested_net_devices": args.ucx_net_devices,
                       "env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}},
               "best_ucx_GBs": best["GBs"], "best_ucx_row": best, "allreduce_busbw_GBs": busbw,
               "ratio": ratio, "target_fraction": TARGET_FRACTION, "meets_target": ratio >= TARGET_FRACTION,
               "verified": verified, "rows": rows, "allreduce": [asdict(p) for p in peer]}  # fmt: skip
    print("wrote", write_json(name, payload, args.out))
    plot(name, rows, busbw, f"{meta['card']}, {peer[0].backend} busbw {busbw:.1f} GB/s", args.out)
    if not verified:
        sys.exit("some pages did not land intact: the numbers above are not a transfer's")


if __name__ == "__main__":
    main()
