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
import asyncio
import datetime
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from bench.harness import header, print_table, save_plot, write_json

PAGE_SIZE = 64  # tokens per page
KV_DIM = 576  # kv_lora_rank 512 + qk_rope_head_dim 64, bf16
PAGE_BYTES = PAGE_SIZE * KV_DIM * 2
POISON = 0xFF  # a bf16 NaN in every value of a page nobody wrote
TARGET_FRACTION = 0.5
WORLD_SIZE = 2  # the all-reduce peer's ranks, one per GPU
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


@dataclass(frozen=True)
class Setup:
    """What P's and D's processes agree on; each child gets it as JSON."""

    device: str  # "cuda" (the process's own GPU is cuda:0) | "cpu"
    num_layers: int
    capacity_pages: int  # pages per layer in D's cache and in P's buffer
    transports: str  # UCX_TLS, "" = UCX picks
    net_devices: str  # UCX_NET_DEVICES, "" = all
    progress_mode: str
    seed: int
    timeout_s: float  # bounds every wait in the children

    def ucx_options(self):
        from moemesh.transport.ucx import UcxOptions

        thread = self.progress_mode == "thread"
        return UcxOptions(self.transports, self.net_devices, self.progress_mode, notifier_thread=thread)


# --- the messages between the bench and its children: one JSON object per line -----------------------------


@dataclass(frozen=True)
class Trial:
    """One timed transfer: every layer of one prompt's pages, into D's pages `page_ids` (prompt order)."""

    lease_id: int
    page_ids: tuple[int, ...]
    chunk_pages: int  # pages per send
    inflight: int  # sends in flight at once


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Listening:
    address: str  # D's UCX address; the bench passes it on to P
    device_name: str


@dataclass(frozen=True)
class Connected:
    ucx_version: str
    ucxx_version: str
    ucx_tls: str  # UCX's TLS setting as P's context runs it
    active_transports: list[str]  # what UCX may use there (`ucxx.get_active_transports()`)
    device_name: str


@dataclass(frozen=True)
class Ready:
    lease_id: int


@dataclass(frozen=True)
class Sent:
    lease_id: int
    seconds: float
    num_bytes: int


@dataclass(frozen=True)
class Landed:
    lease_id: int
    num_bytes: int
    verified: bool


@dataclass(frozen=True)
class BusBandwidth:
    backend: str
    num_bytes: int
    seconds: float  # per all-reduce, the slower rank's mean
    algbw_gbs: float
    busbw_gbs: float


MESSAGES = {
    cls.__name__: cls for cls in (Trial, Quit, Listening, Connected, Ready, Sent, Landed, BusBandwidth)
}


def encode(msg) -> str:
    return json.dumps({"kind": type(msg).__name__, **asdict(msg)})


def decode(line: str):
    fields_ = json.loads(line)
    cls = MESSAGES[fields_.pop("kind")]
    if cls is Trial:
        fields_["page_ids"] = tuple(fields_["page_ids"])
    return cls(**fields_)


def say(msg) -> None:
    print(encode(msg), flush=True)


# --- the children -------------------------------------------------------------------------------------------


def make_kv(setup: Setup, device: torch.device) -> torch.Tensor:
    """P's KV, every layer and page, from the seeded generator: `[layers, capacity_pages, PAGE_BYTES]` uint8."""
    generator = torch.Generator(device).manual_seed(setup.seed)
    shape = (setup.num_layers, setup.capacity_pages, PAGE_BYTES // 8)
    words = torch.empty(shape, dtype=torch.int64, device=device).random_(
        generator=generator
    )  # 8x faster than bytes
    return words.view(torch.uint8)


def stdin_commands(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """The bench's commands; None at EOF (the bench went away: the child quits). A daemon thread reads, so a
    blocked read never holds the process at exit."""
    commands: asyncio.Queue = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, decode(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=pump, daemon=True).start()
    return commands


def pages_intact(caches: list[torch.Tensor], expected: torch.Tensor, page_ids: tuple[int, ...]) -> bool:
    """Every page of the lease holds P's bytes for its position, every other page is still poison."""
    ids = torch.tensor(page_ids, device=expected.device)
    others = torch.ones(expected.shape[1], dtype=torch.bool, device=expected.device)
    others[ids] = False
    for layer, cache in enumerate(caches):
        pages = cache.view(cache.shape[0], -1).view(torch.uint8)  # [capacity_pages, PAGE_BYTES]
        if not torch.equal(pages[ids], expected[layer, : len(page_ids)]):
            return False
        if not bool((pages[others] == POISON).all()):
            return False
    return True


async def serve_receiver(setup: Setup) -> None:
    """D: a cache of `capacity_pages` per layer; per Trial: poison, open the lease, say Ready, wait for every
    byte, check the pages, release, say Landed."""
    from moemesh.transport.kv import KvLayout, KvTarget, Lease, LeaseKey, PagedKvSink
    from moemesh.transport.kv_ucx import UcxKvReceiver

    device = torch.device(setup.device)
    layout = KvLayout("bf16", PAGE_SIZE, KV_DIM * 2, setup.num_layers)
    caches = [torch.empty(setup.capacity_pages, PAGE_SIZE, KV_DIM, dtype=torch.bfloat16, device=device)
              for _ in range(setup.num_layers)]  # fmt: skip
    expected = make_kv(setup, device)
    receiver = UcxKvReceiver(options=setup.ucx_options(), recv_timeout_s=setup.timeout_s)
    address = await receiver.start()
    say(Listening(address, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))
    commands = stdin_commands(asyncio.get_running_loop())
    try:
        while isinstance(trial := await asyncio.wait_for(commands.get(), setup.timeout_s), Trial):
            for cache in caches:
                cache.view(torch.uint8).fill_(POISON)
            target = KvTarget("bench", LeaseKey(trial.lease_id, 1), address, trial.page_ids, 0, layout)
            receiver.inbox.expect(
                Lease.for_target(target, time.monotonic() + setup.timeout_s), PagedKvSink(caches)
            )
            say(Ready(trial.lease_id))
            progress = await receiver.inbox.wait_complete(target.lease, timeout_s=setup.timeout_s)
            verified = pages_intact(caches, expected, trial.page_ids)
            await receiver.inbox.release(target.lease)
            say(Landed(trial.lease_id, progress.bytes_received, verified))
    finally:
        await receiver.close()


async def timed_send(sender, target, kv: torch.Tensor, trial: Trial) -> float:
    """Sends every layer's pages in chunks of trial.chunk_pages, trial.inflight lanes each taking the next chunk
    when its last one was acked. Returns the seconds from the first send to the last ack."""
    chunks = iter([(layer, first) for layer in range(kv.shape[0])
                   for first in range(0, len(trial.page_ids), trial.chunk_pages)])  # fmt: skip

    async def lane() -> None:
        for layer, first in chunks:  # shared: each lane takes the next chunk
            last = min(first + trial.chunk_pages, len(trial.page_ids))
            await sender.send(target, layer, first, kv[layer, first:last])

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(trial.inflight)))
    return time.perf_counter() - start


async def serve_sender(setup: Setup) -> None:
    """P: makes its KV; connects to the address of the first command (D's Listening), says Connected; per
    Trial: sends, says Sent."""
    import ucxx

    from moemesh.transport.kv import KvLayout, KvTarget, LeaseKey
    from moemesh.transport.kv_ucx import UcxKvSender

    device = torch.device(setup.device)
    layout = KvLayout("bf16", PAGE_SIZE, KV_DIM * 2, setup.num_layers)
    kv = make_kv(setup, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sender = UcxKvSender(setup.ucx_options(), timeout_s=setup.timeout_s)
    commands = stdin_commands(asyncio.get_running_loop())
    try:
        listening = await asyncio.wait_for(commands.get(), setup.timeout_s)
        if not isinstance(listening, Listening):
            return  # the bench went away before D listened
        address = listening.address
        await sender.connect(address)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        say(Connected(".".join(map(str, ucxx.get_ucx_version())), ucxx.__version__,
                      ucxx.get_config().get("TLS", ""), sorted(ucxx.get_active_transports()), name))  # fmt: skip
        while isinstance(trial := await asyncio.wait_for(commands.get(), setup.timeout_s), Trial):
            target = KvTarget("bench", LeaseKey(trial.lease_id, 1), address, trial.page_ids, 0, layout)
            seconds = await timed_send(sender, target, kv, trial)
            say(Sent(trial.lease_id, seconds, setup.num_layers * len(trial.page_ids) * PAGE_BYTES))
    finally:
        await sender.close()


def run_allreduce_rank(
    rank: int, port: int, device: str, sizes: list[int], iters: int, timeout_s: float
) -> None:
    """One rank of the peer; rank 0 says a BusBandwidth per size."""
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")  # cuda:0 = this rank's GPU
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
    try:
        probe = torch.full((4,), float(rank + 1), device=dev)
        dist.all_reduce(probe)
        if not bool((probe == 3.0).all()):
            raise RuntimeError(f"all-reduce of 1 + 2 gave {probe.tolist()}")
        for num_bytes in sizes:
            data = torch.zeros(num_bytes // 4, dtype=torch.float32, device=dev)
            for _ in range(max(2, iters // 4)):  # warm-up
                dist.all_reduce(data)
            dist.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(data)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = torch.tensor([(time.perf_counter() - start) / iters], device=dev, dtype=torch.float64)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slower rank's
            algbw = num_bytes / seconds.item() / 1e9
            busbw = (
                algbw * 2 * (WORLD_SIZE - 1) / WORLD_SIZE
            )  # bytes each rank sends and receives, per second
            if rank == 0:
                say(BusBandwidth(backend, num_bytes, seconds.item(), algbw, busbw))
    finally:
        dist.destroy_process_group()


def child_main(args: argparse.Namespace) -> None:
    if args.role == "allreduce":
        run_allreduce_rank(
            args.rank, args.port, args.child_device, json.loads(args.sizes), args.iters, args.timeout_s
        )
        return
    from moemesh.transport.ucx import UcxRuntime

    setup = Setup(**json.loads(args.setup))
    if setup.device == "cpu":
        torch.set_num_threads(1)  # the UCX threads want the other core
    serve = serve_receiver(setup) if args.role == "recv" else serve_sender(setup)
    try:
        asyncio.run(serve)
    finally:
        UcxRuntime.reset()  # stops ucxx's notifier thread, which would keep the process alive


# --- the bench: spawns the children, drives them, reports -------------------------------------------------


class Child:
    """A child process speaking the line protocol; every read has a timeout, stop() always ends it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.name = argv[argv.index("--role") + 1]
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bench_kv_transfer", *argv], cwd=ROOT, env=env,
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_allreduce(args: argparse.Namespace, sweep: Sweep) -> list[BusBandwidth]:
    port = free_port()
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
    parser.add_argument("--role", choices=("recv", "send", "allreduce"), help=argparse.SUPPRESS)
    for internal in ("--setup", "--child-device", "--sizes"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    for internal in ("--rank", "--port", "--iters"):
        parser.add_argument(internal, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return args
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
    if args.role:
        child_main(args)
        return
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
