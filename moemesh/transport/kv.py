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

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from moemesh._proto.v1 import worker_pb2
from moemesh.transport.errors import IncompatiblePeer, InvalidArgument

if TYPE_CHECKING:
    from moemesh.transport.kv_inbox import KvInbox
    from moemesh.transport.kv_wire import ChunkHeader, Segment

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2  # 2: multi-layer chunks in segments, lease tokens
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
    token: int = 0  # random per lease (D's); every chunk carries it

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
            lease_token=self.token,
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
            token=msg.lease_token,
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
    token: int = 0  # what every chunk must carry
    ttl_s: float | None = None  # each chunk admitted or landed moves the deadline to now + ttl_s (if later)

    @property
    def num_pages_expected(self) -> int:
        """(layer, page) cells the sender must cover before the lease is complete."""
        return self.layout.num_layers * (len(self.page_ids) - self.first_page)

    @property
    def expected_bytes(self) -> int:
        return self.num_pages_expected * self.layout.page_bytes

    @classmethod
    def for_target(cls, target: KvTarget, deadline_s: float, ttl_s: float | None = None) -> Lease:
        return cls(target.lease, target.request_id, target.page_ids, target.layout, deadline_s,
                   target.first_page, target.token, ttl_s)  # fmt: skip


# --- where received bytes go ------------------------------------------------------------------------


class KvSink(Protocol):
    """Where received bytes go; D's service provides it (the engine's cache + an unpack kernel)."""

    def buffers_for(self, lease: Lease, header: ChunkHeader, segments: list[Segment]) -> list[torch.Tensor]:
        """A contiguous uint8 tensor of segment.num_bytes per segment to receive into: the destination pages
        themselves, or staging."""
        ...

    def commit(
        self, lease: Lease, header: ChunkHeader, segments: list[Segment], buffers: list[torch.Tensor]
    ) -> None:
        """The bytes have arrived and the lease is still live: make them the pages' content (scatter what was
        staged; nothing for what landed in place)."""
        ...

    def abandon(self, buffers: list[torch.Tensor]) -> None:
        """The receive failed or was refused: staging may be reused (what it wrote in place is in leased pages
        no one reads)."""
        ...


class StagingPool:
    """Staging buffers of one device, made once and kept for the receiver's life: UCX writes them outside
    torch's streams, so they must never go back to the caching allocator (it could hand the memory to a kernel
    meanwhile). A buffer is taken for one chunk and free again once the scatter that reads it has run (a CUDA
    event) — on CPU at once."""

    def __init__(self, device: torch.device, min_bytes: int = 1 << 20) -> None:
        self.device = device
        self.min_bytes = min_bytes
        self._free: list[torch.Tensor] = []
        self._busy: list[tuple[torch.cuda.Event | None, torch.Tensor]] = []
        self.num_allocated = 0

    def take(self, num_bytes: int) -> torch.Tensor:
        """A uint8 view of num_bytes from a free buffer (a new one, kept, when none is big enough)."""
        self._reclaim()
        fits = [b for b in self._free if b.numel() >= num_bytes]
        if fits:
            buffer = min(fits, key=torch.Tensor.numel)
            self._free.remove(buffer)
        else:
            size = max(self.min_bytes, 1 << (num_bytes - 1).bit_length())
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.num_allocated += 1
        self._busy.append((None, buffer))
        return buffer[:num_bytes]

    def give_back(self, view: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """`view` (from take) is free once `after` has passed (None: now). Anything else is ignored."""
        for i, (_, buffer) in enumerate(self._busy):
            if buffer.data_ptr() == view.data_ptr():
                if after is None:
                    del self._busy[i]
                    self._free.append(buffer)
                else:
                    self._busy[i] = (after, buffer)
                return

    def _reclaim(self) -> None:
        still = []
        for event, buffer in self._busy:
            if event is not None and event.query():
                self._free.append(buffer)
            else:
                still.append((event, buffer))
        self._busy = still


class PagedKvSink:
    """A KvSink over per-layer caches `[num_pages, page_size, ...]` (any dtype, contiguous). A one-layer
    segment (a run of consecutive pages, `plan_segments`) is received straight into its pages; a segment of
    several layers into a pooled staging buffer (`StagingPool`), then scattered (`scatter_layers`,
    index_copy_ here). The page ids go up through pinned memory without blocking (a pageable copy would wait
    for the whole stream, i.e. for a forward in flight); on CUDA a staging buffer is reused only after an
    event recorded behind its scatter has passed."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        self.caches = caches
        self.staging = StagingPool(caches[0].device) if caches else None
        self.num_direct_segments = 0
        self.num_staged_segments = 0

    def buffers_for(self, lease: Lease, header: ChunkHeader, segments: list[Segment]) -> list[torch.Tensor]:
        buffers = []
        for seg in segments:
            cache = self.caches[header.layer + seg.layer]
            if seg.direct and cache.is_contiguous():
                first = lease.page_ids[header.first_page + seg.page]
                rows = cache.view(cache.shape[0], -1)[first : first + seg.num_pages]  # consecutive pages
                buffers.append(rows.view(torch.uint8).view(-1))
                self.num_direct_segments += 1
            else:
                assert self.staging is not None
                buffers.append(self.staging.take(seg.num_bytes))
                self.num_staged_segments += 1
        return buffers

    def commit(
        self, lease: Lease, header: ChunkHeader, segments: list[Segment], buffers: list[torch.Tensor]
    ) -> None:
        for seg, buffer in zip(segments, buffers, strict=True):
            if seg.direct and self.caches[header.layer + seg.layer].is_contiguous():
                continue  # landed in place
            first = header.first_page + seg.page
            ids = torch.tensor(lease.page_ids[first : first + seg.num_pages], dtype=torch.long)
            layers = self.caches[header.layer + seg.layer : header.layer + seg.layer + seg.num_layers]
            index = ids.pin_memory().to(buffer.device, non_blocking=True) if buffer.is_cuda else ids
            self.scatter_layers(layers, index, buffer.view(seg.num_layers, seg.num_pages, -1))
            done = None
            if buffer.is_cuda:
                done = torch.cuda.Event()
                done.record()
            assert self.staging is not None
            self.staging.give_back(buffer, done)

    def abandon(self, buffers: list[torch.Tensor]) -> None:
        if self.staging is not None:
            for buffer in buffers:
                self.staging.give_back(buffer)

    def scatter_layers(self, caches: list[torch.Tensor], index: torch.Tensor, rows: torch.Tensor) -> None:
        """rows `[num_layers, n, page_bytes]` uint8 into pages `index` of each of `caches`."""
        for cache, layer_rows in zip(caches, rows, strict=True):
            cache.view(cache.shape[0], -1).view(torch.uint8).index_copy_(0, index, layer_rows)


class KvSender(Protocol):
    """P's end. One per worker; safe to call send() for many requests concurrently."""

    async def connect(self, address: str) -> None:
        """Opens (and caches) the connection to a receiver — at handshake, not on a user's first request."""
        ...

    async def send(
        self, target: KvTarget, layer: int, first_page: int, pages: torch.Tensor, num_layers: int = 1
    ) -> int:
        """Writes `pages` (contiguous, `[num_layers, n, page_size, ...]` or any shape of num_layers * n *
        page_bytes bytes, layer-major; CPU or GPU) as pages [first_page, first_page + n) of target's lease,
        layers [layer, layer + num_layers). Returns the bytes sent once the
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
