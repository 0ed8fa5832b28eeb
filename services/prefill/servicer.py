"""PrefillWorker RPCs: proto <-> the worker's dataclasses; exceptions -> status codes (`map_errors`)."""

from __future__ import annotations

from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc
from moemesh.services.prefill.worker import PrefillWorker
from moemesh.services.sampling import logprob_to_proto, sampling_from_proto
from moemesh.telemetry.metrics import PrefillMetrics
from moemesh.transport.errors import LeaseRefused, map_errors
from moemesh.transport.kv import KvTarget, LeaseKey
from moemesh.transport.peers import HandshakeAcceptor


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self, worker: PrefillWorker, acceptor: HandshakeAcceptor, metrics: PrefillMetrics | None = None
    ) -> None:
        self.worker = worker
        self.acceptor = acceptor
        self.metrics = metrics

    @map_errors
    async def Prefill(self, request, context):
        target = KvTarget.from_proto(request.kv_target)
        params = sampling_from_proto(request.sampling, default_max_tokens=1)
        try:
            outcome = await self.worker.prefill(list(request.token_ids), params, target)
        except (LeaseRefused, ConnectionError, TimeoutError):  # refused by D, D lost, or too slow
            if self.metrics is not None:
                self.metrics.kv_failures.inc()
            raise
        if self.metrics is not None:
            self.metrics.kv_bytes.inc(outcome.kv_bytes_sent)
            self.metrics.kv_seconds.observe(outcome.kv_transfer_ms / 1000)
        result = worker_pb2.PrefillResult(
            request_id=target.request_id,
            first_token_id=outcome.first_token_id,
            num_prompt_tokens=outcome.num_prompt_tokens,
            num_cached_tokens=outcome.num_cached_tokens,
            kv_bytes_sent=outcome.kv_bytes_sent,
            prefill_ms=outcome.prefill_ms,
            kv_transfer_ms=outcome.kv_transfer_ms,
        )
        if outcome.first_logprob is not None:
            result.first_logprob.CopyFrom(logprob_to_proto(outcome.first_logprob))
        return result

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
