"""bench/bench_kv_transfer.py on CPU at a tiny size (`--quick`: 4 layers, 8 pages, two configurations): its
processes move real pages over UCX (TCP on loopback) and gloo, check them and exit; and its page check catches
a misplaced or stray page."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("ucxx", reason="ucxx is in the [server] extra")

from bench.kv_transfer_child import PAGE_BYTES, POISON, Setup, make_kv, pages_intact  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_quick_cpu_run_moves_verified_pages_and_measures_the_all_reduce_peer(tmp_path):
    # --timeout-s bounds hangs; it is no speed test (20 s timed out on a loaded 2-core box)
    cmd = [sys.executable, "-m", "bench.bench_kv_transfer", "--device", "cpu", "--quick", "--out", str(tmp_path),
           "--timeout-s", "120"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "kv_transfer-cpu-quick.json").read_text())
    assert (tmp_path / "kv_transfer-cpu-quick.png").stat().st_size > 0

    assert result["card"] == "cpu" and result["p_device"] == result["d_device"] == "cpu"
    assert result["verified"] is True
    rows = result["rows"]
    # 512 tokens = 8 pages per layer: one chunk per layer (4 chunks) and 2-page chunks (16), all in flight
    assert [(r["chunk_pages"], r["chunks"], r["inflight"]) for r in rows] == [(8, 4, 4), (2, 16, 16)]
    for row in rows:
        assert row["verified"] is True
        assert row["MB"] == pytest.approx(4 * 8 * PAGE_BYTES / 1e6)
        assert 0 < row["GBs"] <= row["GBs_best"]
        assert row["ms"] == pytest.approx(row["MB"] / row["GBs"])
    assert [p["num_bytes"] for p in result["allreduce"]] == [1 << 16, 1 << 20]
    assert all(p["backend"] == "gloo" and p["busbw_gbs"] > 0 for p in result["allreduce"])
    busbw = max(p["busbw_gbs"] for p in result["allreduce"])
    assert result["allreduce_busbw_GBs"] == busbw
    assert result["best_ucx_GBs"] == max(r["GBs"] for r in rows)
    assert result["ratio"] == pytest.approx(result["best_ucx_GBs"] / busbw)
    assert result["meets_target"] == (result["ratio"] >= 0.5)
    assert result["ucx"]["ucx_tls"] == "tcp,self" and "tcp" in result["ucx"]["active_transports"]
    assert "meets" in proc.stdout or "misses" in proc.stdout


def test_page_check_catches_a_misplaced_or_stray_page():
    setup = Setup("cpu", num_layers=2, capacity_pages=6, transports="", net_devices="", progress_mode="thread",
                  seed=3, timeout_s=1.0)  # fmt: skip
    expected = make_kv(setup, torch.device("cpu"))  # [2, 6, PAGE_BYTES]
    assert not torch.equal(expected, make_kv(replace(setup, seed=4), torch.device("cpu")))
    page_ids = (4, 0, 5)

    def landed() -> list[torch.Tensor]:
        caches = [torch.full((6, PAGE_BYTES), POISON, dtype=torch.uint8) for _ in range(2)]
        for layer, cache in enumerate(caches):
            cache[list(page_ids)] = expected[layer, :3]
        return [cache.view(torch.bfloat16).view(6, 64, 576) for cache in caches]

    assert pages_intact(landed(), expected, page_ids)
    swapped = landed()
    swapped[1][[4, 0]] = swapped[1][[0, 4]]
    assert not pages_intact(swapped, expected, page_ids)
    stray = landed()
    stray[0][2].view(torch.uint8)[0, 7] = 0  # page 2 is no page of the lease
    assert not pages_intact(stray, expected, page_ids)
    missing = landed()
    missing[1][5].view(torch.uint8).fill_(POISON)
    assert not pages_intact(missing, expected, page_ids)
