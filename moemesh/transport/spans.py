"""The `Spans` service (worker.proto): a process's recent finished spans, by trace id, for the gateway's built-in
trace view. `SpansServicer` serves a `SpanStore`; `fetch_spans` asks one process."""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc
from moemesh.telemetry.spans import SpanRecord
from moemesh.telemetry.tracing import SpanStore, attributes_json
from moemesh.transport.errors import InvalidArgument, from_rpc_error, map_errors

SERVICE_NAME = "moemesh.v1.Spans"


def to_proto(span: SpanRecord) -> worker_pb2.SpanRecord:
    return worker_pb2.SpanRecord(
        name=span.name, worker=span.worker, trace_id=span.trace_id, span_id=span.span_id,
        parent_span_id=span.parent_id, start_unix_ns=span.start_unix_ns, end_unix_ns=span.end_unix_ns,
        attributes_json=attributes_json(span), error=span.error,
    )  # fmt: skip


def from_proto(msg: worker_pb2.SpanRecord) -> SpanRecord:
    attributes = json.loads(msg.attributes_json) if msg.attributes_json else {}
    return SpanRecord(msg.name, msg.worker, msg.trace_id, msg.span_id, msg.parent_span_id, msg.start_unix_ns,
                      msg.end_unix_ns, attributes, msg.error)  # fmt: skip


class SpansServicer(worker_pb2_grpc.SpansServicer):
    def __init__(self, store: SpanStore | None) -> None:
        self.store = store  # None: tracing is off here, no spans to give

    @map_errors
    async def GetSpans(self, request, context):
        for trace_id in request.trace_ids:
            if len(trace_id) != 32 or any(c not in "0123456789abcdef" for c in trace_id):
                raise InvalidArgument(f"trace_ids={trace_id!r} must be 32 lowercase hex digits")
        spans = self.store.spans(request.trace_ids) if self.store is not None else []
        return worker_pb2.GetSpansResponse(spans=[to_proto(s) for s in spans])


def add_to_server(server, store: SpanStore | None) -> None:
    """`add_to_server(mesh_server, telemetry.store)`: serves the store on a MeshServer."""
    server.add(worker_pb2_grpc.add_SpansServicer_to_server, SpansServicer(store), SERVICE_NAME)


async def fetch_spans(
    channel: grpc.aio.Channel, trace_ids: Sequence[str], timeout_s: float
) -> list[SpanRecord]:
    """The spans of `trace_ids` that the process behind `channel` keeps; raises the mapped MeshError."""
    stub = worker_pb2_grpc.SpansStub(channel)
    try:
        reply = await stub.GetSpans(worker_pb2.GetSpansRequest(trace_ids=list(trace_ids)), timeout=timeout_s)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
    return [from_proto(s) for s in reply.spans]
