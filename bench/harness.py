"""What every benchmark records: the card, the date, the commit, the device-to-device copy bandwidth measured in
the same run, and the median time of a callable (CUDA events through triton.testing.do_bench)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import torch
import triton


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def commit() -> str:
    """The commit under test; MOEMESH_COMMIT wins (the GPU machine gets a copy of the tree without .git)."""
    if os.environ.get("MOEMESH_COMMIT"):
        return os.environ["MOEMESH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_median_ms(fn, rep_ms: int = 100) -> float:
    """Median over replays of a CUDA graph of `fn` (how a decode step runs in serving): no launch or host
    overhead in the number."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy of `num_bytes`, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / ms / 1e6


def header() -> dict:
    return {
        "card": card(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def write_json(name: str, payload: dict, out_dir: str | None = None) -> Path:
    """Writes `<out_dir>/<name>.json` (default bench/results) and returns its path."""
    out = Path(out_dir or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return "" if v is None else str(v)


def save_plot(name: str, panels: list[dict], out_dir: str | None = None) -> Path | None:
    """One PNG with a panel per dict {title, xlabel, ylabel, series: {label: (xs, ys)}, hline: (y, label)?,
    logx: bool?, styles: {label: matplotlib kwargs}?}. Returns None (and says so) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install -e .[bench])")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, label=label, **{"marker": "o", **panel.get("styles", {}).get(label, {})})
        if panel.get("hline"):
            y, label = panel["hline"]
            ax.axhline(y, color="gray", linestyle="--", label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_dir or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
