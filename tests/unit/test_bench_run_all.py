"""`make bench` (bench/run_all.py): which benchmarks a machine runs, and why it skips the others."""

from __future__ import annotations

import subprocess
import sys

from bench.run_all import JOBS, plan


def _names(jobs) -> list[str]:
    return [job.name for job in jobs]


def test_a_cpu_machine_runs_the_mesh_bench_and_says_why_it_skips_the_rest():
    run, skipped = plan(None, skip_tests=False, gpus=0)
    assert _names(run) == ["mesh", "serve"]
    assert dict(skipped)["kv_transfer"] == "needs 2 CUDA GPU(s), this machine has 0"
    assert dict(skipped)["mla"] == "needs 1 CUDA GPU(s), this machine has 0"
    assert dict(skipped)["serve_gpu"] == "needs 1 CUDA GPU(s), this machine has 0"
    assert len(run) + len(skipped) == len(JOBS)


def test_one_gpu_runs_the_gpu_tests_first_and_everything_but_the_two_gpu_transfer():
    run, skipped = plan(None, skip_tests=False, gpus=1)
    assert _names(run)[0] == "gpu-tests" and "engine" in _names(run) and "mla" in _names(run)
    assert [name for name, _ in skipped] == ["kv_transfer"]
    run, skipped = plan({"kv_transfer", "gpu-tests"}, skip_tests=True, gpus=2)
    assert _names(run) == ["kv_transfer"] and skipped == [("gpu-tests", "--skip-tests")]


def test_an_unknown_benchmark_name_is_refused_naming_it():
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--only", "mesh,warp"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--only: unknown ['warp']" in proc.stderr
