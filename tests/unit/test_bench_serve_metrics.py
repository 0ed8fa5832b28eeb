"""`moemesh bench serve`'s arithmetic against hand-computed values (and numpy's percentiles as an oracle): TTFT,
ITL with multi-token chunks, TPOT, E2E, throughput, goodput under SLOs; the workload generators; the SSE parser;
the runner's concurrency cap."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from moemesh.benchmark.backends import StreamEvent, sse_event
from moemesh.benchmark.metrics import RequestResult, Slo, compute_metrics, percentile
from moemesh.benchmark.runner import run
from moemesh.benchmark.workload import RequestSpec, SyntheticConfig, arrival_times_s, load_jsonl, synthetic


def _request(chunks: list[tuple[float, int]], latency_s: float, prompt_len: int = 4) -> RequestResult:
    r = RequestResult(prompt_len=prompt_len, expected_output_len=sum(n for _, n in chunks))
    for t, n in chunks:
        r.add_chunk(t, n)
    r.latency_s = latency_s
    return r


@pytest.fixture
def four_requests() -> list[RequestResult]:
    a = _request([(0.1, 1), (0.3, 1), (0.4, 1)], 0.45)  # ttft 100, itl 200 100, tpot 175, e2e 450
    b = _request([(0.2, 1), (0.6, 2)], 0.6)  # the 2-token chunk: tokens at 0.4 and 0.6 -> itl 200 200
    c = RequestResult(prompt_len=4, expected_output_len=3, error="Unavailable: gone")
    d = _request([(0.05, 1)], 0.05)  # one token: no TPOT (0 for goodput)
    return [a, b, c, d]


def test_per_request_definitions(four_requests):
    a, b, _, d = four_requests
    assert a.ttft_s == pytest.approx(0.1)
    assert a.itls_s == pytest.approx([0.2, 0.1])
    assert a.tpot_s == pytest.approx(0.175)
    assert b.token_times_s == pytest.approx([0.2, 0.4, 0.6])
    assert b.itls_s == pytest.approx([0.2, 0.2])
    assert b.tpot_s == pytest.approx(0.2)
    assert (d.output_len, d.tpot_s, d.itls_s) == (1, None, [])


def test_a_usage_only_chunk_adds_no_token():
    r = _request([(0.1, 2), (0.3, 0)], 0.3)
    assert r.token_times_s == pytest.approx([0.1, 0.1])  # a first chunk of 2: both tokens at once
    assert r.output_len == 2


def test_run_metrics_equal_hand_computed_values(four_requests):
    m = compute_metrics(four_requests, duration_s=2.0, slo=Slo(ttft_ms=150, tpot_ms=180))
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 12, 7)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(9.5)
    assert m["mean_ttft_ms"] == pytest.approx(350 / 3)
    assert m["median_ttft_ms"] == pytest.approx(100)
    assert m["p90_ttft_ms"] == pytest.approx(180)  # sorted 50 100 200, rank 1.8
    assert m["p99_ttft_ms"] == pytest.approx(198)
    assert (m["mean_tpot_ms"], m["median_tpot_ms"], m["p99_tpot_ms"]) == pytest.approx((187.5, 187.5, 199.75))
    assert (m["mean_itl_ms"], m["median_itl_ms"]) == pytest.approx((175, 200))
    assert (m["mean_e2el_ms"], m["median_e2el_ms"]) == pytest.approx((1100 / 3, 450))
    assert m["std_ttft_ms"] == pytest.approx(np.std([100, 200, 50]))
    # a: meets both; b: TTFT 200 > 150; c failed; d: TTFT 50, no TPOT -> good. 2 good in 2 s.
    assert m["request_goodput"] == pytest.approx(1.0)


def test_goodput_is_null_without_slos_and_each_slo_binds_alone(four_requests):
    assert compute_metrics(four_requests, 2.0)["request_goodput"] is None
    assert compute_metrics(four_requests, 2.0, Slo(tpot_ms=180))["request_goodput"] == pytest.approx(1.0)
    assert compute_metrics(four_requests, 2.0, Slo(ttft_ms=1000))["request_goodput"] == pytest.approx(1.5)


@pytest.mark.parametrize("p", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_equals_numpy(p):
    values = [float(v) for v in np.random.default_rng(3).exponential(10.0, size=37)]
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_bad_arguments_name_field_and_value():
    with pytest.raises(ValueError, match=r"slo ttft_ms=-1 must be a number > 0"):
        Slo(ttft_ms=-1)
    with pytest.raises(ValueError, match=r"duration_s=0 must be > 0"):
        compute_metrics([], 0)
    with pytest.raises(ValueError, match=r"range_ratio=1.0 must be in \[0, 1\)"):
        SyntheticConfig(4, 10, 10, range_ratio=1.0)
    with pytest.raises(ValueError, match=r"request_rate=0 must be > 0"):
        arrival_times_s(3, 0)


def test_synthetic_lengths_are_exact_within_range_and_seeded():
    fixed = synthetic(SyntheticConfig(5, 20, 7), vocab_size=50)
    assert [s.prompt_len for s in fixed] == [20] * 5 and [s.output_len for s in fixed] == [7] * 5
    assert all(0 <= t < 50 for s in fixed for t in s.prompt_token_ids)
    ranged = synthetic(SyntheticConfig(200, 100, 40, range_ratio=0.5, seed=1), vocab_size=1000)
    assert {s.prompt_len for s in ranged} <= set(range(50, 151)) and len({s.prompt_len for s in ranged}) > 30
    assert {s.output_len for s in ranged} <= set(range(20, 61))
    assert ranged == synthetic(SyntheticConfig(200, 100, 40, range_ratio=0.5, seed=1), vocab_size=1000)
    assert ranged != synthetic(SyntheticConfig(200, 100, 40, range_ratio=0.5, seed=2), vocab_size=1000)


def test_poisson_arrivals_have_the_asked_rate_and_inf_sends_all_at_once():
    times = arrival_times_s(20000, 8.0, seed=5)
    gaps = np.diff(times)
    assert times[0] == 0 and np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 8, rel=0.05)  # exponential: std = mean
    assert arrival_times_s(4, math.inf) == [0.0] * 4


def test_jsonl_prompts_and_their_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"prompt_token_ids": [3, 4, 5]}\n')
    specs = load_jsonl(path, 3, default_output_len=9)
    assert specs == [RequestSpec(5, prompt_text="hello there"), RequestSpec(9, prompt_token_ids=(3, 4, 5)),
                     RequestSpec(5, prompt_text="hello there")]  # fmt: skip
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "output_len": 0}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: output_len=0 must be an integer >= 1"):
        load_jsonl(path, 2, 4)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected an object, got list"):
        load_jsonl(path, 1, 4)


def test_sse_lines_of_an_openai_completions_stream():
    chunk = {"choices": [{"index": 0, "text": " the"}]}
    assert sse_event(b"data: " + json.dumps(chunk).encode() + b"\n") == StreamEvent(1)
    with_logprobs = {"choices": [{"text": "ab", "logprobs": {"tokens": ["a", "b"]}}]}
    assert sse_event(b"data: " + json.dumps(with_logprobs).encode()) == StreamEvent(2)
    held_back = {
        "choices": [{"index": 0, "text": ""}],
        "usage": None,
    }  # a token whose text waits for its rest
    assert sse_event(b"data: " + json.dumps(held_back).encode()) == StreamEvent(1)
    usage = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 8}}
    assert sse_event(b"data: " + json.dumps(usage).encode()) == StreamEvent(0, 12, 8)
    assert sse_event(b"data: [DONE]\n") == "[DONE]"
    assert sse_event(b": keep-alive\n") is None and sse_event(b"\n") is None
    with pytest.raises(RuntimeError, match="server error in the stream"):
        sse_event(b'data: {"error": {"message": "boom"}}')


class _FakeBackend:
    """Streams `output_len - short_by` one-token chunks 2 ms apart; records how many requests were in flight."""

    name = "fake"

    def __init__(self, short_by: int = 0) -> None:
        self.in_flight = self.most_in_flight = 0
        self.short_by = short_by

    async def stream(self, spec):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            for _ in range(spec.output_len - self.short_by):
                await asyncio.sleep(0.002)
                yield StreamEvent(1)
        finally:
            self.in_flight -= 1


def test_the_runner_caps_concurrency_and_counts_every_token():
    backend = _FakeBackend()
    specs = [RequestSpec(5, prompt_token_ids=(1, 2, 3)) for _ in range(12)]
    result = asyncio.run(run(backend, specs, [0.0] * 12, max_concurrency=3, progress=False))
    assert backend.most_in_flight == 3
    assert [r.output_len for r in result.results] == [5] * 12 and all(r.success for r in result.results)
    short = asyncio.run(run(_FakeBackend(short_by=2), specs[:1], [0.0], progress=False)).results[0]
    assert (short.success, short.error) == (False, "got 3 tokens, asked for output_len=5")
    assert compute_metrics([short], 1.0)["failed"] == 1
