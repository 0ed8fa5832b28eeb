"""What a serving benchmark writes: the JSON every moemesh benchmark writes (name, card, date, commit, config,
metrics, peer, ratio at the top level), a table on stdout, and a PNG (matplotlib, optional)."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

TABLE_KEYS = (
    "completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
    "p90_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms",
)  # fmt: skip
# Metrics where higher is better (ratios of them read "ours / peer"); the rest are latencies.
HIGHER_IS_BETTER = ("request_throughput", "request_goodput", "output_throughput", "total_token_throughput")


def commit() -> str:
    """The commit under test; MOEMESH_COMMIT wins (a copy of the tree without .git)."""
    if os.environ.get("MOEMESH_COMMIT"):
        return os.environ["MOEMESH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def header(name: str, card: str) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "name": name,
        "card": card,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "client_host_load_avg_1_5_15": [round(x, 2) for x in load] if load else None,
        "client_host_cpus": os.cpu_count(),
    }


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def print_table(rows: list[dict], out=sys.stdout) -> None:
    """One column per run (labelled by its `label`), one line per metric."""
    labels = [str(r.get("label", i)) for i, r in enumerate(rows)]
    width = max(12, *(len(label) for label in labels))
    print(f"{'metric':26s}" + "".join(f"{label:>{width + 2}s}" for label in labels), file=out)
    for key in TABLE_KEYS:
        cells = []
        for r in rows:
            v = r.get(key)
            cells.append("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        print(f"{key:26s}" + "".join(f"{c:>{width + 2}s}" for c in cells), file=out)


def ratios(ours: dict, peer: dict) -> dict:
    """ours / peer for every numeric metric the table shows (throughputs: > 1 is better; latencies: < 1)."""
    out = {}
    for key in TABLE_KEYS:
        if key in ("completed", "failed", "duration"):
            continue
        a, b = ours.get(key), peer.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and b:
            out[key] = a / b
    return out


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=False) + "\n")
    return path


def _json_default(value):
    raise TypeError(f"not JSON: {value!r}")


def sanitize(value):
    """inf -> "inf" (JSON has no infinity), recursively."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install 'moemesh[bench]')", file=sys.stderr)
        return None
    return plt


def plot_run(path: str | Path, samples_ms: dict[str, list[float]], title: str) -> Path | None:
    """One run: the distribution (CDF) of TTFT, TPOT, ITL and E2E latency."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(samples_ms), figsize=(4.2 * len(samples_ms), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], samples_ms.items(), strict=True):
        ordered = sorted(values)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))] if ordered else [])
        ax.set(title=f"{name} (ms)", xlabel="ms", ylabel="fraction of samples")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)


def plot_sweep(path: str | Path, curves: dict[str, list[dict]], title: str) -> Path | None:
    """Latency against achieved throughput, one line per curve (its runs in sweep order): TTFT and TPOT
    (median and p99) against output tokens/s, and output tokens/s against the offered request rate."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, runs in curves.items():
        x = [r["output_throughput"] for r in runs]
        for ax, metric in zip(axes[:2], ("ttft", "tpot"), strict=True):
            (line,) = ax.plot(
                x, [r[f"median_{metric}_ms"] for r in runs], marker="o", label=f"{label} median"
            )
            ax.plot(x, [r[f"p99_{metric}_ms"] for r in runs], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{label} p99")  # fmt: skip
        offered = [r["request_rate"] for r in runs]
        finite = [o for o in offered if o != "inf" and not (isinstance(o, float) and math.isinf(o))]
        top = 2 * max(finite) if finite else 1.0
        xs = [top if (o == "inf" or (isinstance(o, float) and math.isinf(o))) else o for o in offered]
        axes[2].plot(xs, [r["request_throughput"] for r in runs], marker="o", label=label)
    axes[0].set(title="TTFT vs throughput", xlabel="output tokens/s", ylabel="ms")
    axes[1].set(title="TPOT vs throughput", xlabel="output tokens/s", ylabel="ms per output token")
    axes[2].set(title="achieved vs offered (inf drawn at 2x the top rate)", xlabel="offered requests/s",
                ylabel="completed requests/s")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
