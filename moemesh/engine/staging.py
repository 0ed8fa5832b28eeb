"""Persistent host buffers for the per-step forward inputs, and their copies to the device.

A decode step used to build every input as a fresh tensor from Python lists, pin it and copy it (five pinned
allocations per step). `BatchStaging` owns the host side once: numpy views of (on CUDA) pinned buffers that the
runner writes, then non-blocking copies into device buffers that live as long as the runner. The inputs are
views into two flat blocks (int64: ids, positions, slots, logits rows; int32: seq_lens, page table): a block
of at most WHOLE_COPY_BYTES (the decode staging's, up to a few hundred sequences) goes over whole, so a decode
step issues two copies, and the page table never takes torch's path for a strided host source (a pageable
temporary and an extra kernel); larger blocks (the eager staging's) copy each input's filled prefix. Before
the host buffers are written again, the previous copies are waited for (a CUDA event), so a copy still in
flight never reads half-rewritten memory.

Sizes: `max_tokens` rows of ids / positions / slots, `max_seqs` rows of seq_lens and of the page table
(`max_pages` columns). On a CPU the "device" buffers are the host buffers themselves: no copy at all.
"""

from __future__ import annotations

from dataclasses import dataclass

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


WHOLE_COPY_BYTES = 64 << 10  # a block this small goes over whole in one copy (decode staging)


class BatchStaging:
    def __init__(
        self, max_tokens: int, max_seqs: int, max_pages: int, device: torch.device, copies: bool | None = None
    ):
        """copies: keep device buffers apart from the host ones and copy each step (default: on CUDA only; a
        test passes True to check the copies on a CPU)."""
        if max_tokens < 1 or max_seqs < 1 or max_pages < 1:
            raise ValueError(
                f"BatchStaging needs max_tokens={max_tokens}, max_seqs={max_seqs}, max_pages={max_pages} >= 1"
            )
        self.device = device
        self.max_tokens, self.max_seqs, self.max_pages = max_tokens, max_seqs, max_pages
        pin = device.type == "cuda"
        copies = pin if copies is None else copies
        # two flat blocks, each input a view into one: int64 [ids | positions | slots | logits rows] and int32
        # [seq_lens | page table]; a small block (the decode staging's) is copied whole: 2 copies a step
        # (each view starts 16-byte aligned: segments of an even count of int64, a multiple of 4 int32)
        self._t_seg, self._s_seg = -(-max_tokens // 2) * 2, -(-max_seqs // 4) * 4
        self._blocks = {
            "i64": torch.zeros(4 * self._t_seg, dtype=torch.int64, pin_memory=pin),
            "i32": torch.zeros(self._s_seg + max_seqs * max_pages, dtype=torch.int32, pin_memory=pin),
        }
        self.host = self._views(self._blocks)
        self.np = {k: v.numpy() for k, v in self.host.items()}  # writable views, no torch op per write
        if copies:
            self._dev_blocks = {k: torch.zeros_like(v, device=device) for k, v in self._blocks.items()}
            self.dev = self._views(self._dev_blocks)
        else:
            self._dev_blocks, self.dev = self._blocks, self.host
        self._copied: torch.cuda.Event | None = None
        self._event: torch.cuda.Event | None = None
        # what each page-table row holds: (the request object, its page count) last written there. A request's
        # page list only grows (a new or re-admitted request is a new object), so an unchanged pair means an
        # unchanged row: a decode step rewrites a row only when its request moved or took a page.
        self._table_rows: list[tuple[object, int] | None] = [None] * max_seqs

    def _views(self, blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t, seg, s = self.max_tokens, self._t_seg, self.max_seqs
        i64, i32 = blocks["i64"], blocks["i32"]
        return {
            "input_ids": i64[:t],
            "positions": i64[seg : seg + t],
            "slot_mapping": i64[2 * seg : 2 * seg + t],
            "logits_rows": i64[3 * seg : 3 * seg + t],
            "seq_lens": i32[:s],
            "page_table": i32[self._s_seg :].view(s, self.max_pages),  # int32 [seqs, pages]
        }

    def write_page_table(self, requests: list) -> int:
        """Writes each request's `page_ids` into its row (row i: requests[i]) unless the row already holds
        them; returns the widest row's page count (at least 1)."""
        table, held = self.np["page_table"], self._table_rows
        width = 1
        for i, r in enumerate(requests):
            pages = r.page_ids
            n = len(pages)
            width = max(width, n)
            h = held[i]
            if h is None or h[0] is not r or h[1] != n:
                table[i, :n] = pages
                held[i] = (r, n)
        return width

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
            for block, keys in (("i64", ("input_ids", "positions", "slot_mapping", "logits_rows")),
                                ("i32", ("seq_lens",))):  # fmt: skip
                src = self._blocks[block]
                if src.numel() * src.element_size() <= WHOLE_COPY_BYTES:
                    self._dev_blocks[block].copy_(src, non_blocking=True)  # the page table rides along
                    continue
                for k in keys:
                    views[k].copy_(self.host[k][: sizes[k]], non_blocking=True)
                if block == "i32":  # the table's live columns only: strided in both buffers, one 2-D copy
                    views["page_table"].copy_(self.host["page_table"][:num_seqs, :width], non_blocking=True)
            if self.device.type == "cuda":
                if self._event is None:
                    self._event = torch.cuda.Event()  # one event, recorded again each step
                self._event.record()
                self._copied = self._event
        return StagedBatch(**views)
