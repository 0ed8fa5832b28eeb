"""Gateway RPCs: the public API (proto <-> `GenerateJob` / `Delta`) and the expert placement (ExpertAdmin);
exceptions -> status codes (`map_errors`)."""

from __future__ import annotations

from moemesh._proto.v1 import common_pb2, expert_pb2, expert_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from moemesh.services.gateway.rebalance import Rebalancer
from moemesh.services.gateway.worker import Gateway
from moemesh.telemetry.tracing import traceparent_from_metadata
from moemesh.transport.errors import InvalidArgument, map_errors

_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def _check_model(self, model: str) -> None:
        if model and model != self.gateway.config.model_id:
            raise InvalidArgument(
                f"model={model!r} is not served here (serving {self.gateway.config.model_id!r})"
            )

    @map_errors
    async def Generate(self, request, context):
        self._check_model(request.model)
        which = request.WhichOneof("prompt")
        text = request.text if which == "text" else None
        token_ids = list(request.token_ids.ids) if which == "token_ids" else None
        if which is None:
            raise InvalidArgument("prompt is unset: send text or token_ids")
        job = self.gateway.prepare(text, token_ids, request.request_id, request.sampling)
        first = True
        traceparent = traceparent_from_metadata(context.invocation_metadata())  # the client's trace, if any
        async for delta in self.gateway.generate(job, context.time_remaining, traceparent):
            chunk = gateway_pb2.GenerateChunk(
                token_ids=delta.token_ids, text=delta.text, logprobs=delta.logprobs
            )
            if first:
                chunk.request_id, first = job.request_id, False
            if delta.finish_reason is not None:
                chunk.finish_reason = _FINISH[delta.finish_reason]
                if delta.decode_usage is not None:  # cached tokens and the TTFT breakdown, as D measured them
                    chunk.usage.CopyFrom(delta.decode_usage)
                chunk.usage.prompt_tokens = (
                    delta.num_prompt_tokens
                )  # counted here: a migrated request spans Ds
                chunk.usage.completion_tokens = delta.num_completion_tokens
            yield chunk

    @map_errors
    async def Tokenize(self, request, context):
        self._check_model(request.model)
        return gateway_pb2.TokenizeResponse(token_ids=self.gateway.tokenize(request.text))

    @map_errors
    async def ListModels(self, request, context):
        info = gateway_pb2.ModelInfo(
            id=self.gateway.config.model_id, max_context_tokens=self.gateway.max_context_tokens,
            vocab_size=self.gateway.vocab_size,
        )  # fmt: skip
        return gateway_pb2.ListModelsResponse(models=[info])


class ExpertAdminServicer(expert_pb2_grpc.ExpertAdminServicer):
    """`moemesh rebalance`: proto <-> `Rebalancer` (a mesh service: with TLS, mesh certificates only)."""

    def __init__(self, rebalancer: Rebalancer) -> None:
        self.rebalancer = rebalancer

    @map_errors
    async def Rebalance(self, request, context):
        report = await self.rebalancer.rebalance(request.slots_per_worker, request.dry_run)

        def listing(workers):
            return [expert_pb2.WorkerExperts(worker_id=w.worker_id, expert_ids=w.expert_ids, load=w.load)
                    for w in workers]  # fmt: skip

        return expert_pb2.RebalanceResponse(
            expert_load=report.expert_load, before=listing(report.before), after=listing(report.after),
            balance_before=report.balance_before, balance_after=report.balance_after, applied=report.applied,
            experts_loaded=report.experts_loaded,
        )  # fmt: skip
