"""The receiver's lease table and chunk state machine (`KvInbox`), shared by the UCX receiver and the loopback
fake. See moemesh/transport/kv.py for the transfer's lifecycle."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moemesh.transport.errors import LeaseRefused
from moemesh.transport.kv import KvSink, Lease, LeaseKey
from moemesh.transport.kv_wire import ChunkHeader, RefusalReason, Segment, plan_segments

log = logging.getLogger(__name__)


class LeaseState(enum.Enum):
    EXPECTING = "expecting"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    EXPIRED = "expired"
    RELEASED = "released"


@dataclass(frozen=True)
class Refusal:
    lease: LeaseKey
    layer: int
    first_page: int
    num_pages: int
    reason: RefusalReason
    message: str


_FREE, _CLAIMED, _LANDED = 0, 1, 2  # a (layer, page) cell of a lease


@dataclass
class _Entry:
    lease: Lease
    sink: KvSink
    deadline_s: float  # the lease's, moved on by transfer progress (Lease.ttl_s)
    state: LeaseState = LeaseState.EXPECTING
    bytes_received: int = 0
    num_landed: int = 0  # cells LANDED; complete when every cell the lease expects is
    inflight: int = 0
    cells: bytearray = field(default_factory=bytearray)  # [num_layers x num_pages]: FREE / CLAIMED / LANDED
    done: asyncio.Event = field(default_factory=asyncio.Event)  # complete, expired or released
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def cell_range(self, header: ChunkHeader) -> list[int]:
        n = len(self.lease.page_ids)
        return [layer * n + page for layer in header.layers
                for page in range(header.first_page, header.first_page + header.num_pages)]  # fmt: skip

    def renew(self, now: float) -> None:
        if self.lease.ttl_s is not None:
            self.deadline_s = max(self.deadline_s, now + self.lease.ttl_s)


@dataclass(frozen=True)
class LeaseProgress:
    key: LeaseKey
    state: LeaseState
    bytes_received: int
    expected_bytes: int


@dataclass(frozen=True)
class Admission:
    """A chunk the inbox accepted: receive segment i into buffers[i], then call land() or abandon()."""

    header: ChunkHeader
    segments: list[Segment]
    buffers: list[torch.Tensor]
    _entry: _Entry = field(repr=False)


class KvInbox:
    """The receiver's lease table and chunk state machine, shared by the UCX receiver and the loopback fake.
    Single-threaded: call it from the receiver's event loop. `clock` returns seconds (monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, history: int = 4096) -> None:
        self.clock = clock
        self._live: dict[int, _Entry] = {}  # lease_id -> entry (EXPECTING/RECEIVING/COMPLETE)
        self._ended: OrderedDict[LeaseKey, LeaseState] = OrderedDict()  # recent ends, for clear refusals
        self._history = history
        self.refusals: deque[Refusal] = deque(maxlen=256)
        self.bytes_received = 0

    # -- D's side --------------------------------------------------------------------------------------------

    def expect(self, lease: Lease, sink: KvSink) -> None:
        """Opens a lease for writes. A lease id may be reused only with a newer generation."""
        old = self._live.get(lease.key.lease_id)
        if old is not None:
            raise ValueError(f"lease {lease.key.lease_id} is live as {old.lease.key}; release it first")
        if lease.key in self._ended:  # a late write of the old lease would be taken for the new one
            raise ValueError(
                f"lease {lease.key} was used before; reuse a lease id only with a new generation"
            )
        if lease.first_page > len(lease.page_ids):
            raise ValueError(f"first_page={lease.first_page} is past the lease's {len(lease.page_ids)} pages")
        entry = _Entry(
            lease, sink, lease.deadline_s, cells=bytearray(lease.layout.num_layers * len(lease.page_ids))
        )
        entry.drained.set()
        if lease.num_pages_expected == 0:
            entry.state = LeaseState.COMPLETE
            entry.done.set()
        self._live[lease.key.lease_id] = entry

    async def release(self, key: LeaseKey) -> LeaseProgress:
        """Ends the lease (done, cancelled or expired): later writes are refused. Returns once no write into
        it is in flight any more, so its pages may be reused."""
        entry = self._entry(key)
        if entry is None:
            raise KeyError(f"lease {key} is not live")
        del self._live[key.lease_id]
        self._end(key, LeaseState.RELEASED)
        progress = self._progress(entry)
        entry.state = LeaseState.RELEASED
        entry.done.set()
        await entry.drained.wait()
        return progress

    def expire(self) -> list[LeaseKey]:
        """Moves every EXPECTING/RECEIVING lease past its deadline to EXPIRED (writes refused; D still has to
        release() it). Returns the keys that expired now."""
        now = self.clock()
        expired = []
        for entry in self._live.values():
            if entry.state in (LeaseState.EXPECTING, LeaseState.RECEIVING) and now > entry.deadline_s:
                entry.state = LeaseState.EXPIRED
                entry.done.set()
                expired.append(entry.lease.key)
        return expired

    async def wait_complete(self, key: LeaseKey, timeout_s: float | None = None) -> LeaseProgress:
        """Waits until every page of every layer of the lease has landed. Raises LeaseRefused when it expired or was
        released first, TimeoutError after timeout_s."""
        entry = self._entry(key)
        if entry is None:
            raise KeyError(f"lease {key} is not live")
        await asyncio.wait_for(entry.done.wait(), timeout_s)
        if entry.state is not LeaseState.COMPLETE:
            raise LeaseRefused(f"lease {key} ended {entry.state.value} after {entry.bytes_received} of "
                               f"{entry.lease.expected_bytes} bytes")  # fmt: skip
        return self._progress(entry)

    def progress(self, key: LeaseKey) -> LeaseProgress:
        entry = self._entry(key)
        if entry is None:
            raise KeyError(f"lease {key} is not live")
        return self._progress(entry)

    @property
    def num_live(self) -> int:
        return len(self._live)

    # -- the transport's side ------------------------------------------------------------------------------

    def admit(self, header: ChunkHeader) -> Admission:
        """Checks a chunk header (before anything is allocated); returns where to receive it. Raises
        LeaseRefused (logged) otherwise. Its cells are claimed: a second write of a page is refused."""
        entry = self._check(header)
        lease = entry.lease
        page_ids = lease.page_ids[header.first_page : header.first_page + header.num_pages]
        segments = plan_segments(page_ids, header.num_layers, lease.layout.page_bytes)
        if len(segments) != header.num_segments:
            raise self._refuse(header, RefusalReason.BAD_HEADER,
                               f"{header.num_segments} segments announced, the pages make {len(segments)}")  # fmt: skip
        cells = entry.cell_range(header)
        if any(entry.cells[c] != _FREE for c in cells):
            raise self._refuse(header, RefusalReason.OUT_OF_RANGE, "pages already written or being written")
        try:
            buffers = entry.sink.buffers_for(lease, header, segments)
        except Exception as err:
            log.exception("KV sink failed to give a buffer")
            raise self._refuse(header, RefusalReason.RECEIVER_ERROR, f"buffer_for failed: {err}") from err
        for seg, buffer in zip(segments, buffers, strict=True):
            if buffer.dtype != torch.uint8 or buffer.numel() != seg.num_bytes or not buffer.is_contiguous():
                entry.sink.abandon(buffers)
                why = f"sink gave {buffer.numel()} {buffer.dtype} elements, need {seg.num_bytes} uint8"
                raise self._refuse(header, RefusalReason.RECEIVER_ERROR, why)
        for c in cells:
            entry.cells[c] = _CLAIMED
        entry.state = LeaseState.RECEIVING
        entry.renew(self.clock())
        entry.inflight += 1
        entry.drained.clear()
        return Admission(header, segments, buffers, entry)

    def land(self, admission: Admission) -> None:
        """The bytes are in admission.buffers: checks the lease again (it may have ended meanwhile), verifies
        the checksum and commits. Raises LeaseRefused (logged) when the chunk must be dropped."""
        header = admission.header
        committed = False
        try:
            entry = self._check(header, claimed=True)
            if entry is not admission._entry:
                raise self._refuse(header, RefusalReason.STALE_GENERATION, "the lease was replaced mid-write")
            if header.checksum is not None and _crc(admission.buffers) != header.checksum:
                raise self._refuse(header, RefusalReason.CHECKSUM, "bytes received do not match the checksum")
            try:
                entry.sink.commit(entry.lease, header, admission.segments, admission.buffers)
                committed = True
            except Exception as err:
                log.exception("KV sink failed to commit")
                raise self._refuse(header, RefusalReason.RECEIVER_ERROR, f"commit failed: {err}") from err
            for c in entry.cell_range(header):
                entry.cells[c] = _LANDED
            entry.num_landed += len(header.layers) * header.num_pages
            entry.bytes_received += header.num_bytes
            self.bytes_received += header.num_bytes
            entry.renew(self.clock())
            if entry.num_landed >= entry.lease.num_pages_expected:
                entry.state = LeaseState.COMPLETE
                entry.done.set()
        finally:
            if not committed:
                admission._entry.sink.abandon(admission.buffers)
            self.abandon(admission, sink=False)

    def abandon(self, admission: Admission, sink: bool = True) -> None:
        """The chunk is finished with (landed, refused, or its receive failed): unclaimed cells are free."""
        entry = admission._entry
        if sink:
            entry.sink.abandon(admission.buffers)
        for c in entry.cell_range(admission.header):
            if entry.cells[c] == _CLAIMED:
                entry.cells[c] = _FREE
        entry.inflight -= 1
        if entry.inflight == 0:
            entry.drained.set()

    # -- internals -----------------------------------------------------------------------------------------

    def _entry(self, key: LeaseKey) -> _Entry | None:
        entry = self._live.get(key.lease_id)
        return entry if entry is not None and entry.lease.key == key else None

    def _check(self, header: ChunkHeader, claimed: bool = False) -> _Entry:
        key = header.lease
        entry = self._live.get(key.lease_id)
        if entry is not None and entry.lease.key != key:
            live = entry.lease.key.generation
            raise self._refuse(
                header, RefusalReason.STALE_GENERATION, f"the lease is live as generation {live}"
            )
        if entry is None:
            if self._ended.get(key) is LeaseState.RELEASED:
                raise self._refuse(header, RefusalReason.RELEASED, "the lease was released")
            raise self._refuse(header, RefusalReason.UNKNOWN_LEASE, "no such lease")
        lease = entry.lease
        if header.token != lease.token:
            raise self._refuse(header, RefusalReason.BAD_TOKEN, "the chunk does not carry the lease's token")
        if entry.state is LeaseState.EXPIRED or self.clock() > entry.deadline_s:
            if entry.state is not LeaseState.COMPLETE:
                entry.state = LeaseState.EXPIRED
                entry.done.set()
            raise self._refuse(
                header, RefusalReason.EXPIRED, f"the lease expired (deadline {entry.deadline_s:.3f})"
            )
        if entry.state is LeaseState.COMPLETE and not claimed:
            raise self._refuse(header, RefusalReason.OUT_OF_RANGE, "the lease already has all its pages")
        num_layers = lease.layout.num_layers
        if header.num_layers < 1 or not 0 <= header.layer <= header.layer + header.num_layers <= num_layers:
            raise self._refuse(header, RefusalReason.OUT_OF_RANGE,
                               f"layers [{header.layer}, {header.layer + header.num_layers}) of {num_layers}")  # fmt: skip
        end = header.first_page + header.num_pages
        if header.num_pages < 1 or header.first_page < lease.first_page or end > len(lease.page_ids):
            raise self._refuse(header, RefusalReason.OUT_OF_RANGE,
                               f"pages [{header.first_page}, {end}) outside [{lease.first_page}, {len(lease.page_ids)})")  # fmt: skip
        if header.num_bytes != header.num_layers * header.num_pages * lease.layout.page_bytes:
            raise self._refuse(header, RefusalReason.BAD_SIZE, f"{header.num_bytes} bytes for {header.num_layers} "
                               f"layers x {header.num_pages} pages of {lease.layout.page_bytes}")  # fmt: skip
        return entry

    def _refuse(self, header: ChunkHeader, reason: RefusalReason, why: str) -> LeaseRefused:
        refusal = Refusal(header.lease, header.layer, header.first_page, header.num_pages, reason, why)
        self.refusals.append(refusal)
        message = (f"refused KV write to lease {header.lease} (layer {header.layer}, pages [{header.first_page}, "
                   f"{header.first_page + header.num_pages})): {reason.name}: {why}")  # fmt: skip
        log.warning(message)
        return LeaseRefused(message, reason)

    def _end(self, key: LeaseKey, state: LeaseState) -> None:
        self._ended[key] = state
        while len(self._ended) > self._history:
            self._ended.popitem(last=False)

    def deadline(self, key: LeaseKey) -> float:
        """The lease's current deadline (moved on by progress)."""
        entry = self._entry(key)
        if entry is None:
            raise KeyError(f"lease {key} is not live")
        return entry.deadline_s

    @staticmethod
    def _progress(entry: _Entry) -> LeaseProgress:
        return LeaseProgress(entry.lease.key, entry.state, entry.bytes_received, entry.lease.expected_bytes)


def _crc(buffers: list[torch.Tensor]) -> int:
    """crc32 over the buffers in order (= over the chunk's payload, since segments partition it in order)."""
    value = 0
    for buffer in buffers:
        value = zlib.crc32(
            buffer.cpu().numpy().tobytes() if buffer.is_cuda else memoryview(buffer.numpy()), value
        )
    return value
