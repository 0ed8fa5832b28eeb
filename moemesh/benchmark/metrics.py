"""What one request measured, and the serving metrics over a run, named as vLLM's serving benchmark names them
(`mean_ttft_ms`, `p99_itl_ms`, `request_goodput`, ...). Pure: no I/O, no clock.

Definitions (per successful request; times in seconds from the moment the request was sent):
* TTFT: until the first generated token arrived.
* ITL: the gaps between successive token arrivals. A chunk that brings k > 1 tokens after a gap g counts as
  k gaps of g / k (the tokens of one decode step, or of a stream that batched several steps), so a request
  of n tokens always has n - 1 ITLs.
* TPOT: (E2E - TTFT) / (n - 1) for n > 1 tokens; n <= 1 has no TPOT (for goodput it counts as 0, as in vLLM).
* E2E: until the last chunk arrived.
* goodput: successful requests with TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms (the SLOs given), per second
  of the run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

PERCENTILES = (90, 99)  # and the median
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    """One request as the client saw it; `error` is set (and the rest partial) when it failed."""

    prompt_len: int
    expected_output_len: int
    token_times_s: list[float] = field(default_factory=list)  # arrival of each generated token
    output_len: int = 0
    latency_s: float = 0.0  # E2E: until the stream ended
    error: str = ""

    @property
    def success(self) -> bool:
        return not self.error

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] if self.token_times_s else self.latency_s

    @property
    def itls_s(self) -> list[float]:
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        if self.output_len <= 1:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)

    def add_chunk(self, now_s: float, num_tokens: int) -> None:
        """Records a chunk of `num_tokens` arriving at `now_s`: the first token at once, a later chunk's k
        tokens spread evenly over the gap since the previous token."""
        if num_tokens <= 0:
            return
        if not self.token_times_s:
            self.token_times_s.append(now_s)
            num_tokens -= 1
            last = now_s
        else:
            last = self.token_times_s[-1]
        gap = (now_s - last) / num_tokens if num_tokens else 0.0
        self.token_times_s += [last + gap * (i + 1) for i in range(num_tokens)]
        self.output_len = len(self.token_times_s)


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput; None = not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"slo {name}={value!r} must be a number > 0")

    @property
    def given(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met(self, result: RequestResult) -> bool:
        if not result.success:
            return False
        if self.ttft_ms is not None and result.ttft_s * 1000 > self.ttft_ms:
            return False
        tpot_s = result.tpot_s or 0.0
        return self.tpot_ms is None or tpot_s * 1000 <= self.tpot_ms


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile with linear interpolation between the closest ranks (numpy's default method)."""
    if not values:
        return 0.0
    if not 0 <= p <= 100:
        raise ValueError(f"percentile p={p!r} must be in [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def compute_metrics(results: list[RequestResult], duration_s: float, slo: Slo | None = None) -> dict:
    """The run's metrics (vLLM's names). Latency statistics cover the successful requests; throughputs
    divide by `duration_s`, the wall time from the first send to the last completion."""
    if duration_s <= 0:
        raise ValueError(f"duration_s={duration_s!r} must be > 0")
    ok = [r for r in results if r.success]
    samples_s = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [gap for r in ok for gap in r.itls_s],
        "e2el": [r.latency_s for r in ok],
    }
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    metrics: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "request_goodput": None,
    }
    if slo is not None and slo.given:
        metrics["request_goodput"] = sum(slo.met(r) for r in results) / duration_s
    for name in LATENCIES:
        ms = [1000 * v for v in samples_s[name]]
        metrics[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        metrics[f"median_{name}_ms"] = percentile(ms, 50)
        metrics[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for p in PERCENTILES:
            metrics[f"p{p}_{name}_ms"] = percentile(ms, p)
    return metrics
