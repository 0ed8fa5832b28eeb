"""`moemesh bench kernels` on a machine without CUDA: it measures nothing, says so, shows the committed results
labelled as such, and exits 1; the summary reads every committed kernel result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moemesh.benchmark.kernels import summarize

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_the_committed_kernel_results_summarize_into_ratio_rows():
    groups = summarize(RESULTS, card="NVIDIA H200")
    files = {Path(meta["file"]).name for meta, _ in groups}
    assert {"mla_decode-NVIDIA_H200.json", "mla_prefill-NVIDIA_H200.json", "fp8_gemm-NVIDIA_H200.json",
            "moe_route-NVIDIA_H200.json", "sample-NVIDIA_H200.json"} <= files  # fmt: skip
    rows = {(r.bench, r.case): r for _, rs in groups for r in rs}
    assert rows["mla_prefill", "b4 chunk4096 prefix0"].vs_peer == pytest.approx(0.8377, abs=1e-4)  # vs_cudnn
    assert rows["fp8_grouped", "e4 m64 n4096 k7168"].vs_peer == pytest.approx(1.3971, abs=1e-4)
    assert rows["fp8_grouped", "e4 m64 n4096 k7168"].vs_limit == pytest.approx(299.4022 / 1321.4268, abs=1e-4)
    assert rows["sample", "b256 top_p0.95+min_p"].vs_peer == pytest.approx(3.7678, abs=1e-4)
    assert rows["sample", "b256 top_p0.95+min_p"].vs_limit == pytest.approx(31.1591 / 2387.3601, abs=1e-4)
    assert all(0 < r.vs_limit <= 1.0 for r in rows.values() if r.vs_limit is not None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the machine without a GPU")
def test_without_a_gpu_it_measures_nothing_and_says_so():
    done = subprocess.run([sys.executable, "-m", "moemesh.cli", "bench", "kernels"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert "no CUDA GPU here: kernel benchmarks need one; nothing was measured." in done.stdout
    assert "NOT measured now" in done.stdout and "mla_decode-NVIDIA_H200.json" in done.stdout
