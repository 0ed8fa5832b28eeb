"""500 concurrent greedy streams against the CPU demo mesh (float32), through `bench.bench_load`: every stream
completes with the tokens of its prompt sent alone (no lost or duplicated token), no worker's memory grows
without bound, the gateway refuses what is over its in-flight limit with RESOURCE_EXHAUSTED naming it, and
no page is left leased."""

from __future__ import annotations

import argparse

from bench.bench_load import measure

MIB = 1 << 20


def test_500_concurrent_streams_each_equal_its_request_alone():
    args = argparse.Namespace(streams=500, distinct=50, max_tokens=16, topology="pd", out_dir=None)
    result, wave, _ = measure(args)
    m = result["metrics"]
    assert m["completed"] == 500 and m["refused"] == 0
    assert m["mismatched"] == 0
    assert all(len(tokens) == 16 for tokens in wave.tokens)
    for name, before in m["rss_before_bytes"].items():  # 500 streams in flight cost each process < 256 MiB
        assert m["rss_after_bytes"][name] - before < 256 * MIB, (name, before, m["rss_after_bytes"][name])
    assert m["over_limit_refused"] >= 1
    assert "max_inflight=500" in m["over_limit_message"]
    assert m["leaked_pages"] == {"prefill-0": 0, "decode-0": 0}
