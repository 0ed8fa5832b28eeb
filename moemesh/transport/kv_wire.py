"""The KV chunk wire format: a fixed header before each chunk's bytes, a fixed ack after; the refusal reasons;
the sender-side checks of a chunk (`make_header`)."""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

import torch

from moemesh.transport.errors import InvalidArgument
from moemesh.transport.kv import PROTOCOL_VERSION, KvTarget, LeaseKey

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
