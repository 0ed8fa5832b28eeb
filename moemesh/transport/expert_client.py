"""`RemoteExperts`: the routed experts of an attention worker (prefill, decode, colocated) run in the expert
pool. It satisfies the model's `ExpertBackend` / `DeferredExpertBackend` Protocols structurally (transport
never imports model).

Per MoE layer, called on the engine thread with the layer's routing (the model routes locally):
1. every (token, slot) goes to a worker hosting its expert (among replicas, by token index), see
   `ExpertTable.assign`;
2. each worker gets only the tokens with a slot for it, in `encode`'s token format (BF16 or FP8 1x128 —
   `encode` is injected by services, which may import kernels/token_format.py; transport may not), the slots
   of other workers masked with -1, and the routing weights;
3. the batches go out over UCX from the worker's event loop (`submit` returns at once: the model runs the
   shared experts meanwhile), every worker in parallel;
4. `result()` places each worker's weighted slot rows and sums every token's k rows in slot order — the same
   combine as `LocalExperts` (moe.combine_slots), so greedy output equals the colocated one for BF16 tokens.
   With `unweighted` (a block on the fused path) the workers return bare expert rows of the fused path's
   GEMMs and `result()` hands back every slot's row: the block combines them as `fused_moe` does.

Failure: a worker that does not answer within `timeout_s`, or whose connection drops, is forgotten (its
experts move to their replicas if any) and the call raises Unavailable; calls wait up to `placement_wait_s`
for the pool to cover every expert (start-up, a worker restarting), then raise Unavailable naming what is
missing. Never a hang.

Placement changes (`moemesh rebalance`): every batch carries the placement epoch of its worker's last
description; a worker whose placement changed since refuses it (StalePlacement). The pool is then described
again (`refresh`) and the layer resent, up to MAX_STALE_RESENDS times.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from moemesh._proto.v1 import expert_pb2, expert_pb2_grpc
from moemesh.transport.errors import (
    FailedPrecondition,
    MeshError,
    StalePlacement,
    Unavailable,
    from_rpc_error,
    from_status,
    status_code_from_number,
)
from moemesh.transport.expert_buffers import RecvBuffers, device_or_host
from moemesh.transport.expert_hops import HopLog
from moemesh.transport.expert_table import ExpertTable, PoolWorker
from moemesh.transport.expert_wire import (
    FRAME_BYTES,
    TAG_HEADER,
    TOKEN_FORMATS,
    ExpertBatch,
    output_tag,
    pack_frame,
    payload_tag,
    result_tag,
    unpack_frame,
)
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.ucx import UcxEndpointPool, UcxOptions, as_ucx_buffer

log = logging.getLogger(__name__)
MAX_STALE_RESENDS = 4  # a layer refused as routed by an old placement is resent after a refresh this often


@dataclass(frozen=True)
class RemoteExpertsOptions:
    token_format: str = "bf16"  # one of TOKEN_FORMATS
    timeout_s: float = 10.0  # one layer's round trip to one worker
    placement_wait_s: float = 10.0  # how long a call waits for the pool to cover every routed expert
    describe_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.token_format not in TOKEN_FORMATS:
            raise ValueError(f"token_format={self.token_format!r} must be one of {', '.join(TOKEN_FORMATS)}")
        for name in ("timeout_s", "placement_wait_s", "describe_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


@dataclass
class DispatchStats:
    """What the MoE layers sent to the pool since the last `RemoteExperts.take_stats()` (one engine step, when
    the worker takes them after every step): tracing's `expert.dispatch` (services/expert_spans.py). Updated
    on the engine thread; plain counters, so keeping them costs nothing measurable."""

    layers: int = 0  # layer exchanges (a layer of a micro-batch, all its workers at once)
    tokens: int = 0  # token rows sent, summed over workers and layers
    bytes_sent: int = 0  # payloads (tokens, ids, weights)
    bytes_received: int = 0  # output rows
    wait_ns: int = 0  # time the engine thread waited for the pool's answers
    first_unix_ns: int = 0  # the first layer's submit
    last_unix_ns: int = 0  # the last layer's answers combined
    workers: set[str] = field(default_factory=set)

    def submitted(self, parts: list[_Part]) -> None:
        now = time.time_ns()
        self.first_unix_ns = self.first_unix_ns or now
        self.layers += 1
        for part in parts:
            self.tokens += part.batch.num_tokens
            self.bytes_sent += part.payload.numel()
            self.bytes_received += part.slot_index.numel() * part.batch.hidden_size * 2  # bf16 rows
            self.workers.add(part.worker.worker_id)

    def answered(self, waited_ns: int) -> None:
        self.wait_ns += waited_ns
        self.last_unix_ns = time.time_ns()


@dataclass
class _Part:
    worker: PoolWorker
    batch: ExpertBatch
    payload: torch.Tensor  # batch.payload(), built on the engine thread
    slot_index: torch.Tensor  # int64 [S]: where its output rows go among the T*k slots


class PendingExperts:
    """One layer's batches in flight. result() blocks (the engine thread) until every worker answered.
    retry: called once when a worker was lost while replicas still cover every expert — the layer goes out
    again to the survivors (a replica takes over inside the step)."""

    def __init__(self, future: concurrent.futures.Future | None, parts: list[_Part], hidden: torch.Tensor,
                 top_k: int, wait_s: float, retry: Callable[[], PendingExperts] | None = None,
                 stats: DispatchStats | None = None,
                 resend: Callable[[], PendingExperts | None] | None = None,
                 unweighted: bool = False) -> None:  # fmt: skip
        """resend: after a StalePlacement (the pool was described again), the layer sent once more.
        unweighted: result() is every slot's row [T * k, D] (token-major), not the combined [T, D]."""
        self._unweighted = unweighted
        self._resend = resend
        self._stats = stats
        self._future = future
        self._parts = parts
        self._hidden = hidden
        self._top_k = top_k
        self._wait_s = wait_s
        self._retry = retry
        self.hop_log: HopLog | None = None  # RemoteExperts.hop_log: marks woke / combined per batch

    def result(self) -> torch.Tensor:
        hidden, k = self._hidden, self._top_k
        num_tokens = hidden.shape[0]
        slots = torch.zeros(num_tokens * k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        if self._future is not None:
            waiting_ns = time.perf_counter_ns()
            try:
                outputs = self._future.result(timeout=self._wait_s)
            except concurrent.futures.TimeoutError:
                self._future.cancel()
                raise Unavailable(f"the expert pool did not answer within {self._wait_s} s") from None
            except StalePlacement as err:
                resend = self._resend() if self._resend is not None else None
                if resend is None:
                    raise Unavailable(f"the expert placement kept changing: {err}") from None
                log.info("%s; the layer goes out again by the refreshed placement", err)
                return resend.result()
            except Unavailable as err:
                retry = self._retry() if self._retry is not None else None
                if retry is None:
                    raise
                log.warning("%s; the layer goes to the replicas", err)
                return retry.result()
            if self._stats is not None:
                self._stats.answered(time.perf_counter_ns() - waiting_ns)
            self._mark("woke")
            for part, out in zip(self._parts, outputs, strict=True):
                RecvBuffers.consumed_on(out)  # UCX wrote it; its block is not reused before these reads
                slots[part.slot_index.to(hidden.device)] = out.to(hidden.device, hidden.dtype)
        # unweighted: every slot's row, which the block combines (moe_combine, as fused_moe does); else the
        # combine of moe.combine_slots: every token's k weighted rows summed in slot order
        combined = slots if self._unweighted else slots.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)
        if self.hop_log is not None:
            if combined.is_cuda:
                torch.cuda.current_stream(combined.device).synchronize()
            self._mark("combined")
        return combined

    def _mark(self, event: str) -> None:
        if self.hop_log is not None:
            for part in self._parts:
                self.hop_log.mark(part.batch.batch_id, event)


class RemoteExperts:
    """Lifecycle: construct, `await start()` on the worker's event loop, `await sync(members)` with every
    membership the registry reports, call from the engine thread (never from the event loop), `await close()`.

    encode: hidden [T, D] -> uint8 token buffer in `options.token_format` (kernels/token_format.py, injected).
    wire_device: where the buffers travel from ("cpu" over TCP; the GPU when UCX moves device memory)."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        encode: Callable[[torch.Tensor], torch.Tensor],
        options: RemoteExpertsOptions | None = None,
        ucx_options: UcxOptions | None = None,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
        wire_device: torch.device | str = "cpu",
    ) -> None:
        self.layers = list(layers)
        self.num_experts = num_experts
        self.encode = encode
        self.options = options or RemoteExpertsOptions()
        self.pool = UcxEndpointPool(ucx_options)
        self.channel_factory = channel_factory
        self.wire_device = torch.device(wire_device)
        self.recv_buffers = RecvBuffers(self.wire_device)  # the answers' rows (event loop)
        self.token_format = TOKEN_FORMATS[self.options.token_format]
        self.workers: dict[str, PoolWorker] = {}
        self.table = ExpertTable([], num_experts, self.layers)
        self.num_batches = 0
        self.stats = DispatchStats()  # engine thread: since the last take_stats()
        self.hop_log: HopLog | None = None  # benchmarks: per-batch timestamps (expert_hops.py)
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self._undescribed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.wire_device = await device_or_host(
            self.wire_device, self.pool.options, "send expert tokens from"
        )
        self.recv_buffers = RecvBuffers(self.wire_device)

    async def close(self) -> None:
        await self.pool.close()

    def take_stats(self) -> DispatchStats:
        """The exchanges since the last call, and a fresh count (call while the engine thread does not step:
        from an `on_step` hook or on the engine thread)."""
        stats, self.stats = self.stats, DispatchStats()
        return stats

    # -- the pool (event loop) -------------------------------------------------------------------------------

    async def sync(self, members: list[WorkerInfo]) -> None:
        """Describes every new expert member (concurrently); forgets members that left."""
        experts = {m.worker_id: m for m in members if m.role == "expert"}
        for gone in set(self.workers) - set(experts):
            self._forget(gone, "left the mesh")
        new = [m for wid, m in experts.items() if wid not in self.workers]
        described = await asyncio.gather(*(self._describe(m) for m in new))
        added = [w for w in described if w is not None]
        if added:
            for worker in added:
                self.workers[worker.worker_id] = worker
            self._rebuild()
            log.info("expert pool: %s; covers every expert: %s", sorted(self.workers), self.table.complete)

    async def _describe(self, member: WorkerInfo) -> PoolWorker | None:
        if self.channel_factory is None:
            raise RuntimeError("RemoteExperts.sync needs a channel_factory")
        channel = self.channel_factory(member.grpc_address)
        try:
            stub = expert_pb2_grpc.ExpertPoolStub(channel)
            reply = await stub.DescribeExperts(
                expert_pb2.DescribeExpertsRequest(), timeout=self.options.describe_timeout_s
            )
        except grpc.RpcError as err:  # warned once; the next membership tries again
            level = logging.DEBUG if member.worker_id in self._undescribed else logging.WARNING
            log.log(level, "expert worker %s not described: %s", member.worker_id, from_rpc_error(err))
            self._undescribed.add(member.worker_id)
            return None
        finally:
            await channel.close()
        if reply.num_routed_experts and reply.num_routed_experts != self.num_experts:
            log.error("refusing expert worker %s: it serves %d routed experts, this model has %d",
                      member.worker_id, reply.num_routed_experts, self.num_experts)  # fmt: skip
            return None
        if self.token_format not in reply.token_formats:
            log.error("refusing expert worker %s: it does not accept token format %s", member.worker_id,
                      self.options.token_format)  # fmt: skip
            return None
        placements = {p.layer: tuple(p.expert_ids) for p in reply.placements}
        return PoolWorker(
            member.worker_id, reply.ucx_address, placements, reply.placement_epoch, member.grpc_address
        )

    async def refresh(self, attempts: int = 3) -> None:
        """Describes every known worker again (after a StalePlacement); until the pool covers every expert
        again, at most `attempts` rounds (descriptions straddling a rebalance's PREPARE -> COMMIT boundary can
        leave a transient gap)."""
        for attempt in range(attempts):
            known = [w for w in self.workers.values() if w.grpc_address]
            members = [WorkerInfo(w.worker_id, "expert", w.grpc_address, w.ucx_address) for w in known]
            described = await asyncio.gather(*(self._describe(m) for m in members))
            for worker in described:
                if worker is not None and worker.worker_id in self.workers:  # not forgotten meanwhile
                    self.workers[worker.worker_id] = worker
            self._rebuild()
            if self.table.complete:
                return
            await asyncio.sleep(0.05 * (attempt + 1))

    def add_worker(self, worker: PoolWorker) -> None:
        """A worker known without the registry (tests, benchmarks)."""
        self.workers[worker.worker_id] = worker
        self._rebuild()

    def _forget(self, worker_id: str, why: str) -> None:
        if self.workers.pop(worker_id, None) is not None:
            log.warning("expert worker %s %s; dropping it from the pool", worker_id, why)
            self._rebuild()

    def _rebuild(self) -> None:
        with self._changed:
            self.table = ExpertTable(list(self.workers.values()), self.num_experts, self.layers)
            self._changed.notify_all()

    # -- one layer (engine thread) ---------------------------------------------------------------------------

    def __call__(
        self, layer_idx: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.submit(layer_idx, hidden, topk_ids, topk_weights).result()

    def submit(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        retry: bool = True,
        resends: int = MAX_STALE_RESENDS,
        *,
        unweighted: bool = False,
    ) -> PendingExperts:
        """Sends the layer's tokens and returns without waiting for the outputs. retry: when a worker is lost
        and the others still cover every expert, `result()` sends the layer once more. resends: how often
        `result()` may send it again after a StalePlacement. unweighted: the workers compute the fused path's
        bare rows (for this layer of T * k rows) and `result()` returns them per slot [T * k, D]."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("RemoteExperts.start() was not awaited")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("RemoteExperts is called from the engine thread, never from its event loop")
        num_tokens, k = topk_ids.shape
        wait_s = self.options.timeout_s + 1.0
        if num_tokens == 0:
            return PendingExperts(None, [], hidden, k, wait_s, unweighted=unweighted)
        submit_ns = time.perf_counter_ns()
        table = self._wait_for_table()
        ids = topk_ids.to("cpu", torch.int64)
        owner = table.assign(layer_idx, ids)  # [T, k]
        parts = []
        for index in owner.unique().tolist():
            mask = owner == index
            rows = mask.any(dim=1).nonzero()[:, 0]
            batch = ExpertBatch(
                next(self._ids), layer_idx, self.token_format, hidden.shape[1],
                self.encode(hidden[rows.to(hidden.device)]).to(self.wire_device),
                torch.where(mask, ids, -1)[rows].to(self.wire_device, torch.int32),
                topk_weights[rows.to(topk_weights.device)].to(self.wire_device, torch.float32),
                placement_epoch=table.workers[index].placement_epoch, unweighted=unweighted,
                layer_slots=num_tokens * k if unweighted else 0,
            )  # fmt: skip
            parts.append(_Part(table.workers[index], batch, batch.payload(), mask.flatten().nonzero()[:, 0]))
        if self.wire_device.type == "cuda":  # UCX reads the buffers from another thread: they must be written
            torch.cuda.current_stream(self.wire_device).synchronize()
        if self.hop_log is not None:
            for part in parts:
                self.hop_log.mark(part.batch.batch_id, "submit", submit_ns)
                self.hop_log.mark(part.batch.batch_id, "built")
        future = asyncio.run_coroutine_threadsafe(self._send_all(parts), loop)
        self.stats.submitted(parts)

        def again() -> PendingExperts | None:
            if not self.table.complete:  # nobody left to take over: fail the step
                return None
            return self.submit(layer_idx, hidden, topk_ids, topk_weights, retry=False, resends=resends,
                               unweighted=unweighted)  # fmt: skip

        def resend() -> PendingExperts | None:
            if resends <= 0:
                return None
            return self.submit(layer_idx, hidden, topk_ids, topk_weights, retry, resends - 1,
                               unweighted=unweighted)  # fmt: skip

        pending = PendingExperts(
            future, parts, hidden, k, wait_s, again if retry else None, self.stats, resend, unweighted
        )
        pending.hop_log = self.hop_log
        return pending

    def _wait_for_table(self) -> ExpertTable:
        with self._changed:
            complete = self._changed.wait_for(
                lambda: self.table.complete, timeout=self.options.placement_wait_s
            )
            if not complete:
                raise Unavailable(
                    f"the expert pool ({len(self.workers)} workers) does not cover every routed expert after "
                    f"{self.options.placement_wait_s} s: missing {self.table.describe_missing()}"
                )
            return self.table

    # -- the wire (event loop) -------------------------------------------------------------------------------

    async def _send_all(self, parts: list[_Part]) -> list[torch.Tensor]:
        if len(parts) == 1:  # no task of its own: one event-loop turn fewer
            try:
                results = [await self._exchange(parts[0])]
            except StalePlacement as err:
                results = [err]
        else:
            results = await asyncio.gather(*(self._exchange(p) for p in parts), return_exceptions=True)
        if any(isinstance(r, StalePlacement) for r in results):  # before the engine thread resends
            await self.refresh()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.num_batches += len(parts)
        return results

    async def _exchange(self, part: _Part) -> torch.Tensor:
        worker, batch = part.worker, part.batch
        self._mark(batch.batch_id, "loop")
        try:
            ep = await self.pool.get(worker.ucx_address)
        except MeshError as err:
            self._forget(worker.worker_id, f"is unreachable ({err})")
            raise Unavailable(f"expert worker {worker.worker_id} is unreachable: {err}") from None
        try:
            async with asyncio.timeout(self.options.timeout_s):
                reply, out = await self._wire(ep, part)
        except BaseException as err:
            self.pool.drop(worker.ucx_address, ep)  # aborting cancels its requests: nothing lands later
            self._forget(
                worker.worker_id, f"failed a layer-{batch.layer} batch ({type(err).__name__}: {err})"
            )
            if isinstance(err, asyncio.CancelledError):
                raise
            why = f"no answer in {self.options.timeout_s} s" if isinstance(err, TimeoutError) else str(err)
            raise Unavailable(
                f"expert worker {worker.worker_id} at {worker.ucx_address} lost: {why}"
            ) from None
        if reply.error:
            raise from_status(
                status_code_from_number(reply.error_code), f"expert worker {worker.worker_id}: {reply.error}"
            )
        if (
            reply.unweighted != batch.unweighted
        ):  # a worker that predates unweighted rows answers weighted ones
            form = {True: "unweighted", False: "weighted"}
            raise FailedPrecondition(
                f"expert worker {worker.worker_id} answered {form[reply.unweighted]} rows to a batch asking "
                f"for {form[batch.unweighted]} ones: it runs another version of the expert wire"
            )
        return out

    async def _wire(self, ep, part: _Part) -> tuple[expert_pb2.ExpertResultHeader, torch.Tensor]:
        """One batch's four messages, all posted in one event-loop turn: the sends do not wait for each other and
        the answer's two receives are posted before it arrives (the server sends an empty output message with
        an error frame), so a round trip waits for UCX completions once each way, not once per message."""
        batch = part.batch
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        # the slot count from the host mask (batch.num_slots would sum device ids: a sync on the event loop)
        out = self.recv_buffers.empty((part.slot_index.numel(), batch.hidden_size), torch.bfloat16)

        async def done(request, event: str) -> None:
            await request
            self._mark(batch.batch_id, event)

        await asyncio.gather(
            done(ep.send(as_ucx_buffer(pack_frame(batch.header())), tag=TAG_HEADER), "header_sent"),
            done(ep.send(as_ucx_buffer(part.payload), tag=payload_tag(batch.batch_id)), "payload_sent"),
            done(ep.recv(as_ucx_buffer(frame), tag=result_tag(batch.batch_id)), "frame_received"),
            done(ep.recv(as_ucx_buffer(out.view(torch.uint8)), tag=output_tag(batch.batch_id)), "output_received"),
        )  # fmt: skip
        return unpack_frame(frame, expert_pb2.ExpertResultHeader), out

    def _mark(self, batch_id: int, event: str) -> None:
        if self.hop_log is not None:
            self.hop_log.mark(batch_id, event)
