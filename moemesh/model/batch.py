"""The forward batch: what one model step needs to know about the requests in it.

Tokens of all sequences are flattened into one ragged row of length T (sequence b owns rows
`query_start[b] : query_start[b + 1]`). Each sequence's latent KV lives in pages of the paged cache; its
page table row lists them in order, so token position p sits in page `page_table[b, p // page_size]`, row
`p % page_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    query_start: tuple[int, ...]  # B + 1 offsets into the T rows (host ints: ragged prefill loops use them)
    seq_lens: torch.Tensor  # int32 [B]: KV length of each sequence after this step (cached + new)
    page_table: torch.Tensor  # int32 [B, max_pages]
    slot_mapping: torch.Tensor  # int64 [T]: page * page_size + row where each new token's KV goes (-1: skip)
    logits_rows: torch.Tensor | None = None  # int64 [R]: rows to compute logits for; None = every row
    seq_lens_host: tuple[int, ...] = ()  # seq_lens as host ints (prefill reads them without a device sync)

    @property
    def num_seqs(self) -> int:
        return len(self.query_start) - 1

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    def query_len(self, b: int) -> int:
        return self.query_start[b + 1] - self.query_start[b]

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token: attention runs absorbed in the latent space."""
        return self.num_tokens == self.num_seqs

    @classmethod
    def build(
        cls,
        token_ids: list[list[int]],
        num_cached: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device | str = "cpu",
        logits: str = "last",
    ) -> ForwardBatch:
        """Builds a batch from host lists: for sequence b, `token_ids[b]` are the new tokens, which start at
        position `num_cached[b]`, and `page_tables[b]` its pages. `logits` is "last" (one row per sequence) or
        "all"."""
        ids, pos, slots, starts = [], [], [], [0]
        for toks, cached, pages in zip(token_ids, num_cached, page_tables, strict=True):
            for i in range(len(toks)):
                p = cached + i
                pos.append(p)
                slots.append(pages[p // page_size] * page_size + p % page_size)
            ids.extend(toks)
            starts.append(starts[-1] + len(toks))
        max_pages = max((len(p) for p in page_tables), default=0) or 1
        table = torch.zeros(len(page_tables), max_pages, dtype=torch.int32)
        for b, pages in enumerate(page_tables):
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        seq_lens = [c + len(t) for c, t in zip(num_cached, token_ids, strict=True)]
        rows = None if logits == "all" else torch.tensor([s - 1 for s in starts[1:]], dtype=torch.int64)
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            query_start=tuple(starts),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            page_table=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            logits_rows=None if rows is None else rows.to(device),
            seq_lens_host=tuple(seq_lens),
        )
