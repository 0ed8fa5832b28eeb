"""Where a KV chunk's time goes: one prompt's KV (every layer in one chunk, as the prefill worker sends a
512-token V2-Lite prompt) from P's process to D's paged cache over the real UcxKvSender / UcxKvReceiver, with
each hop timestamped on the one machine clock (time.monotonic is system-wide), for each UCX progress setting.

    P: send() called -> header sent -> payload sent -> ack received (send() returns)
    D: header received -> admitted (buffers posted) -> payload landed -> inbox.land -> ack sent

Both processes on one device (two CUDA contexts on one GPU, as the pd mesh runs on one card), or on CPU over
TCP loopback. Median over repetitions after a warm-up; JSON (+ the table) under bench/results.

    python -m bench.kv_latency [--device cuda] [--layers 8] [--pages 8] [--reps 30] [--modes thread,polling]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.harness import header, print_table, write_json

PAGE_SIZE = 64
KV_DIM = 576
ROOT = Path(__file__).resolve().parent.parent
P_MARKS = ("header_sent", "payload_sent", "acked")
D_MARKS = ("header_recv", "admitted", "payload_recv", "landed", "ack_sent")


def options(device: str, mode: str):
    from moemesh.config.mesh import CPU_UCX_TRANSPORTS, CUDA_UCX_TRANSPORTS
    from moemesh.transport.ucx import UcxOptions

    transports, devices = (CUDA_UCX_TRANSPORTS, "") if device == "cuda" else (CPU_UCX_TRANSPORTS, "lo")
    thread = mode.startswith("thread")
    return UcxOptions(transports, devices, "thread" if thread else mode, notifier_thread=mode == "thread")


def layout(args):
    from moemesh.transport.kv import KvLayout

    return KvLayout("bf16", PAGE_SIZE, KV_DIM * 2, args.layers)


async def receiver(args) -> None:
    """D: a paged cache; per repetition opens a lease, says READY, waits for it to complete, reports marks."""
    from moemesh.transport import kv_ucx
    from moemesh.transport.kv import KvTarget, Lease, LeaseKey, PagedKvSink

    dev = torch.device(args.device)
    caches = [torch.zeros(args.pages * 4, PAGE_SIZE, KV_DIM, dtype=torch.bfloat16, device=dev)
              for _ in range(args.layers)]  # fmt: skip
    marks: dict[str, float] = {}
    recv = kv_ucx.UcxKvReceiver(options=options(args.device, args.mode), recv_timeout_s=30)

    inbox = recv.inbox
    admit, land = inbox.admit, inbox.land

    def timed_admit(h):
        marks["header_recv"] = time.monotonic()
        out = admit(h)
        marks["admitted"] = time.monotonic()
        return out

    def timed_land(a):
        marks["payload_recv"] = time.monotonic()
        out = land(a)
        marks["landed"] = time.monotonic()
        return out

    ack = recv._ack

    async def timed_ack(*a):
        await ack(*a)
        marks["ack_sent"] = time.monotonic()

    inbox.admit, inbox.land, recv._ack = timed_admit, timed_land, timed_ack
    address = await recv.start()
    print(json.dumps({"address": address}), flush=True)
    loop = asyncio.get_running_loop()
    for rep in range(args.reps + 1):
        page_ids = tuple(range(rep % 2, rep % 2 + 2 * args.pages, 2))[: args.pages]  # runs of one page
        if args.contiguous:
            page_ids = tuple(range(args.pages))
        target = KvTarget("r", LeaseKey(rep + 1, 1), address, page_ids, 0, layout(args))
        inbox.expect(Lease.for_target(target, time.monotonic() + 30), PagedKvSink(caches))
        print(json.dumps({"ready": rep}), flush=True)
        await inbox.wait_complete(target.lease, timeout_s=30)
        await asyncio.sleep(0.01)  # the ack's own completion
        await inbox.release(target.lease)
        print(json.dumps({"rep": rep, **marks}), flush=True)
        marks.clear()
        await loop.run_in_executor(None, sys.stdin.readline)  # the parent's go for the next one
    await recv.close()


async def sender(args, address: str) -> None:
    from moemesh.transport import kv_ucx
    from moemesh.transport.kv import KvTarget, LeaseKey

    dev = torch.device(args.device)
    pages = torch.randn(args.layers, args.pages, PAGE_SIZE, KV_DIM, device=dev).to(torch.bfloat16)
    snd = kv_ucx.UcxKvSender(options(args.device, args.mode), timeout_s=30)
    await snd.connect(address)
    loop = asyncio.get_running_loop()
    marks: dict[str, float] = {}
    real_exchange = snd._exchange

    async def timed_exchange(ep, addr, head, data, segments):
        send, recv = ep.send, ep.recv
        calls = []

        async def t_send(buf, tag):
            await send(buf, tag=tag)
            calls.append(time.monotonic())

        ep.send = t_send
        try:
            out = await real_exchange(ep, addr, head, data, segments)
        finally:
            ep.send = send
            del recv
        marks["header_sent"], marks["payload_sent"] = calls[0], calls[-1]
        return out

    snd._exchange = timed_exchange
    for rep in range(args.reps + 1):
        line = await loop.run_in_executor(None, sys.stdin.readline)
        page_ids = tuple(range(rep % 2, rep % 2 + 2 * args.pages, 2))[: args.pages]
        if args.contiguous:
            page_ids = tuple(range(args.pages))
        target = KvTarget("r", LeaseKey(rep + 1, 1), address, page_ids, 0, layout(args))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.monotonic()
        sent = await snd.send(target, 0, 0, pages, args.layers)
        marks["acked"] = time.monotonic()
        print(
            json.dumps({"rep": rep, "start": start, "bytes": sent, **marks, "line": line.strip()}), flush=True
        )
        marks.clear()
    await snd.close()


def child_main(args) -> None:
    from moemesh.services.ucx_lifecycle import stop_ucx

    try:
        asyncio.run(receiver(args) if args.role == "recv" else sender(args, args.address))
    finally:
        stop_ucx()
    os._exit(0)


def run_mode(args, mode: str) -> dict:
    base = [sys.executable, "-m", "bench.kv_latency", "--device", args.device, "--layers", str(args.layers),
            "--pages", str(args.pages), "--reps", str(args.reps), "--mode", mode]  # fmt: skip
    if args.contiguous:
        base.append("--contiguous")
    popen = dict(cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    d = subprocess.Popen([*base, "--role", "recv"], **popen)
    p = None
    try:
        address = json.loads(d.stdout.readline())["address"]
        p = subprocess.Popen([*base, "--role", "send", "--address", address], **popen)
        rows = []
        for rep in range(args.reps + 1):
            assert json.loads(d.stdout.readline())["ready"] == rep
            p.stdin.write("go\n")
            p.stdin.flush()
            ps, ds = json.loads(p.stdout.readline()), json.loads(d.stdout.readline())
            d.stdin.write("next\n")
            d.stdin.flush()
            if rep:  # rep 0 is the warm-up
                t0 = ps["start"]
                row = {k: 1000 * (ps[k] - t0) for k in P_MARKS} | {k: 1000 * (ds[k] - t0) for k in D_MARKS}
                rows.append(row)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        return {"mode": mode, "bytes": ps["bytes"], "reps": args.reps, "median_ms": med,
                "p90_acked_ms": sorted(r["acked"] for r in rows)[int(0.9 * len(rows))]}  # fmt: skip
    finally:
        for proc in (p, d):
            if proc is not None:
                try:
                    proc.stdin.close()
                    proc.wait(20)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--modes", default="thread,thread-nonotifier,polling,blocking")
    parser.add_argument("--contiguous", action="store_true", help="D's pages in one run (direct receive)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--role", choices=("recv", "send"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child_main(args)
        return
    results = []
    for mode in args.modes.split(","):
        try:
            results.append(run_mode(args, mode))
        except Exception as err:  # one setting failing must not hide the others
            results.append({"mode": mode, "error": repr(err)})
        print(json.dumps(results[-1]), flush=True)
    rows = [
        {"mode": r["mode"], **{k: round(v, 3) for k, v in r.get("median_ms", {}).items()}} for r in results
    ]
    print_table(rows, ["mode", *P_MARKS, *D_MARKS])
    doc = {"name": "kv_latency", **header(), "config": vars(args) | {"role": None}, "results": results}
    write_json(f"kv_latency-{args.device}", doc, args.out)


if __name__ == "__main__":
    main()
