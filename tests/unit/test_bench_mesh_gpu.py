"""bench/bench_mesh_gpu.py in its reduced CPU form: a tiny checkpoint, the pd mesh, JSON + PNG with the
header; every request prefilled remotely and the verdict lines computed from the rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_mesh_gpu import verdicts

ROOT = Path(__file__).resolve().parents[2]


def test_verdicts_compare_pd_with_colocated_and_in_process():
    base = {"model": "m", "prompt_tokens": 512, "concurrency": 1}
    rows = [
        {**base, "mode": "in-process", "ttft_ms": 30.0, "tpot_ms": 2.0, "out_tok_s": 100.0},
        {**base, "mode": "colocated", "ttft_ms": 40.0, "tpot_ms": 2.1, "out_tok_s": 96.0},
        {**base, "mode": "pd", "ttft_ms": 44.0, "tpot_ms": 2.2, "out_tok_s": 90.0, "remote_prefills": 3,
         "requests": 3, "kv_tail_share_of_ttft": 0.02},
    ]  # fmt: skip
    (line,) = verdicts(rows)
    assert line == (
        "('m', 512, 1): remote 3/3; KV tail 2.0 % of TTFT (<= 10 %); pd/colocated TTFT 1.10x (<= 1.2x); "
        "pd TPOT / in-process 1.10x (<= 1.1x); colocated tok/s / in-process 0.96x (>= 0.95x at 32)"
    )


@pytest.mark.slow
def test_reduced_cpu_run_writes_json_and_png(tmp_path):
    pytest.importorskip("ucxx")
    argv = [sys.executable, "-m", "bench.bench_mesh_gpu", "--device", "cpu", "--shape", "tiny", "--layers", "1",
            "--dtypes", "bf16", "--modes", "pd", "--concurrency", "2", "--prompt-tokens", "40",
            "--new-tokens", "3", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads((tmp_path / "mesh-gpu-cpu.json").read_text())
    assert payload["card"] == "cpu" and payload["commit"] and payload["date"]
    (row,) = payload["rows"]
    assert (row["mode"], row["prompt_tokens"], row["concurrency"]) == ("pd", 40, 2)
    assert (
        row["waves"] == 3 and row["remote_prefills"] == row["requests"] == 6 and row["prefill_fallbacks"] == 0
    )
    assert row["kv_bytes_per_request"] == 40 * 1 * (64 + 16) * 2  # tokens x layers x (kv_lora + rope) x bf16
    assert row["ttft_breakdown_ms"]["prefill_ms"] > 0 and row["tpot_ms"] > 0
    assert payload["verdicts"][0].startswith("('tiny-1L-bf16', 40, 2): remote 6/6")
    assert (tmp_path / "mesh-gpu-cpu.png").stat().st_size > 1000
