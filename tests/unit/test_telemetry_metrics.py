"""moemesh/telemetry/metrics.py on a fake clock, read back through the Prometheus text format: the request
timer's TTFT / inter-token / duration observations, live worker stats read at scrape time, tokens per expert,
build info, and registries that share nothing."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from moemesh.telemetry.metrics import (
    ExpertMetrics,
    GatewayMetrics,
    WorkerStats,
    WorkerStatsCollector,
    new_registry,
    register_build_info,
    render,
)


def samples(registry) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_request_timer_observes_ttft_gaps_per_token_and_duration():
    registry, clock = new_registry(), Clock()
    metrics = GatewayMetrics(registry)
    timer = metrics.request(clock)
    clock.now += 0.5
    timer.tokens(2)  # first chunk: TTFT 0.5 s; its second token came with it (gap 0)
    clock.now += 0.3
    timer.tokens(3)  # 0.1 s per token
    timer.tokens(0)  # a chunk with no tokens (held-back text) observes nothing
    clock.now += 0.2
    timer.finished("length", num_prompt_tokens=7)
    metrics.request(clock).failed("RESOURCE_EXHAUSTED")
    s = samples(registry)
    assert s["moemesh_time_to_first_token_seconds_count"][()] == 1
    assert s["moemesh_time_to_first_token_seconds_sum"][()] == 0.5
    assert s["moemesh_inter_token_latency_seconds_count"][()] == 4  # 5 tokens, the first has a TTFT instead
    assert abs(s["moemesh_inter_token_latency_seconds_sum"][()] - 0.3) < 1e-9
    assert s["moemesh_inter_token_latency_seconds_bucket"][(("le", "0.001"),)] == 1  # the zero gap
    assert abs(s["moemesh_request_duration_seconds_sum"][()] - 1.0) < 1e-9
    assert s["moemesh_requests_finished_total"] == {(("finish_reason", "length"),): 1}
    assert s["moemesh_requests_failed_total"] == {(("code", "RESOURCE_EXHAUSTED"),): 1}
    assert s["moemesh_generation_tokens_total"][()] == 5 and s["moemesh_prompt_tokens_total"][()] == 7


def test_worker_stats_are_read_at_each_scrape_and_registries_share_nothing():
    state = {"running": 2, "cached": 3}

    def stats() -> WorkerStats:
        return WorkerStats(num_running=state["running"], num_waiting=1, pages_total=16, pages_free=10,
                           pages_cached=state["cached"], prefix_hit_tokens=8, prefill_tokens_computed=40,
                           num_preemptions=0, num_steps=5, pages_leased=2)  # fmt: skip

    registry = new_registry()
    registry.register(WorkerStatsCollector(stats))
    register_build_info(registry, version="9.9", role="decode", model="m", device="cpu")
    first = samples(registry)
    assert first["moemesh_requests_running"][()] == 2 and first["moemesh_kv_pages_used"][()] == 3
    assert (
        first["moemesh_kv_pages_leased"][()] == 2 and first["moemesh_prefix_cache_hit_tokens_total"][()] == 8
    )
    labels = (("device", "cpu"), ("model", "m"), ("role", "decode"), ("version", "9.9"))
    assert first["moemesh_build_info"] == {labels: 1}
    state.update(running=0, cached=6)
    second = samples(registry)
    assert second["moemesh_requests_running"][()] == 0 and second["moemesh_kv_pages_used"][()] == 0
    other = new_registry()
    GatewayMetrics(other)  # the same names in another registry: no clash, nothing shared
    assert "moemesh_requests_running" not in samples(other)


def test_expert_tokens_count_per_layer_and_expert():
    registry = new_registry()
    experts = ExpertMetrics(registry)
    experts.record_tokens(3, [4, 0, 2])
    experts.record_tokens(3, [1], first_expert=2)
    experts.record_tokens(5, [7])
    assert samples(registry)["moemesh_expert_tokens_total"] == {
        (("expert", "0"), ("layer", "3")): 4,
        (("expert", "2"), ("layer", "3")): 3,
        (("expert", "0"), ("layer", "5")): 7,
    }
