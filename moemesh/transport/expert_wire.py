"""The expert wire's bytes (DESIGN §3, proto `expert.proto`): one MoE layer's tokens of one micro-batch, from an
attention worker to one expert-pool worker, and the expert outputs back.

Per batch, on one UCX endpoint (tags are scoped to the endpoint; `id` is the batch's micro_batch_id):
    client: header frame (tag TAG_HEADER), payload (tag 8*id+2), recv result frame (tag 8*id+3) and recv
            output (tag 8*id+4), all four posted at once
    server: recv header frame -> recv payload -> compute -> result frame and output, sent together; with an
            error frame the output message is empty (0 bytes), so the client's posted receive completes
A frame is FRAME_BYTES: a little-endian uint32 length, then the serialized ExpertBatchHeader /
ExpertResultHeader. The payload is one buffer: the token buffer (kernels/token_format.py's layout, scales
inside), expert ids int32 [T, k] (-1: a slot another worker computes), routing weights fp32 [T, k], each
starting on a 16-byte boundary. The output is bf16 [S, D], one row per slot with an expert id >= 0, in
(token, slot) order: weighted by its routing weight (the block's torch path), or with the header's `unweighted`
the bare expert row of the fused path's GEMMs, which the attention worker weights in its own fp32 combine; the
result frame echoes `unweighted`, so a worker that predates it (and answers weighted rows) is caught.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from moemesh._proto.v1 import expert_pb2

FRAME_BYTES = 1024
TAG_HEADER = 1
TOKEN_FORMATS = {"bf16": expert_pb2.TOKEN_FORMAT_BF16, "fp8": expert_pb2.TOKEN_FORMAT_FP8_E4M3_BLOCK128}
_KIND_ORDER = (expert_pb2.PAYLOAD_KIND_HIDDEN, expert_pb2.PAYLOAD_KIND_EXPERT_IDS,
               expert_pb2.PAYLOAD_KIND_ROUTING_WEIGHTS)  # fmt: skip


def payload_tag(batch_id: int) -> int:
    return 8 * batch_id + 2


def result_tag(batch_id: int) -> int:
    return 8 * batch_id + 3


def output_tag(batch_id: int) -> int:
    return 8 * batch_id + 4


def pack_frame(message) -> torch.Tensor:
    """A header message -> uint8 [FRAME_BYTES]."""
    body = message.SerializeToString()
    if len(body) + 4 > FRAME_BYTES:
        raise ValueError(f"expert header of {len(body)} bytes does not fit a {FRAME_BYTES}-byte frame")
    frame = bytearray(FRAME_BYTES)
    frame[:4] = struct.pack("<I", len(body))
    frame[4 : 4 + len(body)] = body
    return torch.frombuffer(frame, dtype=torch.uint8)


def unpack_frame(frame: torch.Tensor, message_type):
    raw = frame.cpu().numpy().tobytes()
    (length,) = struct.unpack("<I", raw[:4])
    if length + 4 > FRAME_BYTES:
        raise ValueError(f"expert frame claims {length} bytes, more than its {FRAME_BYTES}")
    message = message_type()
    message.ParseFromString(raw[4 : 4 + length])
    return message


def _align(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass(frozen=True)
class ExpertBatch:
    """One batch as both sides see it. tokens: uint8 token buffer; expert_ids int32 [T, k]; weights fp32
    [T, k]. All on one device."""

    batch_id: int
    layer: int
    token_format: int  # expert_pb2.TokenFormat
    hidden_size: int
    tokens: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    traceparent: str = ""
    placement_epoch: int = 0  # the receiver's epoch the sender routed by; 0: unchecked
    unweighted: bool = False  # rows of the fused path's expert GEMMs, not weighted (proto's `unweighted`)
    layer_slots: int = 0  # unweighted: the whole layer's (token, slot) rows, which pick the kernel and tile

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_slots(self) -> int:
        """Rows of the output: slots this worker computes."""
        return int((self.expert_ids >= 0).sum())

    def header(self) -> expert_pb2.ExpertBatchHeader:
        sizes = (self.tokens.numel(), 4 * self.expert_ids.numel(), 4 * self.weights.numel())
        return expert_pb2.ExpertBatchHeader(
            micro_batch_id=self.batch_id, layer=self.layer, num_tokens=self.num_tokens,
            hidden_size=self.hidden_size, top_k=self.top_k, token_format=self.token_format,
            payloads=[expert_pb2.PayloadSpec(kind=k, num_bytes=n) for k, n in zip(_KIND_ORDER, sizes, strict=True)],
            traceparent=self.traceparent, placement_epoch=self.placement_epoch, unweighted=self.unweighted,
            layer_slots=self.layer_slots,
        )  # fmt: skip

    def payload(self) -> torch.Tensor:
        """The three payloads in one uint8 buffer on the tensors' device."""
        parts = [self.tokens, self.expert_ids.contiguous().view(torch.uint8).flatten(),
                 self.weights.contiguous().view(torch.uint8).flatten()]  # fmt: skip
        offsets = _offsets([p.numel() for p in parts])
        buf = torch.zeros(offsets[-1], dtype=torch.uint8, device=self.tokens.device)
        for part, start in zip(parts, offsets, strict=False):
            buf[start : start + part.numel()] = part
        return buf

    @classmethod
    def from_wire(cls, header: expert_pb2.ExpertBatchHeader, payload: torch.Tensor) -> ExpertBatch:
        """Views into `payload` (no copy). Raises ValueError for a header that does not add up."""
        kinds = [p.kind for p in header.payloads]
        if kinds != list(_KIND_ORDER):
            raise ValueError(f"expert batch payloads must be hidden, expert ids, weights; got kinds {kinds}")
        sizes = [p.num_bytes for p in header.payloads]
        slots = header.num_tokens * header.top_k
        if sizes[1] != 4 * slots or sizes[2] != 4 * slots:
            raise ValueError(
                f"expert batch of {header.num_tokens} tokens x top_k={header.top_k} needs {4 * slots}-byte "
                f"ids and weights, got {sizes[1]} and {sizes[2]}"
            )
        offsets = _offsets(sizes)
        if payload.numel() < offsets[-1]:
            raise ValueError(f"expert payload of {payload.numel()} bytes, header says {offsets[-1]}")
        shape = (header.num_tokens, header.top_k)
        ids = payload[offsets[1] : offsets[1] + sizes[1]].view(torch.int32).view(shape)
        weights = payload[offsets[2] : offsets[2] + sizes[2]].view(torch.float32).view(shape)
        tokens = payload[offsets[0] : offsets[0] + sizes[0]]
        return cls(header.micro_batch_id, header.layer, header.token_format, header.hidden_size, tokens, ids,
                   weights, header.traceparent, header.placement_epoch, header.unweighted,
                   header.layer_slots)  # fmt: skip


def payload_bytes(header: expert_pb2.ExpertBatchHeader) -> int:
    return _offsets([p.num_bytes for p in header.payloads])[-1]


def _offsets(sizes: list[int]) -> list[int]:
    """Start of each part, then the total (every part on a 16-byte boundary)."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at = _align(at + size)
    return [*offsets, at]
