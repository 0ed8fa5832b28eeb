"""bench_ttft_path's arithmetic: a request's hops from its client times, the gateway's trace and usage.ttft."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.bench_ttft_path import HOPS, hops

ROOT = Path(__file__).resolve().parents[2]


def test_hops_split_a_request_between_the_client_the_gateway_and_the_decode_worker():
    trace = {
        "ttft_ms": 12.0,  # the gateway's arrival -> its first token
        "spans": [
            {"name": "gateway.generate", "start_ms": 0.0, "end_ms": 12.5},
            {"name": "decode.first_token", "start_ms": 1.0, "end_ms": 11.25},
        ],
    }
    sent_ns = 1_000_000_000
    got = hops(sent_ns, sent_ns + 14_500_000, trace, SimpleNamespace(queue_ms=0.25, prefill_ms=9.5))
    assert got == pytest.approx({
        "client_gateway_both": 2.5,  # 14.5 at the client - 12.0 at the gateway
        "gateway_to_decode": 1.0,
        "queue": 0.25,
        "prefill": 9.5,
        "decode_rest": 0.5,  # 10.25 in decode.first_token - 0.25 - 9.5
        "decode_to_gateway": 0.75,
        "ttft": 14.5,
        "outside_engine": 4.75,
    })  # fmt: skip


def test_the_bench_runs_on_the_tiny_colocated_mesh():
    """The command docs/performance.md names, reduced: every hop is printed, the engine's part and the rest."""
    done = subprocess.run([sys.executable, "-m", "bench.bench_ttft_path", "--requests", "4", "--warmup", "1",
                           "--spans"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = dict(line.split() for line in done.stdout.splitlines()[-9:])
    assert list(rows) == ["hop", *HOPS]
    medians = {hop: float(value) for hop, value in rows.items() if hop != "hop"}
    assert medians["ttft"] > medians["prefill"] > 0
    assert medians["outside_engine"] > 0  # D's queue + prefill lie inside the client's TTFT
    assert "decode.first_token" in done.stdout
