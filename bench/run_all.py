"""Every benchmark this machine can run, one after another, each in its own process with a time limit; a
summary line per benchmark at the end (`make bench`). Results land in bench/results/ (or --out) as each
benchmark writes them: JSON + PNG with card, date and commit.

* always: `bench_mesh` (CPU, demo model: the pd mesh against the in-process engine) and `bench_serve` (CPU, demo
  model: in-process vs colocated vs pd at several request rates);
* with one CUDA GPU: MLA decode + pack/unpack, MLA prefill, FP8 GEMMs, MoE routing, sampling, the engine
  (BF16 and FP8, against transformers), the serving benchmark at V2-Lite shapes (colocated and pd on the one
  GPU, BF16 and FP8), and `pytest -m gpu` first (a benchmark of wrong kernels is worthless);
* with two or more: the P -> D KV transfer over UCX against NCCL.

    python -m bench.run_all [--only mesh,mla,...] [--skip-tests] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str
    argv: tuple[str, ...]
    gpus: int  # how many CUDA devices it needs
    limit_s: int
    quick: tuple[str, ...] = ("--quick",)  # what --quick adds


JOBS = (
    Job("gpu-tests", ("-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"), 1, 900, ()),
    Job("mla", ("-m", "bench.bench_mla"), 1, 900),
    Job("prefill", ("-m", "bench.bench_prefill"), 1, 600, ()),
    Job("fp8_gemm", ("-m", "bench.bench_fp8_gemm"), 1, 900),
    Job("moe_route", ("-m", "bench.bench_moe_route"), 1, 300, ()),
    Job("sample", ("-m", "bench.bench_sample"), 1, 300, ()),
    Job("engine", ("-m", "bench.bench_engine", "--fp8"), 1, 1800),
    Job("kv_transfer", ("-m", "bench.bench_kv_transfer", "--device", "cuda"), 2, 900),
    Job("mesh", ("-m", "bench.bench_mesh"), 0, 900, ()),
    Job("serve", ("-m", "bench.bench_serve"), 0, 900, ()),
    Job("serve_gpu", ("-m", "bench.bench_serve", "--device", "cuda"), 1, 900, ()),
    Job("serve_gpu_fp8", ("-m", "bench.bench_serve", "--device", "cuda", "--fp8"), 1, 900, ()),
)


def num_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(only: set[str] | None, skip_tests: bool, gpus: int) -> tuple[list[Job], list[tuple[str, str]]]:
    """(the jobs to run, (name, why not) for the others)."""
    run, skipped = [], []
    for job in JOBS:
        if only is not None and job.name not in only:
            continue
        if job.name == "gpu-tests" and skip_tests:
            skipped.append((job.name, "--skip-tests"))
        elif job.gpus > gpus:
            skipped.append((job.name, f"needs {job.gpus} CUDA GPU(s), this machine has {gpus}"))
        else:
            run.append(job)
    return run, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated: " + ",".join(j.name for j in JOBS))
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first")
    parser.add_argument("--quick", action="store_true", help="the short variant where a benchmark has one")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {j.name for j in JOBS}
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {[j.name for j in JOBS]}")
    jobs, skipped = plan(only, args.skip_tests, num_gpus())
    summary = [(name, "skipped", why) for name, why in skipped]
    for job in jobs:
        argv = [sys.executable, *job.argv]
        if args.quick:
            argv += job.quick
        if args.out and job.name != "gpu-tests":
            argv += ["--out", args.out]
        print(f"== {job.name}: {' '.join(argv[1:])} (limit {job.limit_s} s)", flush=True)
        start = time.monotonic()
        try:
            code = subprocess.run(argv, timeout=job.limit_s).returncode
            verdict = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            verdict = f"over its {job.limit_s} s limit"
        summary.append((job.name, verdict, f"{time.monotonic() - start:.0f} s"))
        if job.name == "gpu-tests" and verdict != "ok":
            print("GPU tests failed: not benchmarking kernels that are wrong", flush=True)
            break
    print("\n".join(f"{name:12s} {verdict:24s} {detail}" for name, verdict, detail in summary))
    return 0 if all(v in ("ok", "skipped") for _, v, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
