"""The scheduler alone, without torch: a fake model whose next token is a function of the tokens so far drives
it; admission, chunking, preemption, prefix hits, finishing, the mesh hooks' bookkeeping, determinism."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moemesh.config.engine import EngineConfig
from moemesh.engine.kv_pages import PagePool
from moemesh.engine.request import FinishReason, Request, SchedulerOutput
from moemesh.engine.sampling_params import SamplingParams
from moemesh.engine.scheduler import Scheduler

VOCAB = 50


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % VOCAB + 2  # never 0 or 1 (1 is EOS below)


class FakeRunner:
    """Mirrors the runner's bookkeeping: applies the step message, checks the KV invariants, 'samples'."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.state: dict[str, dict] = {}

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for rid in out.finished_request_ids:
            self.state.pop(rid, None)
        for new in out.new_requests:
            assert new.request_id not in self.state
            self.state[new.request_id] = dict(
                tokens=list(new.token_ids), pages=list(new.page_ids), computed=new.num_computed_tokens
            )
        for c in out.cached_requests:
            self.state[c.request_id]["pages"] += c.new_page_ids
        sampled = {}
        for rid, n in out.num_scheduled_tokens:
            s = self.state[rid]
            assert n >= 1 and s["computed"] + n <= len(s["tokens"])
            assert len(s["pages"]) * self.pool.page_size >= s["computed"] + n  # room for the new KV
            assert all(self.pool.ref_count(p) >= 1 for p in s["pages"])
            s["computed"] += n
            if s["computed"] == len(s["tokens"]):
                tok = next_token(s["tokens"])
                s["tokens"].append(tok)
                sampled[rid] = tok
        return sampled


def make(num_pages=64, page_size=4, **knobs):
    config = EngineConfig(
        **{"page_size": page_size, "max_num_seqs": 8, "max_num_batched_tokens": 16, **knobs}
    )
    pool = PagePool(num_pages, page_size)
    return Scheduler(config, pool, max_model_len=128, eos_token_ids=(1,)), FakeRunner(pool)


def add(s: Scheduler, rid: str, prompt: list[int], max_tokens=8, **params) -> Request:
    req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), s.new_arrival())
    s.add(req)
    return req


def run_all(s: Scheduler, r: FakeRunner, max_steps=500) -> tuple[dict[str, Request], list[SchedulerOutput]]:
    done, plans = {}, []
    for _ in range(max_steps):
        if not s.has_unfinished():
            break
        plan = s.schedule()
        plans.append(plan)
        for req in s.update(plan, r.execute(plan)):
            done[req.request_id] = req
    assert not s.has_unfinished()
    return done, plans


def expected(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def assert_no_leaks(s: Scheduler) -> None:
    st = s.pool.stats()
    assert st.pages_leased == 0 and st.pages_free + st.pages_cached == st.pages_total


def test_importing_the_scheduler_needs_no_torch():
    code = "import sys, moemesh.engine.scheduler, moemesh.engine.kv_pages; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admission_respects_max_num_seqs_and_continuous_batching():
    s, r = make(max_num_seqs=2)
    for i in range(4):
        add(s, f"r{i}", [3 + i, 4, 5], max_tokens=3)
    first = s.schedule()
    assert [rid for rid, _ in first.num_scheduled_tokens] == ["r0", "r1"]
    assert len(first.new_requests) == 2
    s.update(first, r.execute(first))
    done, plans = run_all(s, r)
    assert sorted(done) == ["r0", "r1", "r2", "r3"]
    assert all(len(p.num_scheduled_tokens) <= 2 for p in plans)
    # r2 joins as soon as r0/r1 finish, while the other still decodes
    for rid in done:
        assert done[rid].output_ids == expected(done[rid].prompt_ids, 3)
        assert done[rid].finish_reason == FinishReason.LENGTH
    assert_no_leaks(s)


def test_chunked_prefill_mixes_with_decodes_under_the_token_budget():
    s, r = make(max_num_batched_tokens=10)
    add(s, "short", [5, 6], max_tokens=3)
    plan = s.schedule()
    s.update(plan, r.execute(plan))  # short is decoding now
    long_prompt = list(range(2, 30))  # 28 tokens: 9 + 9 beside the decode, then 10 alone
    add(s, "long", long_prompt, max_tokens=2)
    chunks = []
    while "long" in s.requests and s.requests["long"].num_computed_tokens < len(long_prompt):
        plan = s.schedule()
        sched = dict(plan.num_scheduled_tokens)
        assert plan.total_num_scheduled_tokens <= 10
        if "short" in s.requests:
            assert sched["short"] == 1  # the decode goes on while the long prompt prefills
        chunks.append(sched["long"])
        s.update(plan, r.execute(plan))
    assert chunks == [9, 9, 10]
    assert s.counters.prefill_tokens_computed == 2 + 28
    done, _ = run_all(s, r)
    assert done["long"].output_ids == expected(long_prompt, 2)
    assert s.counters.num_steps == 5
    assert_no_leaks(s)


def test_preemption_by_recompute_when_pages_run_out():
    s, r = make(num_pages=10, page_size=4, enable_prefix_caching=False)
    prompts = {f"r{i}": [2 + i] * 7 for i in range(4)}  # 2 pages each, growing to 4 over 8 new tokens
    for rid, p in prompts.items():
        add(s, rid, p, max_tokens=8)
    done, plans = run_all(s, r)
    preempted = [rid for p in plans for rid in p.preempted_request_ids]
    assert preempted, "10 pages cannot hold four requests of 15 tokens: someone is preempted"
    assert preempted[0] == "r3"  # the most recently admitted goes first
    assert s.counters.num_preemptions == len(preempted)
    for rid, p in prompts.items():
        assert done[rid].output_ids == expected(p, 8)
    # a preempted request reaches the runner again as new, with everything computed so far
    later = [p for p in plans if any(n.request_id == "r3" for n in p.new_requests)]
    assert len(later) == 1 + preempted.count("r3")
    assert_no_leaks(s)


def test_prefix_hits_reuse_full_pages_and_skip_their_compute():
    s, r = make(page_size=4)
    prompt = list(range(2, 13))  # 11 tokens: 2 full pages
    add(s, "a", prompt, max_tokens=2)
    done, _ = run_all(s, r)
    computed = s.counters.prefill_tokens_computed
    assert computed == 11 and s.pool.stats().pages_cached >= 2
    add(s, "b", prompt + [40, 41], max_tokens=2)
    plan = s.schedule()
    (new,) = plan.new_requests
    assert new.num_computed_tokens == 8 and dict(plan.num_scheduled_tokens)["b"] == 5
    assert list(new.page_ids[:2]) == done["a"].page_ids[:2] or s.counters.prefix_hit_tokens == 8
    s.update(plan, r.execute(plan))
    done_b, _ = run_all(s, r)
    assert done_b["b"].output_ids == expected(prompt + [40, 41], 2)
    assert s.counters.prefix_hit_tokens == 8
    assert s.counters.prefill_tokens_computed == computed + 5
    assert_no_leaks(s)


def test_whole_prompt_in_cache_still_computes_its_last_token():
    s, r = make(page_size=4)
    prompt = list(range(2, 10))  # exactly 2 pages
    add(s, "a", prompt, max_tokens=1)
    run_all(s, r)
    add(s, "b", prompt, max_tokens=3)
    plan = s.schedule()
    assert plan.new_requests[0].num_computed_tokens == 4  # page 2 holds the last token: recomputed
    s.update(plan, r.execute(plan))
    done, _ = run_all(s, r)
    assert done["b"].output_ids == expected(prompt, 3)
    assert_no_leaks(s)


def test_lru_eviction_keeps_recent_prefixes():
    s, r = make(num_pages=8, page_size=4)
    for i, rid in enumerate(["old", "new"]):
        add(s, rid, [10 + i] * 8, max_tokens=1)
        run_all(s, r)
    # 24 tokens need 6 pages: the 4 free ones, then the least recently freed cached ones ("old", tail first)
    add(s, "big", list(range(2, 26)), max_tokens=1)
    run_all(s, r)
    assert len(s.pool.match_prefix([11] * 8, 2)) == 2  # "new" still cached
    assert not s.pool.match_prefix([10] * 8, 2)
    assert_no_leaks(s)


def test_finishing_on_eos_stop_ids_and_ignore_eos():
    s, r = make()
    prompt = [7, 8, 9]
    toks = expected(prompt, 6)
    s.eos_token_ids = frozenset({toks[2]})
    add(s, "eos", prompt)
    add(s, "ignore", prompt, ignore_eos=True, max_tokens=6)
    add(s, "stopid", prompt, stop_token_ids=(toks[1],))
    done, _ = run_all(s, r)
    assert done["eos"].output_ids == toks[:3] and done["eos"].finish_reason == FinishReason.STOP
    assert done["ignore"].output_ids == toks and done["ignore"].finish_reason == FinishReason.LENGTH
    assert done["stopid"].output_ids == toks[:2]
    assert_no_leaks(s)


def test_schedules_are_deterministic():
    def trace():
        s, r = make(num_pages=12, max_num_batched_tokens=12)
        for i in range(6):
            add(s, f"r{i}", list(range(2, 4 + 3 * i)), max_tokens=5)
        _, plans = run_all(s, r)
        return [p.num_scheduled_tokens for p in plans]

    assert trace() == trace()


def test_prefill_only_keeps_pages_and_reserve_skips_cached_prefix():
    s, r = make(page_size=4)
    prompt = list(range(2, 12))  # 10 tokens
    add(s, "p", prompt, max_tokens=5)
    s.requests["p"].prefill_only = True
    done, _ = run_all(s, r)
    handed = done["p"]
    assert handed.finish_reason == FinishReason.PREFILL and len(handed.output_ids) == 1
    assert len(handed.page_ids) == 3 and s.pool.stats().pages_leased == 3
    s.pool.release(handed.page_ids)
    pages, cached = s.reserve(prompt)  # the decode side: its own cache already has 2 full pages
    assert cached == 8 and len(pages) == 3
    s.pool.release(pages)
    with pytest.raises(MemoryError):
        s.reserve(list(range(2, 2 + 4 * 70)))
    assert_no_leaks(s)


def test_prompt_too_long_is_rejected():
    s, _ = make()
    with pytest.raises(ValueError, match="max_model_len=128"):
        add(s, "x", [2] * 128)
