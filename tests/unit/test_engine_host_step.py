"""A decode step's host work stays small: the scheduler's message carries only requests whose pages grew, the
sampler's greedy shortcut reads no token lists and builds no record per row, and the engine reports where its
host time goes (schedule / after the tokens), with the tokens unchanged (the engine and model tests check those)."""

from __future__ import annotations

import pytest
import torch

from moemesh.engine.request import SchedulerOutput
from moemesh.engine.sampler import Sampler
from moemesh.engine.sampling_params import SamplingParams
from tests.unit.test_scheduler_core import add, make


def test_the_step_message_lists_only_requests_whose_pages_grew():
    s, r = make(num_pages=64, page_size=4)
    add(s, "a", [5, 6, 7], max_tokens=10)  # pages of 4 tokens: position 4 opens a's second page
    add(s, "b", [5, 6, 7, 8, 9], max_tokens=10)  # prefilled into 2 pages; position 8 opens its third
    plans: list[SchedulerOutput] = []
    for _ in range(5):
        plan = s.schedule()
        plans.append(plan)
        s.update(plan, r.execute(plan))
    assert [len(p.new_requests) for p in plans] == [2, 0, 0, 0, 0]
    # step k >= 1 computes position 2+k of a and 4+k of b: a grows at step 2, b at step 4
    assert [[(c.request_id, len(c.new_page_ids)) for c in p.cached_requests] for p in plans] == [
        [],
        [],
        [("a", 1)],
        [],
        [("b", 1)],
    ]
    assert all(len(p.num_scheduled_tokens) == 2 for p in plans)


class _Row:
    """A sampler row whose token lists must not be read (the plain-greedy shortcut needs none)."""

    def __init__(self):
        self.params = SamplingParams()
        self.plain_greedy = True

    @property
    def prompt_ids(self):
        raise AssertionError("the greedy shortcut read prompt_ids")

    output_ids = prompt_ids
    num_output_tokens = prompt_ids


def test_greedy_shortcut_reads_no_token_lists_and_reuses_token_records():
    sampler = Sampler(32)
    logits = torch.zeros(3, 32)
    logits[0, 5] = logits[1, 9] = logits[2, 5] = 1.0
    first = sampler(logits, [_Row(), _Row(), _Row()])
    assert [t.token_id for t in first] == [5, 9, 5] and all(t.logprob is None for t in first)
    again = sampler(logits, [_Row(), _Row(), _Row()])
    assert [id(t) for t in again] == [id(first[0]), id(first[1]), id(first[0])]  # one record per token id


class _Req:
    def __init__(self, pages):
        self.page_ids = list(pages)


def test_page_table_rows_are_rewritten_only_when_their_request_moved_or_grew():
    from moemesh.engine.staging import BatchStaging

    staging = BatchStaging(max_tokens=4, max_seqs=2, max_pages=3, device=torch.device("cpu"))
    table = staging.np["page_table"]
    a, b = _Req([4, 5]), _Req([7])
    assert staging.write_page_table([a, b]) == 2
    assert table[0, :2].tolist() == [4, 5] and table[1, 0] == 7
    table[0, 0] = 99  # an unchanged row is not written again (the marker survives)
    assert staging.write_page_table([a, b]) == 2 and table[0, 0] == 99
    a.page_ids.append(6)  # a took a page: its row is written whole
    assert staging.write_page_table([a, b]) == 3 and table[0].tolist() == [4, 5, 6]
    assert staging.write_page_table([b, a]) == 3  # rows swapped
    assert table[0, 0] == 7 and table[1].tolist() == [4, 5, 6]
    c = _Req([8, 9, 10])  # a new request object with as many pages as the row's last one
    staging.write_page_table([b, c])
    assert table[1].tolist() == [8, 9, 10]


# whole blocks (the decode staging); the int64 inputs one by one; the page table's live columns (2-D copy)
@pytest.mark.parametrize(("max_tokens", "max_pages"), [(8, 3), (4096, 3), (8, 5000)])
def test_staged_copies_carry_every_input(max_tokens, max_pages):
    """Device buffers apart from the host ones (as on CUDA; on a CPU when asked): what the views show after
    `copy` is what the host wrote, whichever way the blocks went over."""
    from moemesh.engine.staging import WHOLE_COPY_BYTES, BatchStaging

    staging = BatchStaging(
        max_tokens=max_tokens, max_seqs=4, max_pages=3, device=torch.device("cpu"), copies=True
    )
    assert (staging._blocks["i64"].numel() * 8 <= WHOLE_COPY_BYTES) == (max_tokens == 8)
    h = staging.np
    h["input_ids"][:3], h["positions"][:3], h["slot_mapping"][:3] = [5, 6, 7], [0, 1, 2], [10, 11, -1]
    h["logits_rows"][:2], h["seq_lens"][:3] = [0, 2], [1, 2, 0]
    reqs = [_Req([4, 5]), _Req([7]), _Req([1, 2, 3])]
    width = staging.write_page_table(reqs)
    staged = staging.copy(num_tokens=3, num_seqs=3, width=width, num_rows=2)
    assert staged.input_ids.data_ptr() != staging.host["input_ids"].data_ptr()
    assert staged.input_ids.tolist() == [5, 6, 7] and staged.positions.tolist() == [0, 1, 2]
    assert staged.slot_mapping.tolist() == [10, 11, -1] and staged.logits_rows.tolist() == [0, 2]
    assert staged.seq_lens.tolist() == [1, 2, 0]
    assert staged.page_table.shape == (3, 3) and staged.page_table[0, :2].tolist() == [4, 5]
    assert staged.page_table[1, 0] == 7 and staged.page_table[2].tolist() == [1, 2, 3]
    for v in (*staging.dev.values(), *staging.host.values()):  # 16-byte aligned views
        assert v.data_ptr() % 16 == 0
