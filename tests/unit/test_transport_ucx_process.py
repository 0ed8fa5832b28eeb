"""KV pages between two processes over real ucxx (TCP on loopback), as P and D run in the mesh: the receiver
process checks every byte against crc32 checksums and against the data it expects."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("ucxx", reason="ucxx is in the [server] extra")

from moemesh.transport.errors import LeaseRefused  # noqa: E402
from moemesh.transport.kv import KvLayout, KvTarget, LeaseKey  # noqa: E402
from moemesh.transport.kv_ucx import UcxKvSender  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = KvLayout("bf16", page_size=16, bytes_per_token=1152, num_layers=4)  # 18 KiB pages
PAGE_IDS = (7, 3, 11, 0, 5, 9)

# D: leases PAGE_IDS under lease 1/g1, waits for every byte, checks the pages, prints the verdict.
RECEIVER = f"""
import asyncio, sys, time, torch
from moemesh.transport.kv import KvLayout, KvTarget, Lease, LeaseKey, PagedKvSink
from moemesh.transport.kv_ucx import UcxKvReceiver

async def main():
    layout = KvLayout("bf16", 16, 1152, 4)
    caches = [torch.zeros(12, 16, 576, dtype=torch.bfloat16) for _ in range(4)]
    receiver = UcxKvReceiver()
    address = await receiver.start()
    target = KvTarget("r1", LeaseKey(1, 1), address, {PAGE_IDS!r}, 0, layout)
    receiver.inbox.expect(Lease.for_target(target, time.monotonic() + 30), PagedKvSink(caches))
    print(address, flush=True)
    await receiver.inbox.wait_complete(target.lease, timeout_s=30)
    expected = torch.randn(4, 6, 16, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ok = all(torch.equal(caches[l][list({PAGE_IDS!r})], expected[l]) for l in range(4))
    untouched = all(caches[l][[1, 2, 4, 6, 8, 10]].abs().sum() == 0 for l in range(4))
    await receiver.inbox.release(target.lease)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the late write comes meanwhile
    print("pages-ok" if ok and untouched else "pages-wrong", receiver.inbox.bytes_received,
          [r.reason.name for r in receiver.inbox.refusals], flush=True)
    await receiver.close()

asyncio.run(asyncio.wait_for(main(), 40))  # never outlive a stuck test
"""


def line_reader(proc: subprocess.Popen) -> queue.Queue[str]:
    """The child's stdout lines, so the test waits for them with a timeout instead of blocking forever."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("<eof>")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_pages_cross_a_process_boundary_intact_and_a_late_write_is_refused():
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        lines = line_reader(proc)
        address = lines.get(timeout=30).strip()
        assert address.startswith("127.0.0.1:"), address
        target = KvTarget("r1", LeaseKey(1, 1), address, PAGE_IDS, 0, LAYOUT)
        kv = torch.randn(4, 6, 16, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

        async def push():
            sender = UcxKvSender(checksum=True, timeout_s=20)
            try:
                await sender.connect(address)
                sends = [sender.send(target, layer, first, kv[layer, first : first + 2])
                         for layer in range(4) for first in range(0, 6, 2)]  # fmt: skip
                sent = sum(await asyncio.gather(*sends))
                # D releases the lease once complete; a late duplicate write must be refused.
                await asyncio.sleep(0.3)
                with pytest.raises(LeaseRefused, match="RELEASED"):
                    await sender.send(target, 0, 0, kv[0, 0:2])
                return sent
            finally:
                await sender.close()

        sent = asyncio.run(asyncio.wait_for(push(), 30))
        proc.stdin.write("\n")
        proc.stdin.flush()
        verdict = lines.get(timeout=30).strip().split(maxsplit=2)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sent == 4 * 6 * LAYOUT.page_bytes
    assert verdict == ["pages-ok", str(sent), "['RELEASED']"]
