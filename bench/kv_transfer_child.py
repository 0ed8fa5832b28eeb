"""The two processes of `bench.bench_kv_transfer` and its all-reduce ranks: D (`recv`: a paged cache and a
UcxKvReceiver, checking every page it gets), P (`send`: the KV and a UcxKvSender) and one all-reduce rank
(`allreduce`). They speak to the bench in JSON lines: its commands on stdin, their replies on stdout.

    python -m bench.kv_transfer_child --role recv|send --setup JSON
    python -m bench.kv_transfer_child --role allreduce --rank R --port P --child-device D --sizes JSON --iters N
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch

PAGE_SIZE = 64  # tokens per page
KV_DIM = 576  # kv_lora_rank 512 + qk_rope_head_dim 64, bf16
PAGE_BYTES = PAGE_SIZE * KV_DIM * 2
POISON = 0xFF  # a bf16 NaN in every value of a page nobody wrote
WORLD_SIZE = 2  # the all-reduce peer's ranks, one per GPU


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


def main() -> None:
    args = parse_args()
    if args.role == "allreduce":
        run_allreduce_rank(
            args.rank, args.port, args.child_device, json.loads(args.sizes), args.iters, args.timeout_s
        )
        return
    from moemesh.services.ucx_lifecycle import stop_ucx

    setup = Setup(**json.loads(args.setup))
    if setup.device == "cpu":
        torch.set_num_threads(1)  # the UCX threads want the other core
    serve = serve_receiver(setup) if args.role == "recv" else serve_sender(setup)
    try:
        asyncio.run(serve)
    finally:
        stop_ucx()  # stops ucxx's notifier thread, which would keep the process alive (as the workers do)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("recv", "send", "allreduce"), required=True)
    parser.add_argument("--setup", help="recv/send: the Setup as JSON")
    parser.add_argument("--child-device", choices=("cuda", "cpu"))
    parser.add_argument("--sizes", help="allreduce: bytes per size, a JSON list")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    return parser.parse_args()


if __name__ == "__main__":
    main()
