"""KV handoff, the part both transports share: the dataclasses of a transfer, the chunk header on the wire,
the receiver's lease table (`KvInbox`), and the Protocols the UCX transport and the loopback fake satisfy.

A transfer, D = decode worker (receiver), P = prefill worker (sender):

1. D reserves pages and opens a lease: `receiver.expect(Lease(key, page_ids, ...), sink)`; it sends P a
   `KvTarget` naming the lease (id + generation), its UCX address and the page ids.
2. P, per layer (and per prompt chunk), packs the new pages into one contiguous tensor `[n, page_bytes]`
   and calls `sender.send(target, layer, first_page, pages)`: a `ChunkHeader` goes first, then the bytes.
3. D checks the header against the lease table (live? this generation? before the deadline? pages and layer
   in range? size right?), receives into `sink.buffer_for(...)`, checks the lease again, and
   `sink.commit(...)`s (scatters into its pages). Then it acks; P's send() returns, or raises LeaseRefused.
4. When every byte of the lease has landed, `await receiver.wait_complete(key)` returns. D ends the lease
   with `await receiver.release(key)` (done, cancelled or expired): later writes are refused and logged,
   and release() returns only when no write into the lease is still in flight, so D may reuse the pages.

Lease states on D:  EXPECTING -> RECEIVING -> COMPLETE;  any -> RELEASED;  EXPECTING/RECEIVING -> EXPIRED.
Only EXPECTING and RECEIVING accept writes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moemesh._proto.v1 import worker_pb2
from moemesh.transport.errors import IncompatiblePeer, InvalidArgument, LeaseRefused

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
_DTYPES = {
    "bf16": worker_pb2.KV_DTYPE_BF16,
    "fp8_e4m3": worker_pb2.KV_DTYPE_FP8_E4M3,
    "fp32": worker_pb2.KV_DTYPE_FP32,
}


@dataclass(frozen=True)
class KvLayout:
    """One worker's paged latent KV cache layout; two workers exchange KV only when theirs are equal."""

    dtype: str  # "bf16" | "fp8_e4m3" | "fp32"
    page_size: int  # tokens per page
    bytes_per_token: int  # per layer, e.g. 576 * 2 for bf16 at DeepSeek-V3 shapes
    num_layers: int

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(_DTYPES)}")
        for name in ("page_size", "bytes_per_token", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.bytes_per_token

    def to_proto(self) -> worker_pb2.KvLayout:
        return worker_pb2.KvLayout(
            dtype=_DTYPES[self.dtype],
            page_size=self.page_size,
            bytes_per_token=self.bytes_per_token,
            num_layers=self.num_layers,
        )

    @classmethod
    def from_proto(cls, msg: worker_pb2.KvLayout) -> KvLayout:
        names = {v: k for k, v in _DTYPES.items()}
        if msg.dtype not in names:
            raise InvalidArgument(f"layout.dtype={worker_pb2.KvDtype.Name(msg.dtype)} is not supported")
        return cls(names[msg.dtype], msg.page_size, msg.bytes_per_token, msg.num_layers)


@dataclass(frozen=True)
class Fingerprint:
    """What must match before two workers exchange KV (DESIGN §1 handshake rules)."""

    model_id: str
    layout: KvLayout
    protocol_version: int = PROTOCOL_VERSION

    def check_compatible(self, peer: Fingerprint, peer_name: str = "peer") -> None:
        """Raises IncompatiblePeer naming every field that differs."""
        diffs = []
        if self.model_id != peer.model_id:
            diffs.append(f"model_id {self.model_id!r} != {peer.model_id!r}")
        if self.protocol_version != peer.protocol_version:
            diffs.append(f"protocol_version {self.protocol_version} != {peer.protocol_version}")
        for name in ("dtype", "page_size", "bytes_per_token", "num_layers"):
            mine, theirs = getattr(self.layout, name), getattr(peer.layout, name)
            if mine != theirs:
                diffs.append(f"kv {name} {mine!r} != {theirs!r}")
        if diffs:
            raise IncompatiblePeer(f"{peer_name} is incompatible (ours != theirs): " + "; ".join(diffs))

    def to_proto(self) -> worker_pb2.Fingerprint:
        return worker_pb2.Fingerprint(
            model_id=self.model_id, kv_layout=self.layout.to_proto(), protocol_version=self.protocol_version
        )

    @classmethod
    def from_proto(cls, msg: worker_pb2.Fingerprint) -> Fingerprint:
        return cls(msg.model_id, KvLayout.from_proto(msg.kv_layout), msg.protocol_version)


@dataclass(frozen=True, order=True)
class LeaseKey:
    lease_id: int
    generation: int

    def __str__(self) -> str:
        return f"{self.lease_id}/g{self.generation}"


@dataclass(frozen=True)
class KvTarget:
    """Where P writes one request's KV (the proto KvTarget as a dataclass)."""

    request_id: str
    lease: LeaseKey
    address: str  # D's UCX listener "host:port" (or a loopback name)
    page_ids: tuple[int, ...]  # D's pages in token order, covering the whole prompt
    num_skip_tokens: int  # prefix already on D; page aligned
    layout: KvLayout
    traceparent: str = ""
    lease_deadline_unix_ms: int = 0

    def __post_init__(self) -> None:
        if self.num_skip_tokens % self.layout.page_size:
            raise InvalidArgument(
                f"num_skip_tokens={self.num_skip_tokens} must be a multiple of page_size={self.layout.page_size}"
            )
        if self.first_page > len(self.page_ids):
            raise InvalidArgument(
                f"num_skip_tokens={self.num_skip_tokens} skips past {len(self.page_ids)} pages"
            )

    @property
    def first_page(self) -> int:
        """Index into page_ids of the first page P sends."""
        return self.num_skip_tokens // self.layout.page_size

    def to_proto(self) -> worker_pb2.KvTarget:
        return worker_pb2.KvTarget(
            request_id=self.request_id,
            lease_id=self.lease.lease_id,
            lease_generation=self.lease.generation,
            ucx_address=self.address,
            page_ids=list(self.page_ids),
            num_skip_tokens=self.num_skip_tokens,
            layout=self.layout.to_proto(),
            traceparent=self.traceparent,
            lease_deadline_unix_ms=self.lease_deadline_unix_ms,
        )

    @classmethod
    def from_proto(cls, msg: worker_pb2.KvTarget) -> KvTarget:
        return cls(
            request_id=msg.request_id,
            lease=LeaseKey(msg.lease_id, msg.lease_generation),
            address=msg.ucx_address,
            page_ids=tuple(msg.page_ids),
            num_skip_tokens=msg.num_skip_tokens,
            layout=KvLayout.from_proto(msg.layout),
            traceparent=msg.traceparent,
            lease_deadline_unix_ms=msg.lease_deadline_unix_ms,
        )


@dataclass(frozen=True)
class Lease:
    """D's side of a reservation: which pages a lease covers and until when writes are accepted."""

    key: LeaseKey
    request_id: str
    page_ids: tuple[int, ...]
    layout: KvLayout
    deadline_s: float  # on the receiver's clock (time.monotonic unless injected)
    first_page: int = 0  # pages before this index are already on D and are not written

    @property
    def expected_bytes(self) -> int:
        return self.layout.num_layers * (len(self.page_ids) - self.first_page) * self.layout.page_bytes

    @classmethod
    def for_target(cls, target: KvTarget, deadline_s: float) -> Lease:
        return cls(
            target.lease, target.request_id, target.page_ids, target.layout, deadline_s, target.first_page
        )


# --- the wire ---------------------------------------------------------------------------------------------

_HEADER = struct.Struct(
    "<4sHHQQQIIIQI"
)  # magic, version, flags, transfer, lease, gen, layer, first, n, bytes, crc
_ACK = struct.Struct("<QIH")  # transfer id, RefusalReason (0 = accepted), message length; then the message
HEADER_BYTES = _HEADER.size
ACK_BYTES = 256
_MAGIC = b"MMKV"
_FLAG_CHECKSUM = 1


class RefusalReason(enum.IntEnum):
    ACCEPTED = 0
    UNKNOWN_LEASE = 1
    STALE_GENERATION = 2  # the lease id is live under another generation: the pages were reused
    EXPIRED = 3
    RELEASED = 4
    OUT_OF_RANGE = 5  # layer or pages outside the lease
    BAD_SIZE = 6
    CHECKSUM = 7
    BAD_HEADER = 8
    RECEIVER_ERROR = 9  # the sink failed to give a buffer or to commit (a bug on D; logged there)


@dataclass(frozen=True)
class ChunkHeader:
    """Precedes each chunk's bytes: pages [first_page, first_page + num_pages) of the lease's page list, one
    layer, `num_bytes` = num_pages * page_bytes. checksum is crc32 of the bytes, or None when not sent."""

    transfer_id: int
    lease: LeaseKey
    layer: int
    first_page: int
    num_pages: int
    num_bytes: int
    checksum: int | None = None

    def pack(self) -> bytes:
        flags = _FLAG_CHECKSUM if self.checksum is not None else 0
        return _HEADER.pack(
            _MAGIC, PROTOCOL_VERSION, flags, self.transfer_id, self.lease.lease_id, self.lease.generation,
            self.layer, self.first_page, self.num_pages, self.num_bytes, self.checksum or 0,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes) -> ChunkHeader:
        magic, version, flags, xfer, lease, gen, layer, first, n, nbytes, crc = _HEADER.unpack(data)
        if magic != _MAGIC or version != PROTOCOL_VERSION:
            raise ValueError(f"not a KV chunk header (magic={magic!r}, version={version})")
        return cls(
            xfer, LeaseKey(lease, gen), layer, first, n, nbytes, crc if flags & _FLAG_CHECKSUM else None
        )


def pack_ack(transfer_id: int, reason: RefusalReason, message: str = "") -> bytes:
    """A fixed ACK_BYTES reply: accepted, or refused with the receiver's message (cut to fit)."""
    text = message.encode()[: ACK_BYTES - _ACK.size]
    return (_ACK.pack(transfer_id, int(reason), len(text)) + text).ljust(ACK_BYTES, b"\0")


def unpack_ack(data: bytes) -> tuple[int, RefusalReason, str]:
    transfer_id, reason, length = _ACK.unpack_from(data)
    message = bytes(data[_ACK.size : _ACK.size + length]).decode(errors="replace")
    return transfer_id, RefusalReason(reason), message


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, CPU or GPU) — what goes on the wire."""
    if not tensor.is_contiguous():
        raise ValueError(f"KV pages must be contiguous, got strides {tensor.stride()}")
    return tensor.reshape(-1).view(torch.uint8)


def crc32(data: torch.Tensor) -> int:
    """crc32 of a uint8 tensor's bytes (copied to the host when on a GPU: tests and debugging only)."""
    return zlib.crc32(data.cpu().numpy().tobytes() if data.device.type != "cpu" else memoryview(data.numpy()))


def make_header(
    target: KvTarget, layer: int, first_page: int, pages: torch.Tensor, transfer_id: int, checksum: bool
) -> tuple[ChunkHeader, torch.Tensor]:
    """Checks a chunk on the sender's side; returns its header and its bytes."""
    data = as_bytes(pages)
    layout = target.layout
    if not 0 <= layer < layout.num_layers:
        raise InvalidArgument(f"layer={layer} must be in [0, {layout.num_layers})")
    if data.numel() == 0 or data.numel() % layout.page_bytes:
        raise InvalidArgument(
            f"chunk of {data.numel()} bytes must be a positive multiple of {layout.page_bytes}"
        )
    num_pages = data.numel() // layout.page_bytes
    if first_page < target.first_page or first_page + num_pages > len(target.page_ids):
        raise InvalidArgument(
            f"pages [{first_page}, {first_page + num_pages}) must lie in [{target.first_page}, "
            f"{len(target.page_ids)}) for lease {target.lease}"
        )
    crc = crc32(data) if checksum else None
    return ChunkHeader(transfer_id, target.lease, layer, first_page, num_pages, data.numel(), crc), data


# --- the receiver's lease table -------------------------------------------------------------------------


class LeaseState(enum.Enum):
    EXPECTING = "expecting"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    EXPIRED = "expired"
    RELEASED = "released"


class KvSink(Protocol):
    """Where received bytes go; D's service provides it (the engine's cache + an unpack kernel)."""

    def buffer_for(self, lease: Lease, header: ChunkHeader) -> torch.Tensor:
        """A contiguous uint8 tensor of header.num_bytes to receive into (staging, or the pages themselves)."""
        ...

    def commit(self, lease: Lease, header: ChunkHeader, buffer: torch.Tensor) -> None:
        """The bytes have arrived and the lease is still live: make them the pages' content."""
        ...


class PagedKvSink:
    """A KvSink over per-layer caches `[num_pages, page_size, ...]` (any dtype): receives into a staging
    buffer on the cache's device, then index_copy_ into the lease's pages."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        self.caches = caches

    def buffer_for(self, lease: Lease, header: ChunkHeader) -> torch.Tensor:
        return torch.empty(header.num_bytes, dtype=torch.uint8, device=self.caches[header.layer].device)

    def commit(self, lease: Lease, header: ChunkHeader, buffer: torch.Tensor) -> None:
        cache = self.caches[header.layer]
        pages = cache.view(cache.shape[0], -1).view(torch.uint8)  # [num_pages, page_bytes]
        ids = lease.page_ids[header.first_page : header.first_page + header.num_pages]
        index = torch.tensor(ids, dtype=torch.long, device=cache.device)
        pages.index_copy_(0, index, buffer.view(header.num_pages, -1))


@dataclass(frozen=True)
class Refusal:
    lease: LeaseKey
    layer: int
    first_page: int
    num_pages: int
    reason: RefusalReason
    message: str


@dataclass
class _Entry:
    lease: Lease
    sink: KvSink
    state: LeaseState = LeaseState.EXPECTING
    bytes_received: int = 0
    inflight: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)  # complete, expired or released
    drained: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class LeaseProgress:
    key: LeaseKey
    state: LeaseState
    bytes_received: int
    expected_bytes: int


@dataclass(frozen=True)
class Admission:
    """A chunk the inbox accepted: receive header.num_bytes into `buffer`, then call land() or abandon()."""

    header: ChunkHeader
    buffer: torch.Tensor
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
        if lease.first_page > len(lease.page_ids):
            raise ValueError(f"first_page={lease.first_page} is past the lease's {len(lease.page_ids)} pages")
        entry = _Entry(lease, sink)
        entry.drained.set()
        if lease.expected_bytes == 0:
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
            if entry.state in (LeaseState.EXPECTING, LeaseState.RECEIVING) and now > entry.lease.deadline_s:
                entry.state = LeaseState.EXPIRED
                entry.done.set()
                expired.append(entry.lease.key)
        return expired

    async def wait_complete(self, key: LeaseKey, timeout_s: float | None = None) -> LeaseProgress:
        """Waits until every byte of the lease has landed. Raises LeaseRefused when it expired or was
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
        """Checks a chunk header; returns where to receive it. Raises LeaseRefused (logged) otherwise."""
        entry = self._check(header)
        try:
            buffer = entry.sink.buffer_for(entry.lease, header)
        except Exception as err:
            log.exception("KV sink failed to give a buffer")
            raise self._refuse(header, RefusalReason.RECEIVER_ERROR, f"buffer_for failed: {err}") from err
        if buffer.dtype != torch.uint8 or buffer.numel() != header.num_bytes or not buffer.is_contiguous():
            why = f"sink gave {buffer.numel()} {buffer.dtype} elements, need {header.num_bytes} uint8"
            raise self._refuse(header, RefusalReason.RECEIVER_ERROR, why)
        entry.state = LeaseState.RECEIVING
        entry.inflight += 1
        entry.drained.clear()
        return Admission(header, buffer, entry)

    def land(self, admission: Admission) -> None:
        """The bytes are in admission.buffer: checks the lease again (it may have ended meanwhile), verifies
        the checksum and commits. Raises LeaseRefused (logged) when the chunk must be dropped."""
        header = admission.header
        try:
            entry = self._check(header)
            if entry is not admission._entry:
                raise self._refuse(header, RefusalReason.STALE_GENERATION, "the lease was replaced mid-write")
            if header.checksum is not None and crc32(admission.buffer) != header.checksum:
                raise self._refuse(header, RefusalReason.CHECKSUM, "bytes received do not match the checksum")
            try:
                entry.sink.commit(entry.lease, header, admission.buffer)
            except Exception as err:
                log.exception("KV sink failed to commit")
                raise self._refuse(header, RefusalReason.RECEIVER_ERROR, f"commit failed: {err}") from err
            entry.bytes_received += header.num_bytes
            self.bytes_received += header.num_bytes
            if entry.bytes_received >= entry.lease.expected_bytes:
                entry.state = LeaseState.COMPLETE
                entry.done.set()
        finally:
            self.abandon(admission)

    def abandon(self, admission: Admission) -> None:
        """The chunk is finished with (landed, refused, or its receive failed)."""
        entry = admission._entry
        entry.inflight -= 1
        if entry.inflight == 0:
            entry.drained.set()

    # -- internals -----------------------------------------------------------------------------------------

    def _entry(self, key: LeaseKey) -> _Entry | None:
        entry = self._live.get(key.lease_id)
        return entry if entry is not None and entry.lease.key == key else None

    def _check(self, header: ChunkHeader) -> _Entry:
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
        if entry.state is LeaseState.EXPIRED or self.clock() > entry.lease.deadline_s:
            if entry.state is not LeaseState.COMPLETE:
                entry.state = LeaseState.EXPIRED
                entry.done.set()
            raise self._refuse(
                header, RefusalReason.EXPIRED, f"the lease expired (deadline {entry.lease.deadline_s:.3f})"
            )
        if entry.state is LeaseState.COMPLETE:
            raise self._refuse(header, RefusalReason.OUT_OF_RANGE, "the lease already has all its bytes")
        lease = entry.lease
        if not 0 <= header.layer < lease.layout.num_layers:
            raise self._refuse(
                header, RefusalReason.OUT_OF_RANGE, f"layer {header.layer} of {lease.layout.num_layers}"
            )
        end = header.first_page + header.num_pages
        if header.num_pages < 1 or header.first_page < lease.first_page or end > len(lease.page_ids):
            raise self._refuse(header, RefusalReason.OUT_OF_RANGE,
                               f"pages [{header.first_page}, {end}) outside [{lease.first_page}, {len(lease.page_ids)})")  # fmt: skip
        if header.num_bytes != header.num_pages * lease.layout.page_bytes:
            raise self._refuse(header, RefusalReason.BAD_SIZE,
                               f"{header.num_bytes} bytes for {header.num_pages} pages of {lease.layout.page_bytes}")  # fmt: skip
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

    @staticmethod
    def _progress(entry: _Entry) -> LeaseProgress:
        return LeaseProgress(entry.lease.key, entry.state, entry.bytes_received, entry.lease.expected_bytes)


# --- the two ends ---------------------------------------------------------------------------------------


class KvSender(Protocol):
    """P's end. One per worker; safe to call send() for many requests concurrently."""

    async def connect(self, address: str) -> None:
        """Opens (and caches) the connection to a receiver — at handshake, not on a user's first request."""
        ...

    async def send(self, target: KvTarget, layer: int, first_page: int, pages: torch.Tensor) -> int:
        """Writes `pages` (contiguous, `[n, page_size, ...]` or any shape of n * page_bytes bytes; CPU or GPU)
        as pages [first_page, first_page + n) of target's lease, one layer. Returns the bytes sent once the
        receiver committed them. Raises LeaseRefused when the receiver refused them, Unavailable when it is
        unreachable, InvalidArgument for a chunk that does not fit the target."""
        ...

    async def close(self) -> None: ...


class KvReceiver(Protocol):
    """D's end: a listener at `address` and the lease table (`inbox`)."""

    address: str
    inbox: KvInbox

    async def start(self) -> str:
        """Starts listening; returns the address to put into KvTarget and handshakes."""
        ...

    async def close(self) -> None: ...
