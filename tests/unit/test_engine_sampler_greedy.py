"""The sampler's all-greedy shortcut picks exactly what `moemesh.kernels.sample` picks, ties included."""

from __future__ import annotations

import torch

from moemesh.engine.sampler import Sampler, SampleRow
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels.sample import SamplingTensors, sample


def test_all_greedy_rows_match_the_sample_op_with_ties():
    torch.manual_seed(0)
    logits = torch.randn(9, 301)
    logits[3, [7, 200]] = 50.0  # a tie: the lowest index wins
    logits[5] = 0.0  # all equal: token 0
    rows = [SampleRow(SamplingParams(), [1, 2], [3] * i) for i in range(9)]
    got = [t.token_id for t in Sampler(301)(logits, rows)]
    expected = sample(logits, SamplingTensors.filled(9, "cpu", temperature=0.0)).token_ids.tolist()
    assert got == expected
    assert got[3] == 7 and got[5] == 0
