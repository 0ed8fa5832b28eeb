"""D's KV leases over real UCX (in one process, the decode service's own parts on a tiny engine): the reaper
ends a lease past its deadline and returns its pages; a late write to it is refused and logged; a write in
time lands byte for byte in the engine's pages."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from moemesh.config.engine import EngineConfig
from moemesh.config.mesh import WorkerConfig
from moemesh.services.decode.leases import LeaseTable
from moemesh.services.engine_loop import EngineLoop, load_engine
from moemesh.transport.errors import LeaseRefused
from tests.integration.mesh_tiny import build_tiny

pytest.importorskip("ucxx")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tiny = build_tiny(tmp_path_factory.mktemp("tiny-leases"))
    config = WorkerConfig(role="decode", worker_id="decode-t", model=str(tiny), dtype="float32",
                          engine=EngineConfig(page_size=8, num_kv_pages=64))  # fmt: skip
    return load_engine(config)


def test_expired_lease_is_reaped_and_a_late_write_is_refused_and_logged(loaded, caplog):
    from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender

    engine = loaded.engine
    layout = loaded.kv_layout

    async def body():
        receiver, sender = UcxKvReceiver(), UcxKvSender(checksum=True, timeout_s=10)
        await receiver.start()
        loop = EngineLoop(engine)
        leases = LeaseTable(loop, receiver, layout, ttl_s=0.5)
        try:
            baseline = engine.stats()["pages_leased"]
            reservation = await loop.call(engine.reserve_kv, "late", list(range(1, 20)))  # 3 pages of 8
            lease = leases.open(reservation)
            await sender.connect(receiver.address)
            pages = torch.randn(3, layout.page_size, engine.kv_caches[0].shape[2])  # one layer's pages
            assert await sender.send(lease.target, 0, 0, pages) == pages.numel() * 4  # in time: lands
            landed = engine.kv_caches[0][list(reservation.page_ids)]
            assert torch.equal(landed, pages)
            assert engine.stats()["pages_leased"] == baseline + 3
            reaper = asyncio.ensure_future(leases.reap(0.05))
            await asyncio.sleep(0.8)  # past the deadline: the reaper expires and closes it
            assert leases.num_reaped == 1 and lease.ended and receiver.inbox.num_live == 0
            assert engine.stats()["pages_leased"] == baseline  # pages back in the pool
            with pytest.raises(LeaseRefused, match="refused KV write to lease 1/g1 .*(RELEASED|EXPIRED)"):
                await sender.send(lease.target, 1, 0, pages)
            assert [r.lease for r in receiver.inbox.refusals] == [lease.key]
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        finally:
            await sender.close()
            await receiver.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(body(), 60))
    assert "lease 1/g1 of late expired; reaping it" in caplog.text
    assert "refused KV write to lease 1/g1" in caplog.text
