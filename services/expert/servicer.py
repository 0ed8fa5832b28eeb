"""ExpertPool RPCs: proto <-> the worker; exceptions -> status codes (`map_errors`). The tensors' fast path is
UCX (transport/expert_server.py); `Dispatch` here is the gRPC fallback with the same header and payloads."""

from __future__ import annotations

import torch

from moemesh._proto.v1 import expert_pb2, expert_pb2_grpc
from moemesh.services.expert.worker import ExpertWorker
from moemesh.transport.errors import InvalidArgument, map_errors
from moemesh.transport.expert_wire import ExpertBatch, payload_bytes


class ExpertServicer(expert_pb2_grpc.ExpertPoolServicer):
    def __init__(self, worker: ExpertWorker, ucx_address: str) -> None:
        self.worker = worker
        self.ucx_address = ucx_address

    @map_errors
    async def DescribeExperts(self, request, context):
        return self._describe()

    @map_errors
    async def SetExperts(self, request, context):
        if request.phase == expert_pb2.PLACEMENT_PHASE_PREPARE:
            await self.worker.prepare(request.expert_ids)
        elif request.phase == expert_pb2.PLACEMENT_PHASE_COMMIT:
            await self.worker.commit(request.expert_ids)
        else:
            raise InvalidArgument.field("phase", request.phase, "PLACEMENT_PHASE_PREPARE or _COMMIT")
        return self._describe()

    def _describe(self) -> expert_pb2.DescribeExpertsResponse:
        shard = self.worker.shard
        return expert_pb2.DescribeExpertsResponse(
            worker_id=self.worker.worker_id,
            placements=[
                expert_pb2.ExpertPlacement(layer=layer, expert_ids=shard.expert_ids) for layer in shard.layers
            ],
            token_formats=[expert_pb2.TOKEN_FORMAT_BF16, expert_pb2.TOKEN_FORMAT_FP8_E4M3_BLOCK128],
            ucx_address=self.ucx_address,
            num_routed_experts=shard.config.n_routed_experts,
            placement_epoch=self.worker.placement_epoch,
        )

    @map_errors
    async def Dispatch(self, request, context):
        header = request.header
        if len(request.payloads) != len(header.payloads):
            raise InvalidArgument(
                f"payloads: {len(request.payloads)} given, the header lists {len(header.payloads)}"
            )
        for spec, data in zip(header.payloads, request.payloads, strict=True):
            if len(data) != spec.num_bytes:
                raise InvalidArgument(
                    f"payload of kind {spec.kind}: {len(data)} bytes, the header says {spec.num_bytes}"
                )
        buf = torch.zeros(payload_bytes(header), dtype=torch.uint8)
        at = 0
        for data in request.payloads:
            if data:
                buf[at : at + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            at = (at + len(data) + 15) // 16 * 16
        try:
            batch = ExpertBatch.from_wire(header, buf)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        out = (await self.worker.compute(batch)).to("cpu", torch.bfloat16).contiguous()
        return expert_pb2.ExpertResult(
            header=expert_pb2.ExpertResultHeader(
                micro_batch_id=header.micro_batch_id, layer=header.layer, num_tokens=header.num_tokens,
                unweighted=header.unweighted, payloads=[expert_pb2.PayloadSpec(kind=expert_pb2.PAYLOAD_KIND_OUTPUT, num_bytes=out.numel() * 2)],
            ),
            payloads=[out.view(torch.uint8).numpy().tobytes()],
        )  # fmt: skip

    @map_errors
    async def GetLoad(self, request, context):
        return self.worker.load().to_proto()
