"""One request's trace through a real pd mesh (`moemesh up`, gateway + prefill + decode processes, KV over UCX):
spans exported over OTLP/gRPC to a real receiver started here (opentelemetry-proto's TraceService), the
gateway's built-in trace view (`/traces`, the HTML waterfall in headless Chromium, `moemesh trace`), and the
JSON log lines tagged with the request and trace ids. One mesh serves every test of this file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest

from moemesh.sdk import Client
from moemesh.telemetry import spans as names
from tests.integration.mesh_tiny import ROOT, TINY_ENV, build_tiny, start_mesh

pytest.importorskip("ucxx")
trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
trace_messages = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom"
REQUEST_ID = "trace-me-1"
MAX_TOKENS = 6
EXPECTED = {  # span -> (service that records it, its parent span)
    names.GATEWAY_GENERATE: ("moemesh-gateway", None),
    names.GATEWAY_ROUTE: ("moemesh-gateway", names.GATEWAY_GENERATE),
    names.DECODE_FIRST_TOKEN: ("moemesh-decode", names.GATEWAY_GENERATE),
    names.DECODE_STREAM: ("moemesh-decode", names.GATEWAY_GENERATE),
    names.DECODE_ADMIT: ("moemesh-decode", names.DECODE_FIRST_TOKEN),
    names.KV_RECEIVE: ("moemesh-decode", names.DECODE_ADMIT),
    names.PREFILL_FORWARD: ("moemesh-prefill", names.DECODE_ADMIT),
    names.KV_SEND: ("moemesh-prefill", names.DECODE_ADMIT),
}


class Receiver(trace_service.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every exported span with its resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")  # fmt: skip
                for scope in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope.spans]
        return trace_messages.ExportTraceServiceResponse()

    def of_request(self, request_id: str) -> dict[str, tuple[str, object]]:
        with self.lock:
            found = {}
            for service, span in self.spans:
                attrs = {a.key: a.value for a in span.attributes}
                if attrs.get(names.REQUEST_ID) and attrs[names.REQUEST_ID].string_value == request_id:
                    found[span.name] = (service, span)
            return found


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    collector = Receiver()
    trace_service.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.endpoint = f"127.0.0.1:{port}"
    yield collector
    server.stop(0)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, receiver):
    tiny = build_tiny(tmp_path_factory.mktemp("tiny-trace"))
    mesh = start_mesh(tiny, "pd", up_args=("--otlp-endpoint", receiver.endpoint, "--log-format", "json"))
    try:
        with Client(mesh.address, timeout_s=120) as client:
            chunks = list(client.generate(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                          request_id=REQUEST_ID))  # fmt: skip
            mesh.num_prompt_tokens = len(client.tokenize(PROMPT))
        mesh.num_tokens = sum(len(c.token_ids) for c in chunks)
        mesh.model_id = tiny.name
        yield mesh
    finally:
        assert mesh.stop() == 0


def _get(mesh, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.http_port}{path}", timeout=30) as reply:
        body = reply.read().decode()
        return json.loads(body) if "json" in reply.headers.get("Content-Type", "") else body


def _trace_json(mesh, timeout_s: float = 30.0) -> dict:
    """The trace view's JSON, once every process's spans are in (each ends its spans as its part ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        trace = _get(mesh, f"/traces/{REQUEST_ID}?format=json")
        if {s["name"] for s in trace["spans"]} >= set(EXPECTED) or time.monotonic() > deadline:
            return trace
        time.sleep(0.2)


def test_otlp_export_one_trace_across_processes(mesh, receiver):
    deadline = time.monotonic() + 30
    while set(receiver.of_request(REQUEST_ID)) < set(EXPECTED) and time.monotonic() < deadline:
        time.sleep(0.2)
    found = receiver.of_request(REQUEST_ID)
    assert set(found) >= set(EXPECTED), f"missing spans: {set(EXPECTED) - set(found)}"
    assert len({span.trace_id for _, span in found.values()}) == 1  # one trace across the three processes
    for name, (service, parent) in EXPECTED.items():
        got_service, span = found[name]
        assert got_service == service, name
        want_parent = found[parent][1].span_id if parent else b""
        assert span.parent_span_id == want_parent, f"{name}'s parent is not {parent}"
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0

    def attrs(name: str) -> dict:
        span = found[name][1]
        return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}

    root = attrs(names.GATEWAY_GENERATE)
    assert root[names.MODEL] == mesh.model_id
    assert root[names.PROMPT_TOKENS] == mesh.num_prompt_tokens
    assert root[names.COMPLETION_TOKENS] == mesh.num_tokens == MAX_TOKENS
    assert root[names.FINISH_REASON] == "length"
    assert attrs(names.DECODE_STREAM)[names.TOKENS] == MAX_TOKENS
    page_size = int(TINY_ENV["MOEMESH_PAGE_SIZE"])
    num_pages = -(-mesh.num_prompt_tokens // page_size)
    sent, received = attrs(names.KV_SEND), attrs(names.KV_RECEIVE)
    assert sent[names.KV_PAGES] == received[names.KV_PAGES] == num_pages
    assert sent[names.KV_BYTES] == received[names.KV_BYTES] > 0
    num_layers = received[names.KV_LAYERS]
    assert sent[names.KV_BYTES] % (num_pages * num_layers * page_size) == 0  # whole pages of every layer
    assert sent[names.KV_CHUNKS] >= 1  # multi-layer chunks: one per run of pages, up to every layer
    assert attrs(names.PREFILL_FORWARD)[names.PROMPT_TOKENS] == mesh.num_prompt_tokens


def test_trace_view_lists_and_serves_the_request(mesh):
    listed = _get(mesh, "/traces?format=json")["traces"]
    assert listed[0]["request_id"] == REQUEST_ID  # newest first
    row = listed[0]
    assert 0 < row["ttft_ms"] <= row["total_ms"]
    assert row["completion_tokens"] == MAX_TOKENS and row["finish_reason"] == "length"

    trace = _trace_json(mesh)
    by_name = {s["name"]: s for s in trace["spans"]}
    assert set(by_name) >= set(EXPECTED)
    assert {s["worker"] for s in trace["spans"]} == {"gateway", "decode-0", "prefill-0"}
    for name, (_, parent) in EXPECTED.items():
        span = by_name[name]
        assert span["parent_id"] == (by_name[parent]["span_id"] if parent else "")
        assert span["end_ms"] >= span["start_ms"] >= -50  # ms after the request reached the gateway
    assert by_name[names.GATEWAY_GENERATE]["start_ms"] == 0.0  # the request reached the gateway
    assert by_name[names.KV_SEND]["attributes"][names.KV_BYTES] > 0
    assert by_name[names.DECODE_STREAM]["attributes"][names.TOKENS] == MAX_TOKENS

    with pytest.raises(urllib.error.HTTPError) as missing:
        _get(mesh, "/traces/no-such-request")
    assert missing.value.code == 404 and "no-such-request" in missing.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as bad:
        _get(mesh, f"/traces/{REQUEST_ID}?format=xml")
    assert bad.value.code == 400 and "format='xml'" in bad.value.read().decode()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_waterfall_page_in_headless_chromium(mesh, tmp_path):
    _trace_json(mesh)
    url = f"http://127.0.0.1:{mesh.http_port}/traces/{REQUEST_ID}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=True).stdout  # fmt: skip
    rows = dom.split('<tr class="span')[1:]
    assert len(rows) >= len(EXPECTED)
    for name in EXPECTED:
        assert any(f">{name}</td>" in row for row in rows), name
    for worker in ("gateway", "decode-0", "prefill-0"):
        assert f'<td class="worker">{worker}</td>' in dom
    assert f"request {REQUEST_ID}" in dom and 'class="bar"' in dom
    shot = tmp_path / "waterfall.png"
    subprocess.run(["chromium", *flags, "--window-size=1400,600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 5000


def test_trace_command_prints_the_waterfall(mesh):
    _trace_json(mesh)
    url = f"http://127.0.0.1:{mesh.http_port}"
    out = subprocess.run([sys.executable, "-m", "moemesh.cli", "trace", REQUEST_ID, "--url", url],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"request {REQUEST_ID}  trace ")
    rows = {line.split()[1]: line for line in lines[3:]}
    assert set(rows) >= set(EXPECTED)
    assert rows[names.GATEWAY_GENERATE].startswith("gateway ")
    assert "#" in rows[names.KV_SEND]
    missing = subprocess.run([sys.executable, "-m", "moemesh.cli", "trace", "nope", "--url", url],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr and "nope" in missing.stderr


def test_json_log_lines_carry_request_and_trace_ids(mesh):
    trace_id = _trace_json(mesh)["trace_id"]
    records = []
    for line in mesh.lines:
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records, "no JSON log lines"
    about = [r for r in records if r.get("request_id") == REQUEST_ID]
    workers = {r["worker"] for r in about}
    assert {"decode-0", "prefill-0"} <= workers, about  # D's and P's "prefilled" lines
    assert all(r["trace_id"] == trace_id for r in about)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
