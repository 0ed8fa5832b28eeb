"""PrefillWorker RPCs: proto <-> the worker's dataclasses; exceptions -> status codes (`map_errors`)."""

from __future__ import annotations

import time

from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc
from moemesh.services.expert_spans import ExpertDispatchSpans
from moemesh.services.prefill.worker import PrefillOutcome, PrefillWorker
from moemesh.services.sampling import logprob_to_proto, sampling_from_proto
from moemesh.telemetry import spans
from moemesh.telemetry.metrics import PrefillMetrics
from moemesh.telemetry.tracing import Telemetry, mark_failed, traceparent_from_metadata
from moemesh.transport.errors import LeaseRefused, map_errors
from moemesh.transport.kv import KvTarget, LeaseKey
from moemesh.transport.peers import HandshakeAcceptor


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        worker: PrefillWorker,
        acceptor: HandshakeAcceptor,
        metrics: PrefillMetrics | None = None,
        *,
        telemetry: Telemetry | None = None,
        expert_spans: ExpertDispatchSpans | None = None,
    ) -> None:
        self.worker = worker
        self.acceptor = acceptor
        self.metrics = metrics
        self.telemetry = telemetry or Telemetry.disabled()
        self.expert_spans = expert_spans  # each prefill's `expert.dispatch` (remote experts, tracing on)

    @map_errors
    async def Prefill(self, request, context):
        """Streams the early result (the first token, at the forward's end) and then the final one."""
        target = KvTarget.from_proto(request.kv_target)
        params = sampling_from_proto(request.sampling, default_max_tokens=1)
        parent = traceparent_from_metadata(context.invocation_metadata()) or target.traceparent

        async def forward_done(early: PrefillOutcome) -> None:
            await context.write(_result(target, early, kv_complete=False))

        with _PrefillSpans(
            self.telemetry, target, len(request.token_ids), parent, self.expert_spans
        ) as traced:
            try:
                outcome = await self.worker.prefill(list(request.token_ids), params, target, forward_done)
            except (LeaseRefused, ConnectionError, TimeoutError):  # refused by D, D lost, or too slow
                if self.metrics is not None:
                    self.metrics.kv_failures.inc()
                raise
            traced.done(outcome)
        if self.metrics is not None:
            self.metrics.kv_bytes.inc(outcome.kv_bytes_sent)
            self.metrics.kv_seconds.observe(outcome.kv_transfer_ms / 1000)
        await context.write(_result(target, outcome, kv_complete=True))

    @map_errors
    async def Abort(self, request, context):
        lease = LeaseKey(request.lease_id, request.lease_generation)
        return worker_pb2.AbortResponse(found=await self.worker.abort(request.request_id, lease))

    @map_errors
    async def Handshake(self, request, context):
        return await self.acceptor.accept(request)

    @map_errors
    async def GetLoad(self, request, context):
        return self.worker.load().to_proto()


def _result(target: KvTarget, outcome: PrefillOutcome, kv_complete: bool) -> worker_pb2.PrefillResult:
    result = worker_pb2.PrefillResult(
        request_id=target.request_id, first_token_id=outcome.first_token_id,
        num_prompt_tokens=outcome.num_prompt_tokens, num_cached_tokens=outcome.num_cached_tokens,
        kv_bytes_sent=outcome.kv_bytes_sent, prefill_ms=outcome.prefill_ms, kv_transfer_ms=outcome.kv_transfer_ms,
        kv_complete=kv_complete,
    )  # fmt: skip
    if outcome.first_logprob is not None:
        result.first_logprob.CopyFrom(logprob_to_proto(outcome.first_logprob))
    return result


class _PrefillSpans:
    """P's spans of one Prefill, under D's `decode.admit`: `prefill.forward` (arrival -> the prompt's forward
    ended) and `kv.send` (the first KV chunk sent -> the last acknowledged: bytes, pages, chunks)."""

    def __init__(self, telemetry: Telemetry, target: KvTarget, num_prompt_tokens: int, parent: str,
                 expert_spans: ExpertDispatchSpans | None = None) -> None:  # fmt: skip
        self.telemetry, self.target, self.parent = telemetry, target, parent
        self.expert_spans = expert_spans
        self.arrived_ns = time.time_ns()
        self.forward = telemetry.start(spans.PREFILL_FORWARD, parent, {
            spans.REQUEST_ID: target.request_id, spans.PROMPT_TOKENS: num_prompt_tokens,
            spans.WORKER: telemetry.worker})  # fmt: skip

    def __enter__(self) -> _PrefillSpans:
        self.telemetry.bind_request(self.target.request_id, self.forward)
        return self

    def done(self, outcome: PrefillOutcome) -> None:
        forward_end_ns = self.arrived_ns + int(outcome.prefill_ms * 1e6)
        self.forward.set_attribute(spans.CACHED_TOKENS, outcome.num_cached_tokens)
        if self.expert_spans is not None:
            self.expert_spans.finish(self.target.request_id, self.forward)
        self.forward.end(end_time=forward_end_ns)
        if outcome.kv_first_send_unix_ns:
            end_ns = forward_end_ns + int(outcome.kv_transfer_ms * 1e6)
            pages = len(self.target.page_ids) - self.target.first_page
            self.telemetry.record(spans.KV_SEND, outcome.kv_first_send_unix_ns, end_ns, self.parent, {
                spans.REQUEST_ID: self.target.request_id, spans.KV_BYTES: outcome.kv_bytes_sent,
                spans.KV_PAGES: pages, spans.KV_LAYERS: self.target.layout.num_layers,
                spans.KV_CHUNKS: outcome.num_kv_chunks, spans.LEASE: str(self.target.lease),
                spans.KV_DURATION_MS: (end_ns - outcome.kv_first_send_unix_ns) / 1e6})  # fmt: skip

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            mark_failed(self.forward, exc)
            if self.expert_spans is not None:
                self.expert_spans.finish(self.target.request_id, self.forward)
            self.forward.end()
