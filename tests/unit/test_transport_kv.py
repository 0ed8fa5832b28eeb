"""KV handoff: the lease state machine, through the loopback fake and through real ucxx endpoints over
loopback TCP (same scenarios, same results), with checksums on every chunk."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
import torch

from moemesh._proto.v1 import worker_pb2
from moemesh.transport.errors import IncompatiblePeer, InvalidArgument, LeaseRefused, Unavailable
from moemesh.transport.kv import Fingerprint, KvLayout, KvTarget, Lease, LeaseKey, PagedKvSink
from moemesh.transport.kv_inbox import LeaseState
from moemesh.transport.kv_loopback import LoopbackFabric
from moemesh.transport.kv_wire import ChunkHeader, RefusalReason, pack_ack, unpack_ack

LAYOUT = KvLayout("bf16", page_size=4, bytes_per_token=12, num_layers=3)  # 6 bf16 per token, 48 B per page
NUM_PAGES = 16
BACKENDS = ["loopback", "ucx"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def new_caches() -> list[torch.Tensor]:
    """D's cache, NaN-poisoned: any page nobody wrote stays NaN."""
    return [torch.full((NUM_PAGES, LAYOUT.page_size, 6), math.nan, dtype=torch.bfloat16) for _ in range(3)]


def prompt_kv(num_pages: int, seed: int) -> torch.Tensor:
    """P's packed KV for one request: [layers, pages, page_size, 6] bf16."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.num_layers, num_pages, LAYOUT.page_size, 6, generator=g).to(torch.bfloat16)


class Pair:
    """A sender and a started receiver of one backend, with D's caches behind a PagedKvSink."""

    def __init__(self, kind: str, clock: FakeClock) -> None:
        self.kind = kind
        self.clock = clock
        self.caches = new_caches()
        self.sink = PagedKvSink(self.caches)
        if kind == "loopback":
            fabric = LoopbackFabric()
            self.receiver = fabric.receiver("d0", clock=clock)
            self.sender = fabric.sender(checksum=True)
        else:
            ucx = pytest.importorskip("ucxx", reason="ucxx is in the [server] extra")
            del ucx
            from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender
            from moemesh.transport.ucx import UcxOptions

            self.receiver = UcxKvReceiver(clock=clock, options=UcxOptions(), recv_timeout_s=10)
            self.sender = UcxKvSender(UcxOptions(), checksum=True, timeout_s=10)

    async def __aenter__(self) -> Pair:
        await self.receiver.start()
        await self.sender.connect(self.receiver.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sender.close()
        await self.receiver.close()

    def lease(
        self, lease_id: int, page_ids, generation: int = 1, skip_pages: int = 0, ttl_s: float = 30
    ) -> KvTarget:
        """D's side of a reservation: opens the lease and returns the KvTarget it would send to P."""
        target = KvTarget(
            request_id=f"r{lease_id}",
            lease=LeaseKey(lease_id, generation),
            address=self.receiver.address,
            page_ids=tuple(page_ids),
            num_skip_tokens=skip_pages * LAYOUT.page_size,
            layout=LAYOUT,
        )
        self.receiver.inbox.expect(Lease.for_target(target, self.clock() + ttl_s), self.sink)
        return target

    async def push(self, target: KvTarget, kv: torch.Tensor, pages_per_chunk: int = 2) -> int:
        return await push(self.sender, target, kv, pages_per_chunk)


async def push(sender, target: KvTarget, kv: torch.Tensor, pages_per_chunk: int = 2) -> int:
    """P's side: every layer, in chunks, all in flight at once."""
    sends = []
    for layer in range(LAYOUT.num_layers):
        for first in range(target.first_page, len(target.page_ids), pages_per_chunk):
            chunk = kv[layer, first : first + pages_per_chunk].contiguous()
            sends.append(sender.send(target, layer, first, chunk))
    return sum(await asyncio.gather(*sends))


def run(kind: str, body) -> None:
    async def main():
        async with Pair(kind, FakeClock()) as pair:
            await body(pair)

    asyncio.run(asyncio.wait_for(main(), 60))


def assert_pages(caches, page_ids, kv, first: int = 0) -> None:
    for layer in range(LAYOUT.num_layers):
        for i, page in enumerate(page_ids):
            if i >= first:
                assert torch.equal(caches[layer][page], kv[layer, i]), f"layer {layer} page {page}"
            else:
                assert caches[layer][page].isnan().all(), f"skipped page {page} was written"


@pytest.mark.parametrize("kind", BACKENDS)
def test_every_layer_lands_in_the_leased_pages_and_nowhere_else(kind):
    async def body(pair: Pair):
        page_ids = [9, 2, 14, 5, 7]  # shuffled, not contiguous
        target = pair.lease(1, page_ids, skip_pages=1)  # page 9 holds a prefix D already had
        kv = prompt_kv(len(page_ids), seed=1)
        sent = await pair.push(target, kv)
        progress = await pair.receiver.inbox.wait_complete(target.lease, timeout_s=10)
        assert sent == progress.bytes_received == progress.expected_bytes == 3 * 4 * LAYOUT.page_bytes
        assert progress.state is LeaseState.COMPLETE
        assert_pages(pair.caches, page_ids, kv, first=1)
        others = [p for p in range(NUM_PAGES) if p not in page_ids]
        assert all(c[others].isnan().all() for c in pair.caches)
        await pair.receiver.inbox.release(target.lease)
        assert pair.receiver.inbox.num_live == 0

    run(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_write_to_an_unknown_lease_is_refused_logged_and_the_connection_still_works(kind, caplog):
    async def body(pair: Pair):
        good = pair.lease(1, [0, 1])
        ghost = KvTarget("r9", LeaseKey(99, 1), pair.receiver.address, (3, 4), 0, LAYOUT)
        with caplog.at_level(logging.WARNING), pytest.raises(LeaseRefused, match="UNKNOWN_LEASE") as info:
            await pair.sender.send(ghost, 0, 0, prompt_kv(2, 2)[0])
        assert info.value.reason == RefusalReason.UNKNOWN_LEASE
        assert "refused KV write to lease 99/g1" in caplog.text
        await pair.push(good, prompt_kv(2, 3))
        await pair.receiver.inbox.wait_complete(good.lease, timeout_s=10)
        assert all(c[[3, 4]].isnan().all() for c in pair.caches)

    run(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_late_write_to_an_expired_lease_is_refused(kind):
    async def body(pair: Pair):
        target = pair.lease(1, [0, 1], ttl_s=5)
        kv = prompt_kv(2, 4)
        await pair.sender.send(target, 0, 0, kv[0].contiguous())  # in time
        pair.clock.now += 6
        with pytest.raises(LeaseRefused, match="EXPIRED"):
            await pair.sender.send(target, 1, 0, kv[1].contiguous())
        with pytest.raises(LeaseRefused, match="expired"):
            await pair.receiver.inbox.wait_complete(target.lease, timeout_s=1)
        assert pair.caches[1][[0, 1]].isnan().all()
        progress = await pair.receiver.inbox.release(target.lease)
        assert progress.bytes_received == 2 * LAYOUT.page_bytes

    run(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_write_naming_the_old_generation_of_a_reused_lease_is_refused(kind):
    async def body(pair: Pair):
        old = pair.lease(7, [4, 5], generation=1)
        await pair.receiver.inbox.release(old.lease)  # cancelled; D reuses the pages under generation 2
        with pytest.raises(ValueError, match="lease 7/g1 was used before"):
            pair.lease(7, [4, 5], generation=1)
        new = pair.lease(7, [4, 5], generation=2)
        with pytest.raises(LeaseRefused, match="STALE_GENERATION") as info:
            await pair.sender.send(old, 0, 0, prompt_kv(2, 5)[0].contiguous())
        assert info.value.reason == RefusalReason.STALE_GENERATION
        kv = prompt_kv(2, 6)
        await pair.push(new, kv)
        await pair.receiver.inbox.wait_complete(new.lease, timeout_s=10)
        assert_pages(pair.caches, [4, 5], kv)
        await pair.receiver.inbox.release(new.lease)
        with pytest.raises(LeaseRefused, match="RELEASED"):
            await pair.sender.send(new, 0, 0, kv[0].contiguous())
        reasons = [r.reason for r in pair.receiver.inbox.refusals]
        assert reasons == [RefusalReason.STALE_GENERATION, RefusalReason.RELEASED]

    run(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_pages_outside_the_lease_are_refused_by_the_receiver(kind):
    async def body(pair: Pair):
        pair.lease(3, [0, 1])
        # P's idea of the lease has a third page that D never leased.
        wider = KvTarget("r3", LeaseKey(3, 1), pair.receiver.address, (0, 1, 2), 0, LAYOUT)
        with pytest.raises(LeaseRefused, match="OUT_OF_RANGE"):
            await pair.sender.send(wider, 0, 1, prompt_kv(2, 7)[0].contiguous())
        assert pair.caches[0][[1, 2]].isnan().all()

    run(kind, body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_large_transfer_arrives_intact(kind):
    async def body(pair: Pair):
        big = KvLayout("bf16", page_size=64, bytes_per_token=1152, num_layers=2)  # 72 KiB pages
        caches = [torch.zeros(40, 64, 576, dtype=torch.bfloat16) for _ in range(2)]
        target = KvTarget("big", LeaseKey(1, 1), pair.receiver.address, tuple(range(39, -1, -1)), 0, big)
        pair.receiver.inbox.expect(Lease.for_target(target, pair.clock() + 30), PagedKvSink(caches))
        kv = torch.randn(2, 40, 64, 576).to(torch.bfloat16)  # 2.9 MB per layer
        await asyncio.gather(*(pair.sender.send(target, layer, 0, kv[layer]) for layer in range(2)))
        await pair.receiver.inbox.wait_complete(target.lease, timeout_s=10)
        for layer in range(2):
            assert torch.equal(caches[layer][list(range(39, -1, -1))], kv[layer])

    run(kind, body)


def test_release_waits_for_a_write_in_flight_and_nothing_lands_after_it():
    async def body(pair: Pair):
        target = pair.lease(1, [0, 1])
        send = asyncio.ensure_future(pair.sender.send(target, 0, 0, prompt_kv(2, 8)[0].contiguous()))
        await asyncio.sleep(0)  # admitted, bytes "on the wire" (straight into pages 0-1: one run)
        progress = await pair.receiver.inbox.release(target.lease)
        after_release = [c.clone() for c in pair.caches]  # the write in flight was finished with by now
        assert progress.bytes_received == 0
        with pytest.raises(LeaseRefused, match="RELEASED"):
            await send
        assert all(
            torch.equal(a.view(torch.int16), c.view(torch.int16))
            for a, c in zip(after_release, pair.caches, strict=True)
        )
        assert pair.caches[1].isnan().all() and pair.caches[0][2:].isnan().all()

    run("loopback", body)


@pytest.mark.parametrize("kind", BACKENDS)
def test_sending_to_an_address_with_no_receiver_is_unavailable(kind):
    async def body(pair: Pair):
        await pair.receiver.close()
        address = pair.receiver.address
        target = KvTarget(
            "r", LeaseKey(1, 1), address if kind == "loopback" else "127.0.0.1:1", (0,), 0, LAYOUT
        )
        with pytest.raises(Unavailable):
            await pair.sender.send(target, 0, 0, prompt_kv(1, 9)[0].contiguous())

    run(kind, body)


def test_the_fake_and_ucx_agree_on_a_mixed_scenario():
    """The same script of good, late, stale and out-of-range writes gives the same caches, the same
    refusals and the same exceptions on both backends."""

    async def script(pair: Pair, outcome: dict):
        a = pair.lease(1, [3, 8, 1], skip_pages=1)
        b = pair.lease(2, [6, 0], ttl_s=5)
        errors = []
        await pair.push(a, prompt_kv(3, 10))
        await pair.sender.send(b, 0, 0, prompt_kv(2, 11)[0].contiguous())
        pair.clock.now += 10
        for target, layer, first in [
            (b, 1, 0),
            (a, 0, 1),
            (KvTarget("x", LeaseKey(2, 9), a.address, (6,), 0, LAYOUT), 0, 0),
        ]:
            try:
                await pair.sender.send(target, layer, first, prompt_kv(1, 12)[0].contiguous())
            except LeaseRefused as err:
                errors.append(RefusalReason(err.reason).name)
        outcome["errors"] = errors
        outcome["refusals"] = [(r.lease, r.layer, r.reason) for r in pair.receiver.inbox.refusals]
        outcome["caches"] = [c.clone() for c in pair.caches]
        outcome["bytes"] = pair.receiver.inbox.bytes_received

    results = {}
    for kind in BACKENDS:
        results[kind] = {}

        async def body(pair, kind=kind):
            await script(pair, results[kind])

        run(kind, body)
    fake, real = results["loopback"], results["ucx"]
    assert fake["errors"] == real["errors"] == ["EXPIRED", "OUT_OF_RANGE", "STALE_GENERATION"]
    assert fake["refusals"] == real["refusals"]
    assert fake["bytes"] == real["bytes"] == (3 * 2 + 2) * LAYOUT.page_bytes
    for f, r in zip(fake["caches"], real["caches"], strict=True):
        assert torch.equal(f.isnan(), r.isnan()) and torch.equal(f.nan_to_num(), r.nan_to_num())


def test_sender_side_checks_catch_a_chunk_that_does_not_fit_before_anything_is_sent():
    async def body(pair: Pair):
        target = pair.lease(1, [0, 1], skip_pages=1)
        kv = prompt_kv(2, 13)
        with pytest.raises(InvalidArgument, match=r"layers \[3, 4\) must lie in \[0, 3\)"):
            await pair.sender.send(target, 3, 1, kv[0, 1:].contiguous())
        with pytest.raises(InvalidArgument, match=r"pages \[0, 1\) must lie in \[1, 2\)"):
            await pair.sender.send(target, 0, 0, kv[0, :1].contiguous())
        with pytest.raises(InvalidArgument, match="multiple of 1 x 48"):
            await pair.sender.send(target, 0, 1, torch.zeros(47, dtype=torch.uint8))
        assert list(pair.receiver.inbox.refusals) == []

    run("loopback", body)


def test_fingerprints_must_match_field_by_field():
    ours = Fingerprint("demo@abc", LAYOUT)
    ours.check_compatible(Fingerprint("demo@abc", LAYOUT))
    theirs = Fingerprint("demo@def", KvLayout("fp8_e4m3", 4, 12, 3))
    with pytest.raises(
        IncompatiblePeer, match=r"model_id 'demo@abc' != 'demo@def'; kv dtype 'bf16' != 'fp8_e4m3'"
    ):
        ours.check_compatible(theirs)
    assert Fingerprint.from_proto(ours.to_proto()) == ours


def test_kv_target_roundtrips_through_the_proto_and_rejects_an_unaligned_skip():
    target = KvTarget("r1", LeaseKey(5, 2), "10.0.0.1:7000", (3, 1, 4), 4, LAYOUT, "00-ab-cd-01", 123)
    msg = worker_pb2.KvTarget.FromString(target.to_proto().SerializeToString())
    assert KvTarget.from_proto(msg) == target
    assert target.first_page == 1
    with pytest.raises(InvalidArgument, match="num_skip_tokens=3 must be a multiple of page_size=4"):
        KvTarget("r1", LeaseKey(5, 2), "a:1", (3, 1), 3, LAYOUT)


def test_header_and_ack_encodings_roundtrip():
    header = ChunkHeader(2**40, LeaseKey(2**63, 7), 60, 3, 9, 2 * 9 * 48, 0xDEADBEEF, 2, 2**64 - 1, 18)
    assert ChunkHeader.unpack(header.pack()) == header
    no_crc = ChunkHeader(1, LeaseKey(1, 1), 0, 0, 1, 48)
    assert ChunkHeader.unpack(no_crc.pack()).checksum is None
    with pytest.raises(ValueError, match="not a KV chunk header"):
        ChunkHeader.unpack(b"x" * len(header.pack()))
    long = "refused " * 100
    transfer, reason, message = unpack_ack(pack_ack(5, RefusalReason.EXPIRED, long))
    assert (
        (transfer, reason) == (5, RefusalReason.EXPIRED) and long.startswith(message) and len(message) > 200
    )


class BrokenSink(PagedKvSink):
    def commit(self, lease, header, segments, buffers):
        raise RuntimeError("cache on fire")


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_failing_sink_refuses_the_write_instead_of_hanging_the_sender(kind, caplog):
    async def body(pair: Pair):
        target = KvTarget("r1", LeaseKey(1, 1), pair.receiver.address, (0, 1), 0, LAYOUT)
        pair.receiver.inbox.expect(Lease.for_target(target, pair.clock() + 30), BrokenSink(pair.caches))
        with (
            caplog.at_level(logging.ERROR),
            pytest.raises(LeaseRefused, match="commit failed: cache on fire"),
        ):
            await pair.sender.send(target, 0, 0, prompt_kv(2, 14)[0].contiguous())
        assert "KV sink failed to commit" in caplog.text
        await pair.receiver.inbox.release(target.lease)  # nothing left in flight

    run(kind, body)


@pytest.mark.parametrize("stuck", ["payload", "ack"])
def test_a_receiver_that_stops_progressing_costs_the_sender_one_timeout_not_a_hang(stuck):
    """D's loop hangs (never takes a rendezvous payload, or never acks): send() raises DeadlineExceeded after
    timeout_s, the endpoint is dropped, and close() returns at once."""
    pytest.importorskip("ucxx")
    from moemesh.transport.errors import DeadlineExceeded
    from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender

    class Stuck(UcxKvReceiver):
        async def _recv_payload(self, ep, header, buffer):
            if stuck == "payload":
                await asyncio.sleep(3600)
            return await super()._recv_payload(ep, header, buffer)

        async def _ack(self, ep, header, reason, message):
            if stuck == "ack":
                await asyncio.sleep(3600)

    async def body():
        layout = KvLayout("bf16", page_size=4, bytes_per_token=1 << 16, num_layers=1)  # 256 KiB: rendezvous
        receiver, sender = Stuck(), UcxKvSender(timeout_s=0.5)
        address = await receiver.start()
        target = KvTarget("r", LeaseKey(1, 1), address, (0,), 0, layout)
        caches = [torch.zeros(1, 4, 1 << 15, dtype=torch.bfloat16)]
        receiver.inbox.expect(Lease.for_target(target, 1e12), PagedKvSink(caches))
        start = asyncio.get_running_loop().time()
        with pytest.raises(DeadlineExceeded, match="not acknowledged after 0.5 s"):
            await sender.send(target, 0, 0, torch.ones(1 << 18, dtype=torch.uint8))
        await sender.close()
        assert asyncio.get_running_loop().time() - start < 5
        await receiver.close()

    asyncio.run(asyncio.wait_for(body(), 30))


@pytest.mark.parametrize("kind", BACKENDS)
def test_two_senders_with_colliding_transfer_ids_write_to_one_receiver_at_once(kind):
    """Two prefill workers number their chunks from 1 alike; the receiver keeps them apart (ucxx scopes tags
    to the endpoint)."""

    async def body(pair: Pair):
        if kind == "loopback":
            other = pair.sender.fabric.sender(checksum=True)
        else:
            from moemesh.transport.kv_ucx import UcxKvSender

            other = UcxKvSender(checksum=True, timeout_s=10)
        await other.connect(pair.receiver.address)
        try:
            a, b = pair.lease(1, [0, 2, 4, 6]), pair.lease(2, [1, 3, 5, 7])
            kv_a, kv_b = prompt_kv(4, 20), prompt_kv(4, 21)
            await asyncio.gather(push(pair.sender, a, kv_a, 1), push(other, b, kv_b, 1))
            for target in (a, b):
                await pair.receiver.inbox.wait_complete(target.lease, timeout_s=10)
            assert_pages(pair.caches, [0, 2, 4, 6], kv_a)
            assert_pages(pair.caches, [1, 3, 5, 7], kv_b)
        finally:
            await other.close()

    run(kind, body)
