"""D's KV leases: pages reserved in the engine, opened in the KV receiver's inbox, ended exactly once.

    lease = await table.open(reservation)           # reserve_kv done by the caller; inbox.expect here
    ... P writes into lease.target's pages ...
    await lease.adopt(lambda: engine.add_prefilled(...))   # all bytes landed: inbox lease ended, pages adopted
    # or, on failure / cancel / expiry:
    await lease.close()                               # inbox lease ended (late writes refused), pages freed

Both run to their end once begun, even when their caller is cancelled (`engine_commands.finish`), and free the
pages through must-run engine commands: a lease's pages are adopted or returned, never left reserved.

`close()` ends the inbox lease first — `KvInbox.release` returns only when no write is in flight and refuses
every later one — and only then returns the pages to the pool, so a late write can never land in a reused
page. The reaper (`LeaseTable.reap`) closes leases past their deadline that nobody closed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moemesh.engine.engine import KvReservation
from moemesh.kernels import unpack_kv
from moemesh.services.engine_commands import finish
from moemesh.services.engine_loop import EngineLoop
from moemesh.transport.errors import LeaseRefused
from moemesh.transport.kv import KvLayout, KvReceiver, KvTarget, Lease, LeaseKey, PagedKvSink

log = logging.getLogger(__name__)


class EngineKvSink(PagedKvSink):
    """`PagedKvSink` over the engine's per-layer caches `[num_pages, page_size, kv_dim]` whose scatter is the
    `unpack_kv` kernel (transport may not import kernels, so the plain index_copy_ stays there)."""

    def scatter_layers(self, caches: list[torch.Tensor], index: torch.Tensor, rows: torch.Tensor) -> None:
        """One launch for every layer of the chunk (`unpack_kv` over the list of caches)."""
        unpack_kv(
            rows.view(caches[0].dtype).view(len(caches), rows.shape[1], *caches[0].shape[1:]), caches, index
        )


@dataclass(eq=False)
class OpenLease:
    """Ends exactly once: `adopt` (the engine takes the pages) or `close` (they return to the pool). Once either
    has begun it runs to its end whatever happens to its caller, so no cancellation leaves the pages held."""

    table: LeaseTable
    reservation: KvReservation
    target: KvTarget
    deadline_s: float  # time.monotonic()
    ended: bool = False  # the inbox lease is released: no write lands any more
    settled: bool = False  # the pages left the lease: adopted by the engine or returned to the pool
    adopted: bool = False  # the engine owns the pages now
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> LeaseKey:
        return self.target.lease

    async def adopt(self, add: Callable[[], object]) -> float:
        """Every byte landed: end the inbox lease, then hand the pages to the engine (`add`, on its thread).
        Returns when `add` ran there (time.monotonic()). Raises LeaseRefused when the lease was closed meanwhile
        (the reaper); when `add` raises, the pages return to the pool and its error is raised."""
        async with self._lock:
            if self.settled:
                raise LeaseRefused(f"lease {self.key} of {self.reservation.request_id} was closed")
            return await finish(self._adopt(add))

    async def close(self) -> None:
        """Idempotent: end the inbox lease (waits for in-flight writes), then free the pages."""
        async with self._lock:
            if not self.settled:
                await finish(self._free())

    async def _adopt(self, add: Callable[[], object]) -> float:
        await self._end()
        try:
            _, added_s = await self.table.loop.must_run_at(add)
        except BaseException:
            await self._free()
            raise
        self.settled = self.adopted = True
        return added_s

    async def _free(self) -> None:
        await self._end()
        await self.table.loop.must_run(self.table.loop.engine.cancel_reservation, self.reservation)
        self.settled = True

    async def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.table.leases.pop(self.key, None)
            await self.table.receiver.inbox.release(self.key)


class LeaseTable:
    """Lease ids and tokens are random (62 and 64 bits, `secrets`: no sender can guess another lease's), under
    generation 1. A lease accepts writes for `ttl_s` (lease_ttl_s), renewed by every chunk admitted or landed:
    a prefill worker that hangs pins its pages for at most ttl_s, then the reaper closes the lease."""

    def __init__(self, loop: EngineLoop, receiver: KvReceiver, layout: KvLayout, ttl_s: float) -> None:
        self.loop = loop
        self.receiver = receiver
        self.layout = layout
        self.ttl_s = ttl_s
        self.sink = EngineKvSink(loop.engine.kv_caches)
        self.leases: dict[LeaseKey, OpenLease] = {}
        self.num_reaped = 0

    def open(self, reservation: KvReservation) -> OpenLease:
        """A lease over the reservation's pages, accepting writes for ttl_s from now (renewed by progress)."""
        key = LeaseKey(secrets.randbits(62) + 1, 1)
        while key in self.leases:
            key = LeaseKey(secrets.randbits(62) + 1, 1)
        deadline_s = time.monotonic() + self.ttl_s
        target = KvTarget(
            reservation.request_id, key, self.receiver.address, reservation.page_ids,
            reservation.num_cached_tokens, self.layout,
            lease_deadline_unix_ms=int((time.time() + self.ttl_s) * 1000), token=secrets.randbits(64),
        )  # fmt: skip
        self.receiver.inbox.expect(Lease.for_target(target, deadline_s, self.ttl_s), self.sink)
        lease = OpenLease(self, reservation, target, deadline_s)
        self.leases[key] = lease
        return lease

    async def reap(self, interval_s: float) -> None:
        """Forever: expire leases past their deadline in the inbox (writes refused from now on) and close
        them (pages back to the pool) unless their request already did."""
        while True:
            await asyncio.sleep(interval_s)
            expired = self.receiver.inbox.expire()
            for key in expired:
                lease = self.leases.get(key)
                if lease is not None:
                    log.warning("lease %s of %s expired; reaping it", key, lease.reservation.request_id)
                    self.num_reaped += 1
                    await lease.close()
