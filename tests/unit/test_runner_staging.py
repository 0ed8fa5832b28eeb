"""The runner's per-step host work: persistent staging buffers, no pinned allocation or fresh input tensor per
step, and the staged values equal what the step means (ids, positions, slots, seq_lens, page table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moemesh.config.engine import EngineConfig
from moemesh.engine.request import CachedRequestData, NewRequestData, SchedulerOutput
from moemesh.engine.runner import ModelRunner
from moemesh.engine.sampling_params import SamplingParams
from moemesh.engine.staging import BatchStaging


class _Recorder(torch.nn.Module):
    """A model that records the batch it is given and returns fixed logits (greedy picks token 7)."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.config = type("C", (), {"vocab_size": vocab})()
        self.batches = []

    def forward(self, batch, kv_caches):
        self.batches.append(batch)
        rows = batch.logits_rows.shape[0] if batch.logits_rows is not None else batch.num_tokens
        logits = torch.zeros(rows, self.config.vocab_size)
        logits[:, 7] = 1.0
        return logits


def _runner(page_size=4):
    config = EngineConfig(page_size=page_size, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32)
    model = _Recorder()
    kv = [torch.zeros(8, page_size, 4)]
    return ModelRunner(model, kv, config, max_model_len=32), model


def test_staged_values_and_buffers_reused_without_pinning(monkeypatch):
    runner, model = _runner()
    greedy = SamplingParams(max_tokens=8)
    new = [
        NewRequestData("a", (3, 4, 5, 6, 8), 5, (2, 5), 0, greedy),
        NewRequestData("b", (9, 10), 2, (1,), 0, greedy),
    ]
    runner.execute(SchedulerOutput(tuple(new), (), (("a", 5), ("b", 2)), frozenset()))
    prefill = model.batches[-1]
    assert prefill.input_ids.tolist() == [3, 4, 5, 6, 8, 9, 10]
    assert prefill.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert prefill.slot_mapping.tolist() == [8, 9, 10, 11, 20, 4, 5]  # page 2 rows 0-3, page 5 row 0, page 1
    assert prefill.seq_lens.tolist() == [5, 2]
    assert prefill.page_table[0].tolist() == [2, 5] and prefill.page_table[1, 0].item() == 1
    assert prefill.logits_rows.tolist() == [4, 6]
    pointers = {k: v.data_ptr() for k, v in runner.eager_staging.host.items()}

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(1) or self)
    for step in range(3):  # decodes: both requests append the sampled token 7
        cached = (CachedRequestData("b", (6,) if step == 2 else ()),)
        runner.execute(SchedulerOutput((), cached, (("a", 1), ("b", 1)), frozenset()))
        batch = model.batches[-1]
        assert batch.input_ids.tolist() == [7, 7]
        assert batch.positions.tolist() == [5 + step, 2 + step]
        b_pages = [1] + ([6] if step == 2 else [])
        pa, pb = 5 + step, 2 + step
        assert batch.slot_mapping.tolist() == [[2, 5][pa // 4] * 4 + pa % 4, b_pages[pb // 4] * 4 + pb % 4]
        assert batch.seq_lens.tolist() == [6 + step, 3 + step]
        assert batch.page_table[1, : len(b_pages)].tolist() == b_pages
        staged = runner.eager_staging.dev  # the forward reads the persistent buffers themselves
        assert batch.input_ids.data_ptr() == staged["input_ids"].data_ptr()
        assert batch.page_table.data_ptr() == staged["page_table"].data_ptr()
    assert pinned == []  # no pinned copy per step
    assert {k: v.data_ptr() for k, v in runner.eager_staging.host.items()} == pointers
    assert runner.requests["a"].token_ids[5:] == [7, 7, 7, 7]
    assert runner.host_prepare_s > 0


def test_staging_refuses_an_oversized_batch():
    staging = BatchStaging(max_tokens=4, max_seqs=2, max_pages=3, device=torch.device("cpu"))
    staging.np["input_ids"][:4] = np.arange(4)
    assert staging.copy(4, 2, 3, 1).input_ids.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="5 tokens, 2 sequences, 3 pages exceeds the staging \\(4, 2, 3\\)"):
        staging.copy(5, 2, 3, 1)
    with pytest.raises(ValueError, match="max_tokens=0"):
        BatchStaging(max_tokens=0, max_seqs=1, max_pages=1, device=torch.device("cpu"))
