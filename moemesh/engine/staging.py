"""Persistent host buffers for the per-step forward inputs, and their one copy each to the device.

A decode step used to build every input as a fresh tensor from Python lists, pin it and copy it (five pinned
allocations per step). `BatchStaging` owns the host side once: numpy views of (on CUDA) pinned buffers that the
runner writes row by row, then one non-blocking copy per input into device buffers that live as long as the
runner. Before the host buffers are written again, the previous copies are waited for (a CUDA event), so a
copy still in flight never reads half-rewritten memory.

Sizes: `max_tokens` rows of ids / positions / slots, `max_seqs` rows of seq_lens and of the page table
(`max_pages` columns). On a CPU the "device" buffers are the host buffers themselves: no copy at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StagedBatch:
    """Device views of one step's inputs (valid until the next `fill` of the same staging)."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]
    seq_lens: torch.Tensor  # int32 [B]
    page_table: torch.Tensor  # int32 [B, width]
    logits_rows: torch.Tensor  # int64 [R]


class BatchStaging:
    def __init__(self, max_tokens: int, max_seqs: int, max_pages: int, device: torch.device):
        if max_tokens < 1 or max_seqs < 1 or max_pages < 1:
            raise ValueError(
                f"BatchStaging needs max_tokens={max_tokens}, max_seqs={max_seqs}, max_pages={max_pages} >= 1"
            )
        self.device = device
        self.max_tokens, self.max_seqs, self.max_pages = max_tokens, max_seqs, max_pages
        pin = device.type == "cuda"

        def host(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.host = {
            "input_ids": host(max_tokens, torch.int64),
            "positions": host(max_tokens, torch.int64),
            "slot_mapping": host(max_tokens, torch.int64),
            "logits_rows": host(max_tokens, torch.int64),
            "seq_lens": host(max_seqs, torch.int32),
            "page_table": host((max_seqs, max_pages), torch.int32),  # int32 [seqs, pages]
        }
        self.np = {k: v.numpy() for k, v in self.host.items()}  # writable views, no torch op per write
        if pin:
            self.dev = {k: torch.zeros_like(v, device=device) for k, v in self.host.items()}
        else:
            self.dev = self.host
        self._copied: torch.cuda.Event | None = None

    def wait(self) -> None:
        """Blocks until the previous step's copies out of the host buffers are done (a no-op on a CPU)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def copy(self, num_tokens: int, num_seqs: int, width: int, num_rows: int) -> StagedBatch:
        """Issues the host-to-device copies of the filled prefix of each buffer; returns the device views."""
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs or width > self.max_pages:
            raise ValueError(
                f"batch of {num_tokens} tokens, {num_seqs} sequences, {width} pages exceeds the staging "
                f"({self.max_tokens}, {self.max_seqs}, {self.max_pages})"
            )
        sizes = {
            "input_ids": num_tokens,
            "positions": num_tokens,
            "slot_mapping": num_tokens,
            "logits_rows": num_rows,
            "seq_lens": num_seqs,
        }
        views = {k: self.dev[k][:n] for k, n in sizes.items()}
        views["page_table"] = self.dev["page_table"][:num_seqs, :width]
        if self.dev is not self.host:
            for k, n in sizes.items():
                views[k].copy_(self.host[k][:n], non_blocking=True)
            # the table's live columns only: rows are strided in both buffers, one 2-D copy
            views["page_table"].copy_(self.host["page_table"][:num_seqs, :width], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return StagedBatch(**views)


def write_pages(table_row: np.ndarray, pages: list[int]) -> None:
    """Writes a sequence's page ids into its page-table row (entries past them are never read)."""
    table_row[: len(pages)] = pages
