"""Prometheus metrics of every moemesh process: their names, units and help in one place.

No global registry: each process makes one `CollectorRegistry` in its composition root (main.py) and passes
it to what observes. Gauges and engine counters are read from the worker's live stats at scrape time
(`WorkerStatsCollector`), so nothing has to keep them current; histograms and event counters are observed
where the event happens.

    who             metric                                           kind       labels
    every process   moemesh_build_info                               info       version, role, model, device
    gateway         moemesh_time_to_first_token_seconds              histogram
                    moemesh_inter_token_latency_seconds              histogram  (one observation per token after the first)
                    moemesh_request_duration_seconds                 histogram  (request start -> last chunk, finished ones)
                    moemesh_requests_finished_total                  counter    finish_reason (stop | length)
                    moemesh_requests_failed_total                    counter    code (gRPC status name)
                    moemesh_prompt_tokens_total                      counter
                    moemesh_generation_tokens_total                  counter
                    moemesh_gateway_requests_inflight                gauge
                    moemesh_workers_registered                       gauge      role
    decode          moemesh_request_queue_time_seconds               histogram  (arrival -> KV pages reserved)
                    moemesh_kv_pages_leased                          gauge      (reserved for a prefill worker's writes)
    prefill         moemesh_kv_transfer_bytes_total                  counter
                    moemesh_kv_transfer_seconds                      histogram  (forward's end -> last chunk acked)
                    moemesh_kv_transfer_failures_total               counter
    engine workers  moemesh_requests_running / _waiting              gauge
                    moemesh_kv_pages_total / _used / _free / _cached gauge
                    moemesh_prefix_cache_hit_tokens_total            counter
                    moemesh_prefill_tokens_computed_total            counter
                    moemesh_preemptions_total                        counter
                    moemesh_engine_steps_total                       counter
    expert pool     moemesh_expert_tokens_total                      counter    layer, expert
                    moemesh_expert_batches_total                     counter
                    moemesh_expert_batch_tokens_total                counter    (token rows received)
                    moemesh_expert_compute_seconds                   histogram  (one batch's compute)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "moemesh"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds. TTFT and end-to-end span CPU meshes (seconds) and GPU ones (milliseconds).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def new_registry() -> CollectorRegistry:
    """A registry of this process alone (never prometheus_client's global REGISTRY)."""
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in `registry` (serve with CONTENT_TYPE)."""
    return generate_latest(registry)


def register_build_info(
    registry: CollectorRegistry, *, version: str, role: str, model: str, device: str
) -> None:
    info = Info(f"{PREFIX}_build", "the moemesh build and what this process serves", registry=registry)
    info.info({"version": version, "role": role, "model": model, "device": device})


# --- gateway ----------------------------------------------------------------------------------------------


class GatewayMetrics:
    """Request-level metrics, observed as the gateway relays each stream (`request()` per request)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "request arrival at the gateway -> its first token relayed",
                              buckets=LATENCY_BUCKETS_S, registry=registry)  # fmt: skip
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                             "time between two tokens of a request (a chunk of k tokens: k observations)",
                             buckets=TOKEN_BUCKETS_S, registry=registry)  # fmt: skip
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                  "request arrival at the gateway -> its last chunk, finished requests",
                                  buckets=LATENCY_BUCKETS_S, registry=registry)  # fmt: skip
        self.finished = Counter(f"{PREFIX}_requests_finished", "requests that finished, by finish reason",
                                ["finish_reason"], registry=registry)  # fmt: skip
        self.failed = Counter(f"{PREFIX}_requests_failed", "requests that ended with an error status",
                              ["code"], registry=registry)  # fmt: skip
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests",
                                     registry=registry)  # fmt: skip
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens relayed to clients",
                                         registry=registry)  # fmt: skip

    def request(self, clock: Callable[[], float] = time.monotonic) -> RequestTimer:
        return RequestTimer(self, clock)

    def register_live(
        self, registry: CollectorRegistry, inflight: Callable[[], int], workers: Callable[[], dict[str, int]]
    ) -> None:
        """Gauges read at scrape time: requests in flight here, registered workers by role."""
        registry.register(_GatewayLive(inflight, workers))


class RequestTimer:
    """One request's clock: `tokens(n)` for each relayed chunk, then `finished(...)` or `failed(code)`."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock
        self.start_s = clock()
        self.last_token_s: float | None = None
        self.num_tokens = 0

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = self.clock()
        if self.last_token_s is None:
            self.metrics.ttft.observe(now - self.start_s)
            gaps = [0.0] * (count - 1)  # the rest of the first chunk came with the first token
        else:
            gaps = [(now - self.last_token_s) / count] * count
        for gap in gaps:
            self.metrics.itl.observe(gap)
        self.last_token_s = now
        self.num_tokens += count
        self.metrics.generation_tokens.inc(count)

    def finished(self, finish_reason: str, num_prompt_tokens: int) -> None:
        self.metrics.duration.observe(self.clock() - self.start_s)
        self.metrics.finished.labels(finish_reason).inc()
        self.metrics.prompt_tokens.inc(num_prompt_tokens)

    def failed(self, code: str) -> None:
        self.metrics.failed.labels(code).inc()


class _GatewayLive:
    def __init__(self, inflight: Callable[[], int], workers: Callable[[], dict[str, int]]) -> None:
        self.inflight = inflight
        self.workers = workers

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_gateway_requests_inflight", "requests this gateway is relaying",
                                value=self.inflight())  # fmt: skip
        by_role = GaugeMetricFamily(f"{PREFIX}_workers_registered", "live registered workers",
                                    labels=["role"])  # fmt: skip
        for role, count in sorted(self.workers().items()):
            by_role.add_metric([role], count)
        yield by_role


# --- workers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStats:
    """A worker's engine at one moment (what `WorkerStatsCollector` reports at each scrape)."""

    num_running: int
    num_waiting: int
    pages_total: int
    pages_free: int  # never used or evicted
    pages_cached: int  # held only by the prefix cache (evictable)
    prefix_hit_tokens: int  # since start
    prefill_tokens_computed: int
    num_preemptions: int
    num_steps: int
    pages_leased: int | None = None  # decode workers: reserved for a prefill worker's writes

    @property
    def pages_used(self) -> int:
        """Referenced by a request or a KV lease."""
        return self.pages_total - self.pages_free - self.pages_cached


class WorkerStatsCollector:
    """Reads `stats()` at each scrape (on the event loop's thread; it must be cheap and never block)."""

    def __init__(self, stats: Callable[[], WorkerStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        gauges = [
            ("requests_running", "requests in the engine's running batch", s.num_running),
            ("requests_waiting", "requests queued in the engine", s.num_waiting),
            ("kv_pages_total", "KV cache pages of this worker", s.pages_total),
            ("kv_pages_used", "KV pages referenced by a request or a lease", s.pages_used),
            ("kv_pages_free", "KV pages on the free list", s.pages_free),
            ("kv_pages_cached", "KV pages held only by the prefix cache (evictable)", s.pages_cached),
        ]
        if s.pages_leased is not None:
            gauges.append(
                ("kv_pages_leased", "KV pages reserved for a prefill worker's writes", s.pages_leased)
            )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = [
            (
                "prefix_cache_hit_tokens",
                "prompt tokens whose KV came from the prefix cache",
                s.prefix_hit_tokens,
            ),
            ("prefill_tokens_computed", "prompt tokens this worker computed", s.prefill_tokens_computed),
            ("preemptions", "requests preempted for lack of KV pages", s.num_preemptions),
            ("engine_steps", "engine steps run", s.num_steps),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class DecodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_time = Histogram(f"{PREFIX}_request_queue_time_seconds",
                                    "decode worker: request arrival -> its KV pages reserved (or queued)",
                                    buckets=LATENCY_BUCKETS_S, registry=registry)  # fmt: skip


class PrefillMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.kv_bytes = Counter(f"{PREFIX}_kv_transfer_bytes", "KV bytes sent to decode workers",
                                registry=registry)  # fmt: skip
        self.kv_seconds = Histogram(f"{PREFIX}_kv_transfer_seconds",
                                    "a prompt's forward end -> its last KV chunk acknowledged",
                                    buckets=TOKEN_BUCKETS_S, registry=registry)  # fmt: skip
        self.kv_failures = Counter(f"{PREFIX}_kv_transfer_failures", "prefills whose KV transfer failed",
                                   registry=registry)  # fmt: skip


class ExpertMetrics:
    """An expert-pool worker's work: tokens routed to each expert (`record_tokens` per layer and micro-batch),
    batches and token rows served (`record_batch`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter(f"{PREFIX}_expert_tokens", "tokens an expert computed", ["layer", "expert"],
                              registry=registry)  # fmt: skip
        self.batches = Counter(f"{PREFIX}_expert_batches", "expert batches (one layer of one micro-batch) served",
                               registry=registry)  # fmt: skip
        self.batch_tokens = Counter(f"{PREFIX}_expert_batch_tokens", "token rows received in expert batches",
                                    registry=registry)  # fmt: skip
        self.compute_seconds = Histogram(f"{PREFIX}_expert_compute_seconds", "one expert batch's compute",
                                         buckets=TOKEN_BUCKETS_S, registry=registry)  # fmt: skip

    def record_tokens(self, layer: int, tokens_per_expert: Sequence[int], first_expert: int = 0) -> None:
        """tokens_per_expert[i]: tokens expert `first_expert + i` of `layer` computed (zeros are skipped)."""
        for i, count in enumerate(tokens_per_expert):
            if count:
                self.tokens.labels(str(layer), str(first_expert + i)).inc(int(count))

    def record_batch(self, num_tokens: int, seconds: float) -> None:
        self.batches.inc()
        self.batch_tokens.inc(num_tokens)
        self.compute_seconds.observe(seconds)
