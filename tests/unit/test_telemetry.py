"""Tracing in one process: the W3C traceparent round trip, parent links, the in-memory span store, the cheap
disabled path; the telemetry flags; JSON log lines tagged with request and trace ids; the text waterfall."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import time

import pytest

pytest.importorskip("opentelemetry.sdk")

from moemesh.config.telemetry import TelemetryConfig, add_arguments  # noqa: E402
from moemesh.telemetry import logs, waterfall  # noqa: E402
from moemesh.telemetry.trace_store import TraceStore  # noqa: E402
from moemesh.telemetry.tracing import Telemetry, trace_id_of, traceparent_from_metadata  # noqa: E402


def _parse(argv: list[str], env: dict[str, str] | None = None, **kw) -> TelemetryConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env or {}, **kw)
    return TelemetryConfig.from_args(parser.parse_args(argv))


def test_config_flags_environment_and_errors():
    assert _parse([]) == TelemetryConfig()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
        "MOEMESH_TRACE_BUFFER": "8",
        "MOEMESH_LOG_FORMAT": "json",
    }
    config = _parse([], env)
    assert (config.otlp_endpoint, config.trace_buffer, config.log_format) == ("collector:4317", 8, "json")
    assert _parse(["--otlp-endpoint", "other:1", "--trace-buffer", "0"], env).otlp_endpoint == "other:1"
    assert _parse([], request_log_level="WARNING").request_log_level == "WARNING"
    assert _parse(["--log-level", "debug"]).log_level == "DEBUG"
    assert not _parse(["--trace-buffer", "0"]).tracing
    up = _parse(["--otlp-endpoint", "c:1", "--log-format", "json"])
    assert up.child_args()[-2:] == ("--otlp-endpoint", "c:1") and "json" in up.child_args()
    with pytest.raises(ValueError, match="trace_buffer=-1 must be >= 0"):
        TelemetryConfig(trace_buffer=-1)
    with pytest.raises(ValueError, match="log_format='xml'"):
        TelemetryConfig(log_format="xml")
    with pytest.raises(SystemExit):  # argparse names the flag and the value
        _parse([], {"MOEMESH_TRACE_BUFFER": "many"})


def test_spans_join_one_trace_through_traceparent():
    gateway = Telemetry.create("moemesh-gateway", "gateway", trace_buffer=4)
    decode = Telemetry.create("moemesh-decode", "decode-0", trace_buffer=4)
    root = gateway.start("gateway.generate", "", {"moemesh.request_id": "r1"})
    wire = gateway.traceparent(root)
    assert wire.startswith("00-" + trace_id_of(root) + "-")
    with decode.span("decode.admit", wire, {"moemesh.request_id": "r1"}) as admit:
        inner = decode.traceparent()  # the current span inside the block
        assert inner == decode.traceparent(admit)
        decode.record("kv.receive", 1_000, 2_000, None, {"moemesh.kv.bytes": 4096})
    with pytest.raises(RuntimeError), decode.span("decode.stream", wire):
        raise RuntimeError("boom")
    root.end()
    trace_id = trace_id_of(root)
    mine = {s.name: s for s in gateway.store.spans([trace_id])}
    theirs = {s.name: s for s in decode.store.spans([trace_id])}
    assert set(mine) == {"gateway.generate"} and set(theirs) == {
        "decode.admit",
        "kv.receive",
        "decode.stream",
    }
    assert theirs["decode.admit"].parent_id == mine["gateway.generate"].span_id
    assert theirs["kv.receive"].parent_id == theirs["decode.admit"].span_id == inner.split("-")[2]
    assert (theirs["kv.receive"].start_unix_ns, theirs["kv.receive"].end_unix_ns) == (1_000, 2_000)
    assert theirs["kv.receive"].attributes == {"moemesh.kv.bytes": 4096}
    assert theirs["decode.stream"].error and not theirs["decode.admit"].error
    assert all(s.worker == "decode-0" and s.trace_id == trace_id for s in theirs.values())
    assert decode.traceparent() == ""  # outside the block: no current span
    gateway.shutdown()
    decode.shutdown()


def test_span_store_keeps_the_last_traces():
    telemetry = Telemetry.create("svc", "w", trace_buffer=2)
    ids = []
    for _ in range(3):
        span = telemetry.start("x", "")
        span.end()
        ids.append(trace_id_of(span))
    assert telemetry.store.spans(ids[:1]) == []
    assert [s.trace_id for s in telemetry.store.spans(ids)] == ids[1:]


def test_disabled_is_a_no_op():
    for telemetry in (Telemetry.disabled("w"), Telemetry.create("svc", "w", trace_buffer=0)):
        assert not telemetry.enabled and telemetry.store is None
        span = telemetry.start("x", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
        assert not span.is_recording()
        with telemetry.span("y") as inner:
            assert telemetry.traceparent() == "" and telemetry.metadata() == ()
            assert not inner.is_recording()
        telemetry.record("z", 1, 2)
        telemetry.shutdown()


def test_traceparent_from_metadata():
    assert traceparent_from_metadata([("x", "1"), ("traceparent", "00-ab-cd-01")]) == "00-ab-cd-01"
    assert traceparent_from_metadata(None) == ""


def test_json_log_lines_carry_the_request_in_their_task_only():
    stream = io.StringIO()
    handler = logs.setup_logging("decode-0", log_format="json", request_level="INFO", stream=stream)
    telemetry = Telemetry.create("svc", "decode-0", trace_buffer=1)
    log = logging.getLogger("moemesh.test")
    span = telemetry.start("decode.admit", "")

    async def request_task() -> None:
        telemetry.bind_request("req-7", span)
        log.info("prefilled %d tokens", 12)

    async def main() -> None:
        await asyncio.create_task(request_task())
        log.warning("not about a request")

    try:
        asyncio.run(main())
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert lines[0]["message"] == "prefilled 12 tokens" and lines[0]["worker"] == "decode-0"
        assert (lines[0]["request_id"], lines[0]["trace_id"]) == ("req-7", trace_id_of(span))
        assert lines[1]["message"] == "not about a request" and "request_id" not in lines[1]
        assert lines[1]["level"] == "WARNING" and lines[1]["time"].endswith("Z")
    finally:
        logging.getLogger().removeHandler(handler)


def test_request_lines_below_their_level_are_dropped():
    stream = io.StringIO()
    handler = logs.setup_logging("up", request_level="WARNING", stream=stream)
    log = logging.getLogger("moemesh.test")

    async def request_task() -> None:
        logs.bind_request("req-8")
        log.info("per-request detail")
        log.warning("per-request problem")

    try:
        asyncio.run(request_task())
        log.info("lifecycle line")
        text = stream.getvalue()
        assert "per-request detail" not in text
        assert "per-request problem" in text and "lifecycle line" in text
    finally:
        logging.getLogger().removeHandler(handler)


def test_trace_store_and_waterfall():
    store = TraceStore(2)
    first = store.begin("a", "1" * 32, "demo", 5)
    second = store.begin("b", "2" * 32, "demo", 7)
    third = store.begin("c", "3" * 32, "demo", 9)
    assert [e.request_id for e in store.recent()] == ["c", "b"] and store.get("a") is None
    assert first.request_id == "a" and second.ttft_ms is None
    third.on_tokens(1)
    third.on_tokens(2)
    third.finish("length")
    assert third.num_completion_tokens == 3 and 0 <= third.ttft_ms <= third.total_ms
    trace = {
        **third.summary(),
        "spans": [
            {"name": "gateway.generate", "worker": "gateway", "span_id": "a1", "parent_id": "", "start_ms": 0.0,
             "end_ms": 100.0, "attributes": {}, "error": False},
            {"name": "kv.send", "worker": "prefill-0", "span_id": "c3", "parent_id": "b2", "start_ms": 20.0,
             "end_ms": 40.0, "attributes": {"moemesh.kv.bytes": 10}, "error": False},
            {"name": "decode.admit", "worker": "decode-0", "span_id": "b2", "parent_id": "a1", "start_ms": 10.0,
             "end_ms": 50.0, "attributes": {}, "error": True},
        ],
    }  # fmt: skip
    assert [(d, s["name"]) for d, s in waterfall.rows(trace)] == [
        (0, "gateway.generate"), (1, "decode.admit"), (2, "kv.send")]  # fmt: skip
    lines = waterfall.text(trace, columns=20).splitlines()
    assert lines[0].startswith("request c  trace " + "3" * 32)
    assert lines[3].endswith("|" + "#" * 20 + "|")  # the root spans the whole width
    assert lines[4].split("|")[1] == "  " + "!" * 8 + " " * 10  # decode.admit: 10..50 of 100 ms, failed
    assert lines[5].split("|")[1] == "    " + "#" * 4 + " " * 12
    html = waterfall.page(trace)
    assert html.count('<tr class="span') == 3 and 'class="span error"' in html
    assert "left:10.000%;width:40.000%" in html


def test_a_collector_that_is_down_does_not_hold_a_stopping_process(caplog):
    from moemesh.supervisor import free_ports

    (port,) = free_ports(1)  # nobody listens there
    telemetry = Telemetry.create("svc", "w", otlp_endpoint=f"127.0.0.1:{port}", trace_buffer=1)
    telemetry.start("x", "").end()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="moemesh.telemetry.tracing"):
        telemetry.shutdown(timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    assert "spans not exported within 0.3 s of stopping were dropped" in caplog.text
