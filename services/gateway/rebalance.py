"""The gateway's expert placement: `moemesh rebalance` (proto `ExpertAdmin.Rebalance`).

1. Every expert-pool worker the registry knows is described (DescribeExperts: what it hosts) and asked for its
   load (GetLoad: token slots per (layer, expert) since it started; summed over workers and layers, that is
   each expert's load).
2. `services/expert/placement.py` computes the EPLB placement for that many workers and slots.
3. Applied in two phases (docs/experts.md): PREPARE on every worker whose set changes (it loads its new
   experts from the checkpoint and hosts the union of old and new), then, only once every worker prepared,
   COMMIT on each (it keeps its new set and advances its placement epoch). At every moment the workers'
   announced sets cover every expert: before its commit a worker hosts at least its old and its new set,
   after it its new one. Attention workers routing by an older description are refused at their next batch
   (the epoch in the batch header) and describe the pool again: no batch is ever computed by a placement its
   worker no longer has, and no request fails for it.

A failed PREPARE rolls the prepared workers back (COMMIT of their old sets); a failed COMMIT leaves a valid
mix (each worker hosts its old-and-new union or its new set). One rebalance at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from moemesh._proto.v1 import expert_pb2, expert_pb2_grpc, worker_pb2
from moemesh.services.expert.placement import Placement, rebalance
from moemesh.transport.errors import FailedPrecondition, from_rpc_error
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.registry import Membership

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerExperts:
    worker_id: str
    expert_ids: tuple[int, ...]
    load: float  # expected token slots: each hosted expert's load split evenly over its replicas


@dataclass(frozen=True)
class RebalanceReport:
    expert_load: tuple[int, ...]  # token slots per routed expert, summed over workers and MoE layers
    before: tuple[WorkerExperts, ...]
    after: tuple[WorkerExperts, ...]
    balance_before: float  # max / mean load per worker
    balance_after: float
    applied: bool
    experts_loaded: int  # experts the workers load from the checkpoint (would load, when not applied)


@dataclass(frozen=True)
class RebalanceTimeouts:
    describe_s: float = 10.0  # DescribeExperts, GetLoad
    prepare_s: float = 600.0  # PREPARE reads the new experts from the checkpoint
    commit_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("describe_s", "prepare_s", "commit_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


class Rebalancer:
    """channels: the gateway's gRPC channel factory (mTLS when configured)."""

    def __init__(
        self,
        membership: Membership,
        channels: Callable[[str], grpc.aio.Channel],
        timeouts: RebalanceTimeouts | None = None,
    ) -> None:
        self.membership = membership
        self.channels = channels
        self.timeouts = timeouts or RebalanceTimeouts()
        self._running = asyncio.Lock()

    async def rebalance(self, slots_per_worker: int = 0, dry_run: bool = False) -> RebalanceReport:
        """slots_per_worker: experts per worker afterwards (0: as many as the fullest worker hosts now).
        Raises FailedPrecondition (no expert workers, nothing measured, one already running), ValueError
        (bad slots), Unavailable and the workers' own errors naming the worker."""
        if self._running.locked():
            raise FailedPrecondition("a rebalance is already running")
        async with self._running:
            members = sorted(self.membership.members("expert"), key=lambda m: m.worker_id)
            if not members:
                raise FailedPrecondition("no expert workers in the mesh (topology pd-experts starts them)")
            return await self._rebalance(members, slots_per_worker, dry_run)

    async def _rebalance(self, members: list[WorkerInfo], slots: int, dry_run: bool) -> RebalanceReport:
        pool = _Pool(members, self.channels)
        try:
            t = self.timeouts.describe_s
            described = await pool.each(
                lambda stub: stub.DescribeExperts(expert_pb2.DescribeExpertsRequest(), timeout=t)
            )
            reports = await pool.each(lambda stub: stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=t))
            num_experts = _num_experts(members, described)
            loads = [0] * num_experts
            for report in reports:
                for count in report.expert_tokens:
                    if count.expert_id < num_experts:
                        loads[count.expert_id] += count.num_tokens
            if not any(loads):
                raise FailedPrecondition(
                    "the expert workers have counted no tokens yet: nothing to balance by (serve requests first)"
                )
            current = [_hosted(reply) for reply in described]
            new = rebalance(loads, slots or max(map(len, current)), current)
            report = _report(members, loads, Placement(tuple(current), num_experts), new, applied=False)
            changed = [i for i, (old, ids) in enumerate(zip(current, new.workers, strict=True)) if old != ids]
            if dry_run or not changed:
                return report
            start_s = time.perf_counter()
            await self._apply(pool, changed, current, new.workers)
            described = await pool.each(
                lambda stub: stub.DescribeExperts(expert_pb2.DescribeExpertsRequest(), timeout=t)
            )
            after = Placement(tuple(_hosted(reply) for reply in described), num_experts)
            log.info("rebalanced the expert pool in %.1f s: balance %.2f -> %.2f",
                     time.perf_counter() - start_s, report.balance_before, after.balance(loads))  # fmt: skip
            return _report(members, loads, Placement(tuple(current), num_experts), after, applied=True)
        finally:
            await pool.close()

    async def _apply(
        self, pool: _Pool, changed: list[int], current: list[tuple[int, ...]], new: Sequence[tuple[int, ...]]
    ) -> None:
        def set_experts(phase: int, ids: Sequence[Sequence[int]], timeout_s: float):
            return lambda i, stub: stub.SetExperts(
                expert_pb2.SetExpertsRequest(phase=phase, expert_ids=ids[i]), timeout=timeout_s
            )

        prepared = await pool.some(
            changed, set_experts(expert_pb2.PLACEMENT_PHASE_PREPARE, new, self.timeouts.prepare_s)
        )
        failed = [err for err in prepared.values() if isinstance(err, BaseException)]
        if failed:  # back to the old sets where the new experts were loaded
            done = [i for i, r in prepared.items() if not isinstance(r, BaseException)]
            await pool.some(
                done, set_experts(expert_pb2.PLACEMENT_PHASE_COMMIT, current, self.timeouts.commit_s)
            )
            raise failed[0]
        committed = await pool.some(
            changed, set_experts(expert_pb2.PLACEMENT_PHASE_COMMIT, new, self.timeouts.commit_s)
        )
        failed = [err for err in committed.values() if isinstance(err, BaseException)]
        if failed:
            raise type(failed[0])(
                f"{failed[0]} (the other workers committed; every expert stays hosted: run rebalance again)"
            )


class _Pool:
    """One channel per expert worker for the length of a rebalance; calls each (or some) concurrently, errors
    named by worker."""

    def __init__(self, members: list[WorkerInfo], channels: Callable[[str], grpc.aio.Channel]) -> None:
        self.members = members
        self._channels = [channels(m.grpc_address) for m in members]
        self.stubs = [expert_pb2_grpc.ExpertPoolStub(c) for c in self._channels]

    async def each(self, call: Callable[[expert_pb2_grpc.ExpertPoolStub], Awaitable]) -> list:
        """call(stub) on every worker; raises the first failure."""
        results = await self.some(range(len(self.members)), lambda i, stub: call(stub))
        for result in results.values():
            if isinstance(result, BaseException):
                raise result
        return [results[i] for i in range(len(self.members))]

    async def some(
        self, indices: Sequence[int], call: Callable[[int, expert_pb2_grpc.ExpertPoolStub], Awaitable]
    ) -> dict:
        """index -> the reply, or the MeshError naming the worker."""

        async def one(i: int):
            try:
                return await call(i, self.stubs[i])
            except grpc.RpcError as err:
                cause = from_rpc_error(err)
                return type(cause)(f"expert worker {self.members[i].worker_id}: {cause}")

        results = await asyncio.gather(*(one(i) for i in indices))
        return dict(zip(indices, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels), return_exceptions=True)


def _hosted(reply: expert_pb2.DescribeExpertsResponse) -> tuple[int, ...]:
    """The worker's experts (the same set in every MoE layer)."""
    return tuple(sorted({e for p in reply.placements for e in p.expert_ids}))


def _num_experts(members: list[WorkerInfo], described: list) -> int:
    counts = {reply.num_routed_experts for reply in described}
    if len(counts) != 1:
        names = {m.worker_id: r.num_routed_experts for m, r in zip(members, described, strict=True)}
        raise FailedPrecondition(f"the expert workers serve different models (routed experts: {names})")
    return counts.pop()


def _report(members: list[WorkerInfo], loads: list[int], before: Placement, after: Placement,
            applied: bool) -> RebalanceReport:  # fmt: skip
    def listing(placement: Placement) -> tuple[WorkerExperts, ...]:
        per_worker = placement.worker_loads(loads)
        return tuple(WorkerExperts(m.worker_id, ids, load)
                     for m, ids, load in zip(members, placement.workers, per_worker, strict=True))  # fmt: skip

    changed = sum(len(set(n) - set(o)) for o, n in zip(before.workers, after.workers, strict=True))
    return RebalanceReport(tuple(loads), listing(before), listing(after), before.balance(loads),
                           after.balance(loads), applied, changed)  # fmt: skip
