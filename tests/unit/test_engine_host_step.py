"""A decode step's host work stays small: the scheduler's message carries only requests whose pages grew, the
sampler's greedy shortcut reads no token lists and builds no record per row, and the engine reports where its
host time goes (schedule / after the tokens), with the tokens unchanged (the engine and model tests check those)."""

from __future__ import annotations

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
