"""DecodeWorker RPCs: proto <-> `DecodeJob` / `RequestOutput`; exceptions -> status codes (`map_errors`)."""

from __future__ import annotations

from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.services.decode.worker import DecodeJob, DecodeWorker, TtftTiming
from moemesh.services.sampling import FINISH_REASONS, logprob_to_proto, sampling_from_proto
from moemesh.transport.errors import InvalidArgument, map_errors
from moemesh.transport.peers import WorkerInfo


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker, max_model_len: int) -> None:
        self.worker = worker
        self.max_model_len = max_model_len

    @map_errors
    async def Generate(self, request, context):
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidArgument("prompt_token_ids=[] must be non-empty")
        params = sampling_from_proto(request.sampling, default_max_tokens=self.max_model_len - len(prompt))
        if params.stop:  # workers stream token ids only
            raise InvalidArgument(
                f"sampling.stop={list(params.stop)!r}: stop strings are matched by the gateway"
            )
        peer = None
        if request.HasField("prefill") and request.prefill.worker_id:
            peer = WorkerInfo(request.prefill.worker_id, "prefill", request.prefill.grpc_address)
        job = DecodeJob(request.request_id, prompt, params, peer, tuple(request.generated_token_ids))
        num_tokens = 0
        timing = TtftTiming()
        async for out in self.worker.generate(job, context.time_remaining, timing):
            num_tokens += len(out.new_token_ids)
            chunk = worker_pb2.DecodeChunk(token_ids=out.new_token_ids)
            chunk.logprobs.extend(logprob_to_proto(sampled) for sampled in out.logprobs)
            if out.finished:
                chunk.finish_reason = FINISH_REASONS.get(out.finish_reason, common_pb2.FINISH_REASON_STOP)
                chunk.usage.CopyFrom(
                    common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=num_tokens,
                                     cached_prompt_tokens=out.num_cached_tokens,
                                     ttft=common_pb2.TtftBreakdown(**vars(timing)))
                )  # fmt: skip
            yield chunk

    @map_errors
    async def GetLoad(self, request, context):
        return self.worker.load().to_proto()
