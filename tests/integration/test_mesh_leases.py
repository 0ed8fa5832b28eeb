"""D's KV leases over real UCX (in one process, the decode service's own parts on a tiny engine): the reaper
ends a lease past its deadline and returns its pages; a late write to it is refused and logged; a write in
time lands byte for byte in the engine's pages."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import pytest
import torch

from moemesh.config.engine import EngineConfig
from moemesh.config.mesh import WorkerConfig
from moemesh.services.decode.leases import LeaseTable
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.model_loading import load_engine
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
        leases = LeaseTable(loop, receiver, layout, ttl_s=2.0)
        try:
            baseline = engine.stats()["pages_leased"]
            reservation = await loop.call(engine.reserve_kv, "late", list(range(1, 20)))  # 3 pages of 8
            lease = leases.open(reservation)
            opened = time.monotonic()
            await sender.connect(receiver.address)
            pages = torch.randn(3, layout.page_size, engine.kv_caches[0].shape[2])  # one layer's pages
            assert await sender.send(lease.target, 0, 0, pages) == pages.numel() * 4  # in time: lands
            landed = engine.kv_caches[0][list(reservation.page_ids)]
            assert torch.equal(landed, pages)
            assert engine.stats()["pages_leased"] == baseline + 3
            reaper = asyncio.ensure_future(leases.reap(0.05))
            while (
                not lease.ended and time.monotonic() - opened < 30
            ):  # past the deadline: the reaper closes it
                await asyncio.sleep(0.05)
            assert leases.num_reaped == 1 and lease.ended and receiver.inbox.num_live == 0
            assert engine.stats()["pages_leased"] == baseline  # pages back in the pool
            with pytest.raises(
                LeaseRefused, match=f"refused KV write to lease {lease.key} .*(RELEASED|EXPIRED)"
            ):
                await sender.send(lease.target, 1, 0, pages)
            assert [r.lease for r in receiver.inbox.refusals] == [lease.key]
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            keys.append(lease.key)
        finally:
            await sender.close()
            await receiver.close()

    keys = []
    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(body(), 60))
    assert f"lease {keys[0]} of late expired; reaping it" in caplog.text
    assert f"refused KV write to lease {keys[0]}" in caplog.text


def test_a_forged_chunk_is_refused_and_a_hung_sender_is_reaped_after_the_ttl_its_progress_renewed(
    loaded, caplog
):
    """Lease ids and tokens are random; a chunk with the wrong token is refused (logged, pages untouched); each
    chunk that lands renews the lease's ttl; a sender that then hangs loses the lease ttl_s after its last
    chunk, and every page goes back."""
    from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender

    engine, layout = loaded.engine, loaded.kv_layout
    ttl_s = 1.0

    async def body():
        receiver, sender = UcxKvReceiver(), UcxKvSender(timeout_s=10)
        await receiver.start()
        loop = EngineLoop(engine)
        leases = LeaseTable(loop, receiver, layout, ttl_s=ttl_s)
        reaper = asyncio.ensure_future(leases.reap(0.05))
        try:
            baseline = engine.stats()["pages_leased"]
            reservation = await loop.call(engine.reserve_kv, "hung", list(range(1, 20)))  # 3 pages of 8
            lease, other = leases.open(reservation), leases.open(reservation)
            assert lease.key != other.key and lease.target.token != other.target.token
            await other.close()  # (the same pages: only the keys were wanted)
            assert lease.key.lease_id > 2**20  # not a counter
            await sender.connect(receiver.address)
            pages = torch.randn(3, layout.page_size, engine.kv_caches[0].shape[2])
            before = engine.kv_caches[1][list(reservation.page_ids)].clone()
            forged = replace(lease.target, token=lease.target.token ^ 1)
            with pytest.raises(LeaseRefused, match="BAD_TOKEN: the chunk does not carry the lease's token"):
                await sender.send(forged, 1, 0, pages)
            assert torch.equal(engine.kv_caches[1][list(reservation.page_ids)], before)
            opened = time.monotonic()
            await asyncio.sleep(0.7 * ttl_s)
            await sender.send(lease.target, 0, 0, pages)  # progress: the deadline moves to now + ttl_s
            renewed = time.monotonic()
            await asyncio.sleep(opened + 1.3 * ttl_s - time.monotonic())
            assert not lease.ended and receiver.inbox.num_live == 1  # past the first deadline, still live
            while not lease.ended and time.monotonic() < renewed + 10:
                await asyncio.sleep(0.02)  # the sender hangs: no more chunks
            assert lease.ended and time.monotonic() - renewed >= ttl_s
            assert receiver.inbox.num_live == 0 and engine.stats()["pages_leased"] == baseline
        finally:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            await sender.close()
            await receiver.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(body(), 60))
    assert "BAD_TOKEN" in caplog.text and "expired; reaping it" in caplog.text
