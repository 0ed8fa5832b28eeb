"""Multi-layer KV chunks over real UCX (TCP on loopback) and the loopback fake: the bytes land exactly where
the local path (a plain index_copy of P's pages into D's) puts them — for ragged prompts, prefix skips,
consecutive runs (received straight into the pages), scattered pages (staged) — and a hostile header costs
the sender its connection, never an allocation on D."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch

from moemesh.transport.errors import LeaseRefused
from moemesh.transport.kv import KvLayout, KvTarget, Lease, LeaseKey, PagedKvSink
from moemesh.transport.kv_loopback import LoopbackFabric
from moemesh.transport.kv_wire import MAX_SEGMENTS, ChunkHeader, plan_segments

PAGE_SIZE, DIM, LAYERS, NUM_PAGES = 4, 6, 3, 96
LAYOUT = KvLayout("bf16", PAGE_SIZE, DIM * 2, LAYERS)


def test_plan_segments_follows_runs_of_consecutive_pages():
    segs = plan_segments([5, 6, 7, 9, 10], 2, 48)
    assert [(s.layer, s.page, s.num_pages, s.offset_bytes, s.num_bytes) for s in segs] == [
        (0, 0, 3, 0, 144), (0, 3, 2, 144, 96), (1, 0, 3, 240, 144), (1, 3, 2, 384, 96),
    ]  # fmt: skip
    # more than MAX_DIRECT_RUNS runs: one staged message for every layer (a rendezvous per run costs more)
    (whole,) = plan_segments([5, 6, 7, 2, 9, 10], 2, 48)
    assert (whole.layer, whole.num_layers, whole.page, whole.num_pages, whole.num_bytes) == (0, 2, 0, 6, 576)
    scattered = list(range(0, 2 * MAX_SEGMENTS, 2))  # no two consecutive: one staged message
    (whole,) = plan_segments(scattered, 3, 48)
    assert (whole.num_layers, whole.num_pages, whole.num_bytes) == (3, MAX_SEGMENTS, 3 * MAX_SEGMENTS * 48)


def caches() -> list[torch.Tensor]:
    return [torch.full((NUM_PAGES, PAGE_SIZE, DIM), math.nan, dtype=torch.bfloat16) for _ in range(LAYERS)]


def make_pair(kind: str):
    if kind == "loopback":
        fabric = LoopbackFabric()
        return fabric.receiver("d"), fabric.sender(checksum=True)
    pytest.importorskip("ucxx")
    from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender

    return UcxKvReceiver(recv_timeout_s=10), UcxKvSender(checksum=True, timeout_s=10)


CASES = {  # name -> (prompt pages, D's page ids, pages already on D)
    "ragged, one run": (5, list(range(10, 15)), 0),
    "prefix skip, two runs": (7, [40, 41, 42, 3, 4, 5, 6], 2),
    "shuffled (staged)": (46, random.Random(3).sample(range(0, NUM_PAGES, 2), 46), 1),
    "every other page": (9, list(range(50, 68, 2)), 0),
}


@pytest.mark.parametrize("kind", ["loopback", "ucx"])
def test_multi_layer_chunks_land_exactly_as_the_local_copy(kind):
    async def body():
        receiver, sender = make_pair(kind)
        await receiver.start()
        sink = PagedKvSink(caches())
        expected = caches()
        try:
            for n, (num_pages, page_ids, skip) in enumerate(CASES.values()):
                g = torch.Generator().manual_seed(n)
                p_kv = torch.randn(LAYERS, num_pages, PAGE_SIZE, DIM, generator=g).to(torch.bfloat16)
                target = KvTarget(f"r{n}", LeaseKey(1000 + n, 1), receiver.address, tuple(page_ids),
                                  skip * PAGE_SIZE, LAYOUT, token=77 + n)  # fmt: skip
                receiver.inbox.expect(Lease.for_target(target, 1e12), sink)
                # P's chunks, as two steps complete pages: every layer at once, then layers 0-1 and layer 2
                mid = (skip + num_pages + 1) // 2
                sends = [sender.send(target, 0, skip, p_kv[:, skip:mid].contiguous(), LAYERS)]
                sends.append(sender.send(target, 0, mid, p_kv[0:2, mid:].contiguous(), 2))
                sends.append(sender.send(target, 2, mid, p_kv[2:3, mid:].contiguous(), 1))
                await asyncio.gather(*sends)
                progress = await receiver.inbox.wait_complete(target.lease, 5)
                assert progress.bytes_received == LAYERS * (num_pages - skip) * LAYOUT.page_bytes
                for layer in range(LAYERS):  # the local path: a plain index_copy of the pages P sent
                    ids = torch.tensor(page_ids[skip:])
                    expected[layer].index_copy_(0, ids, p_kv[layer, skip:])
                await receiver.inbox.release(target.lease)
            for got, want in zip(sink.caches, expected, strict=True):
                assert torch.equal(got.isnan(), want.isnan())
                assert torch.equal(got.nan_to_num().view(torch.int16), want.nan_to_num().view(torch.int16))
            assert sink.num_direct_segments > 0 and sink.num_staged_segments > 0
            # pooled: at most one buffer per chunk in flight at once (3 here), not one per chunk (12)
            assert sink.staging is not None and sink.staging.num_allocated <= 3
            assert receiver.inbox.num_live == 0 and list(receiver.inbox.refusals) == []
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(asyncio.wait_for(body(), 60))


@pytest.mark.parametrize("kind", ["loopback", "ucx"])
def test_a_page_written_twice_is_refused(kind):
    async def body():
        receiver, sender = make_pair(kind)
        await receiver.start()
        try:
            target = KvTarget("r", LeaseKey(5, 1), receiver.address, (1, 2, 3), 0, LAYOUT, token=9)
            receiver.inbox.expect(Lease.for_target(target, 1e12), PagedKvSink(caches()))
            kv = torch.randn(LAYERS, 3, PAGE_SIZE, DIM).to(torch.bfloat16)
            await sender.send(target, 0, 0, kv[:, :2].contiguous(), LAYERS)
            with pytest.raises(LeaseRefused, match="OUT_OF_RANGE: pages already written"):
                await sender.send(target, 1, 1, kv[1:2, 1:].contiguous(), 1)
            assert receiver.inbox.progress(target.lease).state.value == "receiving"  # not complete by bytes
            await sender.send(target, 0, 2, kv[:, 2:].contiguous(), LAYERS)
            await receiver.inbox.wait_complete(target.lease, 5)
            await receiver.inbox.release(target.lease)
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_an_oversized_header_drops_the_connection_without_allocating():
    pytest.importorskip("ucxx")
    from moemesh.transport.kv_ucx import TAG_HEADER, UcxKvReceiver, UcxKvSender
    from moemesh.transport.ucx import as_ucx_buffer

    async def body():
        receiver, sender = UcxKvReceiver(recv_timeout_s=5), UcxKvSender(timeout_s=5)
        await receiver.start()
        try:
            sink = PagedKvSink(caches())
            target = KvTarget("r", LeaseKey(6, 1), receiver.address, (1, 2), 0, LAYOUT, token=3)
            receiver.inbox.expect(Lease.for_target(target, 1e12), sink)
            ep = await sender.pool.get(receiver.address)
            forged = ChunkHeader(1, target.lease, 0, 0, 2, 1 << 40, None, 1, 3, 1)  # claims a terabyte
            raw = torch.frombuffer(bytearray(forged.pack()), dtype=torch.uint8)
            await ep.send(as_ucx_buffer(raw), tag=TAG_HEADER)
            for _ in range(200):
                if receiver.num_hostile_headers:
                    break
                await asyncio.sleep(0.02)
            assert receiver.num_hostile_headers == 1
            assert sink.staging is not None and sink.staging.num_allocated == 0
            assert receiver._drain_buffer.numel() == 0
            # the sender reconnects and a well-formed chunk still lands
            sender.pool.drop(receiver.address, ep)
            kv = torch.randn(LAYERS, 2, PAGE_SIZE, DIM).to(torch.bfloat16)
            await sender.send(target, 0, 0, kv, LAYERS)
            await receiver.inbox.wait_complete(target.lease, 5)
            await receiver.inbox.release(target.lease)
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(asyncio.wait_for(body(), 60))
