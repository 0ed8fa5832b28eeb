"""KV pages in GPU memory through ucxx (UCX picks cuda_copy / cuda_ipc / RDMA): bytes land intact. Runs on
a GPU machine (`make test-gpu`), or there as a script: `python tests/unit/test_transport_ucx_gpu.py`."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from moemesh.transport.kv import KvLayout, KvTarget, Lease, LeaseKey, PagedKvSink

pytestmark = pytest.mark.gpu


async def _move(num_pages: int, num_layers: int, chunk_pages: int, checksum: bool) -> float:
    """Sends num_layers layers of num_pages shuffled pages from one CUDA cache to another; returns GB/s."""
    from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender
    from moemesh.transport.ucx import UcxOptions

    options = UcxOptions(transports="", net_devices="")  # let UCX choose its GPU transports
    layout = KvLayout("bf16", page_size=64, bytes_per_token=1152, num_layers=num_layers)  # 72 KiB pages
    device = torch.device("cuda")
    caches = [torch.zeros(num_pages, 64, 576, dtype=torch.bfloat16, device=device) for _ in range(num_layers)]
    kv = torch.randn(num_layers, num_pages, 64, 576, device=device).to(torch.bfloat16)
    page_ids = torch.randperm(num_pages).tolist()
    receiver = UcxKvReceiver(options=options)
    sender = UcxKvSender(options, checksum=checksum)
    await receiver.start()
    await sender.connect(receiver.address)
    try:
        target = KvTarget("gpu", LeaseKey(1, 1), receiver.address, tuple(page_ids), 0, layout)
        receiver.inbox.expect(Lease.for_target(target, time.monotonic() + 60), PagedKvSink(caches))
        torch.cuda.synchronize()
        start = time.perf_counter()
        sends = [
            sender.send(target, layer, first, kv[layer, first : first + chunk_pages])
            for layer in range(num_layers)
            for first in range(0, num_pages, chunk_pages)
        ]
        sent = sum(await asyncio.gather(*sends))
        await receiver.inbox.wait_complete(target.lease, timeout_s=60)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        for layer in range(num_layers):
            assert torch.equal(caches[layer][page_ids], kv[layer]), f"layer {layer} differs"
        return sent / seconds / 1e9
    finally:
        await sender.close()
        await receiver.close()


def test_cuda_pages_move_through_ucx_intact():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("ucxx")
    asyncio.run(_move(num_pages=32, num_layers=2, chunk_pages=8, checksum=True))


if __name__ == "__main__":
    asyncio.run(_move(num_pages=32, num_layers=2, chunk_pages=8, checksum=True))
    print("small transfer with checksums: ok")
    gbps = asyncio.run(_move(num_pages=1024, num_layers=4, chunk_pages=256, checksum=False))
    print(f"4 x 72 MiB in 18 MiB chunks, one process: {gbps:.1f} GB/s")
