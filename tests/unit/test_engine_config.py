"""EngineConfig validation and the memory planner's arithmetic (no torch)."""

from __future__ import annotations

import pytest

from moemesh.config.engine import EngineConfig
from moemesh.engine.memory import bytes_per_page, plan_pages


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("page_size", 0),
        ("max_num_seqs", 0),
        ("max_model_len", 1),
        ("kv_cache_memory_bytes", 0),
        ("num_kv_pages", 0),
        ("gpu_memory_utilization", 1.5),
        ("cuda_graph_batch_sizes", (0, 4)),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        EngineConfig(**{field: value})


def test_budget_must_cover_every_running_request():
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 must be >= max_num_seqs=16"):
        EngineConfig(max_num_seqs=16, max_num_batched_tokens=8)
    assert EngineConfig(cuda_graph_batch_sizes=(8, 1, 8)).cuda_graph_batch_sizes == (1, 8)


def test_plan_pages_precedence_and_the_one_request_check():
    page = bytes_per_page(num_layers=61, page_size=64, kv_cache_dim=576, dtype_bytes=2)
    assert page == 61 * 64 * 576 * 2  # DeepSeek-V3 in BF16: 4.5 MB per page of 64 tokens
    common = dict(page_bytes=page, page_size=64, max_model_len=4096)
    plan = plan_pages(**common, num_kv_pages=100, budget_bytes=1, device_free_bytes=1)
    assert (plan.num_pages, plan.source, plan.num_tokens) == (100, "num_kv_pages", 6400)
    assert plan_pages(**common, budget_bytes=70 * page + 5).num_pages == 70
    assert plan_pages(**common, device_free_bytes=80 * page).source == "device"
    with pytest.raises(ValueError, match=r"holds 63 pages .* max_model_len=4096 tokens needs 64 pages"):
        plan_pages(**common, budget_bytes=63 * page)
    with pytest.raises(ValueError, match="holds 0 pages"):
        plan_pages(**common, device_free_bytes=-5)
