"""The KV transport with the kernels the services will use: P packs pages with `pack_kv`, the bytes travel
(loopback fake and real ucxx), D's sink scatters them with `unpack_kv` — D's pages then equal P's."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from moemesh.kernels.paged_kv import pack_kv
from moemesh.services.decode.leases import EngineKvSink  # the decode service's sink: unpack_kv
from moemesh.transport.kv import KvLayout, KvTarget, Lease, LeaseKey
from moemesh.transport.kv_loopback import LoopbackFabric

PAGE_SIZE, ROW, LAYERS = 8, 576, 3  # 576 = kv_lora_rank 512 + rope 64


@pytest.mark.parametrize("kind", ["loopback", "ucx"])
def test_pack_send_unpack_reproduces_the_prefill_pages_on_decode(kind):
    layout = KvLayout("bf16", PAGE_SIZE, ROW * 2, LAYERS)
    p_caches = [torch.randn(20, PAGE_SIZE, ROW).to(torch.bfloat16) for _ in range(LAYERS)]
    d_caches = [torch.full((30, PAGE_SIZE, ROW), float("nan"), dtype=torch.bfloat16) for _ in range(LAYERS)]
    p_pages = [4, 17, 0, 9, 12]  # out.kv.page_ids on P
    d_pages = [21, 2, 29, 8, 15]  # r.page_ids on D; the first page is D's cached prefix (skip = 1)

    async def body():
        if kind == "loopback":
            fabric = LoopbackFabric()
            receiver, sender = fabric.receiver(), fabric.sender(checksum=True)
        else:
            pytest.importorskip("ucxx")
            from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender

            receiver, sender = UcxKvReceiver(), UcxKvSender(checksum=True)
        address = await receiver.start()
        try:
            target = KvTarget("r", LeaseKey(1, 1), address, tuple(d_pages), PAGE_SIZE, layout)
            receiver.inbox.expect(Lease.for_target(target, time.monotonic() + 30), EngineKvSink(d_caches))
            skip = target.first_page
            ids = torch.tensor(p_pages[skip:])
            await asyncio.gather(
                *(sender.send(target, l, skip, pack_kv(p_caches[l], ids)) for l in range(LAYERS))
            )
            await receiver.inbox.wait_complete(target.lease, timeout_s=10)
            await receiver.inbox.release(target.lease)
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(asyncio.wait_for(body(), 30))
    for layer in range(LAYERS):
        assert torch.equal(d_caches[layer][d_pages[1:]], p_caches[layer][p_pages[1:]])
        assert d_caches[layer][d_pages[0]].isnan().all()  # the skipped prefix page was not written
