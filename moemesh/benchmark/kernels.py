"""`moemesh bench kernels`: every kernel benchmark (bench/bench_mla.py, bench_prefill.py, bench_fp8_gemm.py,
bench_moe_route.py, bench_sample.py, through bench/run_all.py), then one table of ratios from their JSON: how
many times faster than the peer each measured, and what fraction of the physical limit it reaches.

bench/ is not installed: run this from a source checkout (the checkout holding the installed `moemesh`, or
the current directory). Without a CUDA GPU nothing is measured: it says so, prints the last committed results
(bench/results, labelled with their card, date and commit) and exits 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

JOBS = "mla,prefill,fp8_gemm,moe_route,sample"


@dataclass(frozen=True)
class KernelRow:
    bench: str
    case: str
    ours: str  # the measurement with its unit
    vs_peer: float | None  # peer time / our time (> 1: faster than the peer)
    peer: str
    vs_limit: float | None  # fraction of the limit reached (<= 1)
    limit: str


def _mla_decode(d: dict) -> list[KernelRow]:
    rows = [KernelRow("mla_decode", f"b{r['batch']} ctx{r['ctx']} bf16", f"{r['bf16_us']:.1f} us",
                      r["torch_us"] / r["bf16_us"] if r.get("torch_us") else None, "torch absorbed MLA",
                      r["bf16_pct_copy"] / 100, "copy bw")
            for r in d.get("decode", [])]  # fmt: skip
    rows += [KernelRow("mla_pack", f"{r['op']} {r['pages']}p", f"{r['us']:.1f} us", None, "-",
                       r["pct_copy"] / 100, "copy bw") for r in d.get("pack", [])]  # fmt: skip
    return rows


def _mla_prefill(d: dict) -> list[KernelRow]:
    return [KernelRow("mla_prefill", f"b{r['batch']} chunk{r['chunk']} prefix{r['prefix']}",
                      f"{r['ours_TFLOPs']:.0f} TFLOP/s", r.get("vs_cudnn"), "cuDNN SDPA", None, "-")
            for r in d.get("prefill", [])]  # fmt: skip


def _fp8_gemm(d: dict) -> list[KernelRow]:
    top = d.get("scaled_mm_8192_tflops")
    rows = [KernelRow("fp8_grouped", f"e{r['experts']} m{r['rows']} n{r['n']} k{r['k']}",
                      f"{r['ours_tflops']:.0f} TFLOP/s", r["ratio"], "torch._scaled_grouped_mm",
                      r["ours_tflops"] / top if top else None, "torch._scaled_mm at 8192^3")
            for r in d.get("contiguous", [])]  # fmt: skip
    rows += [KernelRow("fp8_dense", f"{r['proj']} m{r['m']}", f"{r['ours_us']:.1f} us", r["speedup"],
                       "torch._scaled_mm", None, "-") for r in d.get("dense", [])]  # fmt: skip
    return rows


def _moe_route(d: dict) -> list[KernelRow]:
    return [KernelRow("moe_route", f"{r['op']} t{r['tokens']}", f"{r['ours_us']:.1f} us", r["speedup"],
                      r.get("peer", "plain torch"), None, "-") for r in d.get("rows", [])]  # fmt: skip


def _sample(d: dict) -> list[KernelRow]:
    return [KernelRow("sample", f"b{r['batch']} {r['mode']}", f"{r['ours_us']:.1f} us", r["speedup"],
                      "torch sort", r["read_once_us"] / r["ours_us"], "read logits once")
            for r in d.get("rows", [])]  # fmt: skip


SUMMARIES = {"mla_decode": _mla_decode, "mla_prefill": _mla_prefill, "fp8_gemm": _fp8_gemm,
             "moe_route": _moe_route, "sample": _sample}  # fmt: skip


def summarize(results_dir: Path, card: str | None = None) -> list[tuple[dict, list[KernelRow]]]:
    """(the result's card/date/commit, its rows) for every kernel result in `results_dir` (of `card` when
    given), in SUMMARIES order."""
    out = []
    for prefix, rows_of in SUMMARIES.items():
        for path in sorted(results_dir.glob(f"{prefix}-*.json")):
            data = json.loads(path.read_text())
            if card is not None and data.get("card") != card:
                continue
            meta = {k: data.get(k, "?") for k in ("card", "date", "commit")} | {"file": str(path)}
            try:
                out.append((meta, rows_of(data)))
            except (KeyError, TypeError, ZeroDivisionError) as err:
                print(f"{path}: unexpected layout ({err!r}), skipped", file=sys.stderr)
    return out


def print_summary(groups: list[tuple[dict, list[KernelRow]]], out=sys.stdout) -> None:
    cols = ("bench", "case", "ours", "vs_peer", "peer", "vs_limit", "limit")
    for meta, rows in groups:
        print(f"\n{meta['file']}  (card {meta['card']}, {meta['date']}, commit {meta['commit']})", file=out)
        cells = [[r.bench, r.case, r.ours, _x(r.vs_peer), r.peer, _pct(r.vs_limit), r.limit] for r in rows]
        widths = [
            max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)
        ]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), file=out)
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)), file=out)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def find_checkout(given: str | None) -> Path:
    """The source checkout with bench/: --checkout, else the one holding the installed moemesh, else cwd."""
    import moemesh

    candidates = [Path(given)] if given else [Path(moemesh.__file__).resolve().parent.parent, Path.cwd()]
    for root in candidates:
        if (root / "bench" / "run_all.py").is_file():
            return root
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no bench/run_all.py under {where}: run from a moemesh source checkout")


def cuda_devices(python: str) -> int:
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return 0
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="run every kernel benchmark (CUDA GPU, source checkout)",
                              description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])  # fmt: skip
    p.add_argument("--checkout", default=None, metavar="DIR", help="the source checkout holding bench/")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (default bench/results)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first")
    p.add_argument("--quick", action="store_true", help="the short variant where a benchmark has one")
    p.set_defaults(func=cmd_kernels)


def cmd_kernels(args) -> int:
    try:
        root = find_checkout(args.checkout)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    committed = root / "bench" / "results"
    if cuda_devices(sys.executable) == 0:
        print("no CUDA GPU here: kernel benchmarks need one; nothing was measured.\n"
              f"The last COMMITTED results ({committed}), NOT measured now:")  # fmt: skip
        print_summary(summarize(committed))
        return 1
    out = Path(args.out).resolve() if args.out else committed
    argv = [sys.executable, "-m", "bench.run_all", "--only", JOBS, "--out", str(out)]
    argv += ["--skip-tests"] * args.skip_tests + ["--quick"] * args.quick
    code = subprocess.run(argv, cwd=root).returncode
    card = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"\nkernel benchmarks on {card} (vs_peer: peer time / ours; vs_limit: share of the limit):")
    print_summary(summarize(out, card))
    return code
