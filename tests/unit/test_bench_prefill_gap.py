"""bench/bench_prefill_gap.py in its reduced CPU form: the engine, worker and pd-mesh phases each record every
request of every wave (x1 repeated, xC with 1 and with N new tokens), the mesh's all prefilled remotely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reduced_cpu_run_records_every_request_of_every_phase(tmp_path):
    pytest.importorskip("ucxx")
    argv = [sys.executable, "-m", "bench.bench_prefill_gap", "--device", "cpu", "--shape", "tiny", "--layers", "1",
            "--prompt-tokens", "40,72", "--concurrency", "3", "--repeats", "3", "--new-tokens", "3",
            "--modes", "pd", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads((tmp_path / "prefill-gap-cpu.json").read_text())
    assert payload["card"] == "cpu" and payload["commit"] and payload["partial"] is False
    rows = {(r["phase"], r["case"]): r["requests"] for r in payload["rows"]}
    x1 = ["40x1#0", "40x1#1", "40x1#2", "72x1#0"]
    for phase in ("engine", "worker-switch5ms", "worker-switch0.5ms"):
        assert [case for p, case in rows if p == phase] == [*x1, "40x3", "72x3"]
        assert len(rows[phase, "72x3"]) == 3 and len(rows[phase, "40x1#0"]) == 1
    assert all(r["ms"] > 0 for r in rows["engine", "72x3"])
    worker = rows["worker-switch5ms", "72x3"]
    assert all(r["wall_ms"] >= r["prefill_ms"] > 0 for r in worker)
    mesh = [
        (r["phase"], r["case"], len(r["requests"])) for r in payload["rows"] if r["phase"].startswith("mesh")
    ]
    assert mesh == [*[("mesh-pd-new3", c, 1) for c in x1], ("mesh-pd-new1", "40x3", 3), ("mesh-pd-new3", "40x3", 3),
                    ("mesh-pd-new1", "72x3", 3), ("mesh-pd-new3", "72x3", 3)]  # fmt: skip
    mesh_requests = [q for r in payload["rows"] if r["phase"].startswith("mesh") for q in r["requests"]]
    assert all(q["remote"] and q["prefill_ms"] > 0 and q["ttft_ms"] > 0 for q in mesh_requests)
    assert payload["pd_prefill_fallbacks"] == 0
    assert any("mesh-pd-new1       72x3      prefill_ms" in line for line in payload["summary"])
