"""bench/bench_expert.py's CPU form (`--quick`: tiny shapes, 1 and 8 tokens, BF16): both wires run, each with its
own expert process, from the bench's one event loop (the second wire used to fail with "attached to a different
loop"), and every row carries the joined client + expert-process timeline of its round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_expert

pytest.importorskip("ucxx", reason="ucxx is in the [server] extra")

ROOT = Path(__file__).resolve().parents[2]


def test_quick_cpu_run_measures_both_wires_with_a_per_hop_timeline(tmp_path):
    # its own process: the bench starts UCX with its own options (progress thread), which a test process may
    # already run with others
    cmd = [sys.executable, "-m", "bench.bench_expert", "--device", "cpu", "--quick", "--iters", "5", "--warmup", "1",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_expert-cpu-quick.json").read_text())
    assert result["failures"] == {}, result["failures"]
    assert result["card"] == "cpu" and result["commit"] and result["date"]
    rows = result["rows"]
    assert [(r["wire"], r["format"], r["tokens"]) for r in rows] == [
        ("device", "bf16", 1),
        ("device", "bf16", 8),
        ("host", "bf16", 1),
        ("host", "bf16", 8),
    ]
    assert result["path"] == "torch"  # a CPU worker's default
    for row in rows:
        assert row["remote_ms"] > 0 and row["local_ms"] > 0
        assert row["max_abs_diff_vs_local"] == 0.0  # BF16 tokens: the pool's rows are the local ones
        assert row["wire_ms"] == pytest.approx(row["remote_ms"] - row["local_ms"])
        hops = {h["event"]: h["since_submit_ms"] for h in row["hops"]}
        # both ends' marks joined on the batch id, in causal order along the round trip
        chain = ["submit", "built", "loop", "srv_header", "srv_payload", "compute_start", "compute_end",
                 "srv_computed", "output_received", "woke", "combined"]  # fmt: skip
        assert set(chain) <= set(hops), sorted(hops)
        assert [hops[e] for e in chain] == sorted(hops[e] for e in chain), hops
        assert (
            hops["combined"] <= row["remote_ms"] + 1e-6
        )  # the timed calls' own marks, inside their wall time


def test_bad_arguments_name_the_value(capsys):
    with pytest.raises(SystemExit):
        bench_expert.parse_args(["--wires", "host,nvlink"])
    assert "['nvlink'] not among device, host" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_expert.parse_args(["--iters", "0"])
    assert "--iters=0 must be >= 1" in capsys.readouterr().err
