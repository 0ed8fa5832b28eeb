"""Where the expert wire's buffers live on a GPU: in device memory when UCX can move it (`device_or_host`, probed
at start-up), receive buffers from an allocator pool of their own (`RecvBuffers`)."""

from __future__ import annotations

import logging

import torch

from moemesh.transport.ucx import UcxOptions, probe_device_memory

log = logging.getLogger(__name__)


class RecvBuffers:
    """Where the expert wire's receive buffers come from (the client's output rows, the expert worker's
    payloads): plain `torch.empty` on the host; on a GPU, the caching allocator's pool of a stream of their
    own. UCX writes a received message on its own CUDA stream, unordered with torch's: a block taken from the
    compute stream's pool can be one that another thread (the engine, the expert worker's compute thread) freed
    a moment ago with kernels still queued that read it, and UCX would overwrite it under them. Blocks of this
    pool only ever hold wire buffers; a caller that reads one on its stream calls `consumed_on` first, so the
    block is not handed to the next receive before that stream's reads ran (`Tensor.record_stream`)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self._stream is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        with torch.cuda.stream(self._stream):
            return torch.empty(shape, dtype=dtype, device=self.device)

    @staticmethod
    def consumed_on(buffer: torch.Tensor) -> None:
        """Call on the thread that reads `buffer` next, before it queues the reads (no-op on the host)."""
        if buffer.is_cuda:
            buffer.record_stream(torch.cuda.current_stream(buffer.device))


async def device_or_host(wire_device: torch.device, options: UcxOptions, what: str) -> torch.device:
    """`wire_device`, or the host when UCX with `options` cannot move its memory (`probe_device_memory`: 64 KiB
    sent to ourselves at start-up), said once as an error naming why: the expert wire then stages through host
    memory (slower, correct) instead of failing every batch."""
    if wire_device.type != "cuda":
        return wire_device
    problem = await probe_device_memory(options, wire_device)
    if problem is None:
        return wire_device
    log.error("UCX cannot %s %s memory: %s; the expert wire stages through host memory (UCX transports that "
              "move device memory: cuda_copy, cuda_ipc)", what, wire_device, problem)  # fmt: skip
    return torch.device("cpu")
