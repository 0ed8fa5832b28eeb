"""The KV chunk wire format: a fixed header before each chunk's bytes, a fixed ack after; the refusal reasons;
the sender-side checks of a chunk (`make_header`)."""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moemesh.transport.errors import InvalidArgument
from moemesh.transport.kv import PROTOCOL_VERSION, KvTarget, LeaseKey

# magic, version, flags, transfer, lease, generation, token, first layer, layers, first page, pages, bytes,
# segments, crc
_HEADER = struct.Struct("<4sHHQQQQIIIIQII")
_ACK = struct.Struct("<QIH")  # transfer id, RefusalReason (0 = accepted), message length; then the message
HEADER_BYTES = _HEADER.size
ACK_BYTES = 256
_MAGIC = b"MMKV"
_FLAG_CHECKSUM = 1
# The most bytes one chunk may carry: the sender splits bigger transfers; a header claiming more is hostile
# (the receiver drops the connection without allocating anything).
MAX_CHUNK_BYTES = 64 << 20
# A chunk goes as one message per (layer, run of consecutive destination pages) — received straight into
# the pages — when the destination pages form at most MAX_DIRECT_RUNS runs; otherwise as one message into a
# staging buffer, scattered by one kernel. Each message costs a rendezvous (~50 us on an H200 between two
# processes, bench/kv_latency.py): 8 layers x 8 one-page runs took 4.3-5.4 ms for 4.7 MB, one run 1-2 ms.
MAX_DIRECT_RUNS = 2
MAX_SEGMENTS = 64  # what a header may claim (a receiver drops a connection whose header claims more)


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
    BAD_TOKEN = 10  # the chunk does not carry the lease's token (forged, or another mesh's)


@dataclass(frozen=True)
class ChunkHeader:
    """Precedes each chunk's bytes: layers [first_layer, first_layer + num_layers) of pages
    [first_page, first_page + num_pages) of the lease's page list, layer-major, `num_bytes` = num_layers *
    num_pages * page_bytes, sent as `num_segments` messages (`plan_segments`). `token` must be the lease's.
    checksum is crc32 of the bytes in segment order, or None when not sent."""

    transfer_id: int
    lease: LeaseKey
    layer: int  # the first layer
    first_page: int
    num_pages: int
    num_bytes: int
    checksum: int | None = None
    num_layers: int = 1
    token: int = 0
    num_segments: int = 1

    @property
    def layers(self) -> range:
        return range(self.layer, self.layer + self.num_layers)

    def pack(self) -> bytes:
        flags = _FLAG_CHECKSUM if self.checksum is not None else 0
        return _HEADER.pack(
            _MAGIC, PROTOCOL_VERSION, flags, self.transfer_id, self.lease.lease_id, self.lease.generation,
            self.token, self.layer, self.num_layers, self.first_page, self.num_pages, self.num_bytes,
            self.num_segments, self.checksum or 0,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes) -> ChunkHeader:
        magic, version, flags, xfer, lease, gen, token, layer, layers, first, n, nbytes, segs, crc = (
            _HEADER.unpack(data)
        )
        if magic != _MAGIC or version != PROTOCOL_VERSION:
            raise ValueError(f"not a KV chunk header (magic={magic!r}, version={version})")
        crc = crc if flags & _FLAG_CHECKSUM else None
        return cls(xfer, LeaseKey(lease, gen), layer, first, n, nbytes, crc, layers, token, segs)


@dataclass(frozen=True)
class Segment:
    """One message of a chunk: layers [layer, +num_layers) x chunk pages [page, +num_pages) (indices into the
    chunk), at `offset_bytes` of the chunk's layer-major payload. Either one layer of consecutive destination
    pages (`direct`: received straight into them), or every layer and page (staged, then scattered)."""

    layer: int
    num_layers: int
    page: int
    num_pages: int
    offset_bytes: int
    num_bytes: int
    direct: bool = True


def plan_segments(
    page_ids: Sequence[int], num_layers: int, page_bytes: int, max_segments: int = MAX_SEGMENTS
) -> list[Segment]:
    """How a chunk of `num_layers` layers of the destination pages `page_ids` goes on the wire: one message
    per layer and run of consecutive page ids (each lands straight in its pages) when they form at most
    MAX_DIRECT_RUNS runs, else one message for all (staged, then scattered). Sender and receiver compute it
    alike."""
    runs, start = [], 0
    for i in range(1, len(page_ids) + 1):
        if i == len(page_ids) or page_ids[i] != page_ids[i - 1] + 1:
            runs.append((start, i - start))
            start = i
    n = len(page_ids)
    if len(runs) > MAX_DIRECT_RUNS or len(runs) * num_layers > max_segments:
        return [Segment(0, num_layers, 0, n, 0, num_layers * n * page_bytes, direct=False)]
    return [
        Segment(layer, 1, page, count, (layer * n + page) * page_bytes, count * page_bytes)
        for layer in range(num_layers)
        for page, count in runs
    ]


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
    target: KvTarget,
    layer: int,
    first_page: int,
    pages: torch.Tensor,
    transfer_id: int,
    checksum: bool,
    num_layers: int = 1,
) -> tuple[ChunkHeader, torch.Tensor, list[Segment]]:
    """Checks a chunk on the sender's side (`pages`: num_layers x n pages, layer-major); returns its header,
    its bytes and its segments."""
    data = as_bytes(pages)
    layout = target.layout
    if num_layers < 1 or not 0 <= layer <= layer + num_layers <= layout.num_layers:
        raise InvalidArgument(f"layers [{layer}, {layer + num_layers}) must lie in [0, {layout.num_layers})")
    layer_bytes = num_layers * layout.page_bytes
    if data.numel() == 0 or data.numel() % layer_bytes:
        raise InvalidArgument(
            f"chunk of {data.numel()} bytes must be a positive multiple of {num_layers} x {layout.page_bytes}"
        )
    if data.numel() > MAX_CHUNK_BYTES:
        raise InvalidArgument(f"chunk of {data.numel()} bytes is over MAX_CHUNK_BYTES={MAX_CHUNK_BYTES}")
    num_pages = data.numel() // layer_bytes
    if first_page < target.first_page or first_page + num_pages > len(target.page_ids):
        raise InvalidArgument(
            f"pages [{first_page}, {first_page + num_pages}) must lie in [{target.first_page}, "
            f"{len(target.page_ids)}) for lease {target.lease}"
        )
    segments = plan_segments(
        target.page_ids[first_page : first_page + num_pages], num_layers, layout.page_bytes
    )
    crc = crc32(data) if checksum else None
    header = ChunkHeader(transfer_id, target.lease, layer, first_page, num_pages, data.numel(), crc, num_layers,
                         target.token, len(segments))  # fmt: skip
    return header, data, segments
