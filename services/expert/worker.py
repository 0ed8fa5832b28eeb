"""The expert-pool worker's work: compute one MoE layer's routed experts for the tokens an attention worker
sent, and count each expert's tokens (GetLoad, for placement).

A batch (transport/expert_wire.py) holds the tokens in a token format (decoded here with
kernels/token_format.py), each token's k expert ids (-1 for slots another worker computes) and its routing
weights. The answer is one row per computed slot, in (token, slot) order, computed by the code the colocated
block runs on its current path, so the attention worker's combine gives the colocated result bit for bit (BF16
tokens): a block on the torch path gets weighted rows (`LocalExperts.slot_outputs`), one on the fused path
(the batch's `unweighted`) the bare rows of the fused path's GEMMs, kernel and tile picked by the whole layer's
rows (`moe_fused.expert_rows`).

Batches run one at a time: a small one (at most `inline_max_tokens` tokens) on the event loop itself when
nothing runs on the compute thread — two thread hops fewer per round trip (measured 0.4-1 ms of a 5-10 ms CPU
round trip at 1 token), at the price of receives waiting for its short compute — the rest on one compute
thread, the event loop receiving meanwhile.

Placement (`SetExperts`, two phases; docs/experts.md): `prepare(ids)` loads the experts of ids it lacks from
the checkpoint (off the compute thread) and then hosts the union; `commit(ids)` keeps only ids and advances
`placement_epoch` when that differs from the last committed set. Both swap the shard on the compute thread,
between batches (a small batch arriving during a swap queues behind it there; no swap starts while one
computes on the loop), so a batch sees one shard whole. A batch whose header names another epoch is refused
(StalePlacement, ABORTED): it was routed by a placement this worker no longer has.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence

import torch

from moemesh.kernels.token_format import TokenLayout, decode_tokens
from moemesh.model.expert_shard import ExpertShard, merge_shards, select_experts
from moemesh.model.moe_fused import expert_rows
from moemesh.telemetry.metrics import ExpertMetrics
from moemesh.transport.errors import FailedPrecondition, InvalidArgument, StalePlacement
from moemesh.transport.expert_hops import HopLog
from moemesh.transport.expert_wire import ExpertBatch
from moemesh.transport.registry import ExpertTokenCount, LoadReport

log = logging.getLogger(__name__)


class ExpertWorker:
    """Lifecycle: construct with the loaded shard, serve `compute` until close()."""

    def __init__(
        self, worker_id: str, shard: ExpertShard, device: torch.device, dtype: torch.dtype,
        metrics: ExpertMetrics | None = None,
        load_experts: Callable[[Sequence[int]], ExpertShard] | None = None,
        inline_max_tokens: int = 64,
    ) -> None:  # fmt: skip
        """metrics: where each batch's per-expert token counts also go (Prometheus; None: GetLoad only).
        load_experts: expert ids -> their shard from the checkpoint (None: the hosted set cannot change).
        inline_max_tokens: batches up to this many tokens compute on the event loop when nothing runs on the
        compute thread (0: always on the compute thread)."""
        if inline_max_tokens < 0:
            raise ValueError(f"inline_max_tokens={inline_max_tokens} must be >= 0")
        self.inline_max_tokens = inline_max_tokens
        self._on_thread = 0  # batches and shard swaps handed to the compute thread, not back yet (event loop)
        self.worker_id = worker_id
        self.load_experts = load_experts
        self.placement_epoch = time.time_ns() // 1_000_000  # distinct across restarts; +1 per commit
        self.committed_ids = shard.expert_ids  # the set of the current epoch (PREPARE may host more)
        self._placing = asyncio.Lock()
        self.metrics = metrics
        self.shard = shard
        self.device = device
        self.dtype = dtype
        self.hidden_size = shard.config.hidden_size
        self.local_index = shard.local_index(device)  # [E] global id -> local index, -1 if not hosted
        self.num_batches = 0
        # layer -> int64 [E] token slots computed per global expert id
        self.tokens = {
            layer: torch.zeros(shard.config.n_routed_experts, dtype=torch.int64) for layer in shard.layers
        }
        self.hop_log: HopLog | None = None  # benchmarks: marks compute_start / compute_end per batch
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="experts")

    async def compute(self, batch: ExpertBatch) -> torch.Tensor:
        """-> bf16 [num_slots, hidden_size]. Raises InvalidArgument for a batch this worker cannot serve.
        Call on the event loop: a small batch with nothing else computing runs right here (so batches never
        compute concurrently), the rest on the compute thread."""
        if batch.num_tokens <= self.inline_max_tokens and self._on_thread == 0:
            return self.compute_sync(batch)
        return await self._on_compute_thread(self.compute_sync, batch)

    async def _on_compute_thread(self, fn: Callable, *args):
        self._on_thread += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._on_thread -= 1

    def compute_sync(self, batch: ExpertBatch) -> torch.Tensor:
        start_s = time.perf_counter()
        if self.hop_log is not None:
            self.hop_log.mark(batch.batch_id, "compute_start")
        if batch.placement_epoch and batch.placement_epoch != self.placement_epoch:
            raise StalePlacement(
                f"batch of layer {batch.layer} routed by placement epoch {batch.placement_epoch}; "
                f"{self.worker_id} is at epoch {self.placement_epoch} (experts {_ranges(self.shard.expert_ids)})"
            )
        experts = self.shard.layers.get(batch.layer)
        if experts is None:
            raise InvalidArgument(f"layer={batch.layer} is not a MoE layer of this model")
        if batch.hidden_size != self.hidden_size:
            raise InvalidArgument(f"hidden_size={batch.hidden_size} must be {self.hidden_size}")
        try:
            layout = TokenLayout.from_buffer(batch.tokens)
        except ValueError as err:
            raise InvalidArgument(f"token buffer: {err}") from None
        if (layout.num_tokens, layout.hidden) != (batch.num_tokens, batch.hidden_size):
            raise InvalidArgument(
                f"token buffer holds {layout.num_tokens} x {layout.hidden}, header says "
                f"{batch.num_tokens} x {batch.hidden_size}"
            )
        with torch.no_grad():
            hidden = decode_tokens(batch.tokens.to(self.device), layout, self.dtype)  # [T, D]
            flat = batch.expert_ids.to(self.device, torch.int64).flatten()  # [T*k]
            slots = (flat >= 0).nonzero()[:, 0]  # the slots computed here, in (token, slot) order
            experts_of = flat[slots]
            if bool((experts_of >= self.local_index.numel()).any()):
                raise InvalidArgument(f"expert ids must be < {self.local_index.numel()}")
            local = self.local_index[experts_of]
            if bool((local < 0).any()):
                missing = sorted(set(experts_of[local < 0].tolist()))
                raise InvalidArgument(
                    f"experts {missing[:8]} of layer {batch.layer} are not hosted on {self.worker_id}"
                )
            if batch.unweighted:  # the fused path's rows: the block weights them in its own combine
                if batch.layer_slots < slots.numel():
                    raise InvalidArgument(
                        f"layer_slots={batch.layer_slots} must be >= the {slots.numel()} slots of the batch"
                    )
                ids = torch.full_like(flat, -1)
                ids[slots] = local
                num_experts = self.local_index.numel()
                out = expert_rows(experts, hidden, ids.view(-1, batch.top_k), batch.layer_slots, num_experts)
            else:
                weights = batch.weights.to(self.device, torch.float32).flatten()[slots]
                out = experts.slot_outputs(hidden, slots // batch.top_k, local, weights)
            if out.is_cuda:  # the event loop's thread hands it to UCX next: it must be written by then
                torch.cuda.current_stream(out.device).synchronize()
        if self.hop_log is not None:
            self.hop_log.mark(batch.batch_id, "compute_end")
        counts = torch.bincount(experts_of.cpu(), minlength=self.tokens[batch.layer].numel())
        self.tokens[batch.layer] += counts
        self.num_batches += 1
        if self.metrics is not None:
            self.metrics.record_tokens(batch.layer, counts.tolist())
            self.metrics.record_batch(batch.num_tokens, time.perf_counter() - start_s)
        return out

    # -- placement (event loop) --------------------------------------------------------------------------

    async def prepare(self, expert_ids: Sequence[int]) -> None:
        """Loads the experts of expert_ids not hosted yet, then hosts the union (same epoch: everything it
        announced before, it still computes)."""
        ids = self._check_ids(expert_ids)
        async with self._placing:
            added = sorted(set(ids) - set(self.shard.expert_ids))
            if not added:
                return
            if self.load_experts is None:
                raise FailedPrecondition(f"{self.worker_id} cannot load experts (no checkpoint loader)")
            start_s = time.perf_counter()
            loaded = await asyncio.to_thread(self.load_experts, added)
            union = await asyncio.to_thread(merge_shards, self.shard, loaded)
            await self._install(union, self.placement_epoch)
            log.info("%s loaded experts %s in %.1f s; hosts %s", self.worker_id, _ranges(added),
                     time.perf_counter() - start_s, _ranges(union.expert_ids))  # fmt: skip

    async def commit(self, expert_ids: Sequence[int]) -> None:
        """Hosts exactly expert_ids (all loaded: prepare them first). When that differs from the last committed
        set the epoch advances, so attention workers routing by an older description learn the change at their
        next batch (grown sets included: they would not use the new replicas otherwise)."""
        ids = self._check_ids(expert_ids)
        async with self._placing:
            missing = sorted(set(ids) - set(self.shard.expert_ids))
            if missing:
                raise FailedPrecondition(
                    f"experts {_ranges(missing)} are not loaded on {self.worker_id}: PREPARE them first"
                )
            if ids == self.committed_ids and ids == self.shard.expert_ids:
                return
            kept = self.shard
            if ids != self.shard.expert_ids:
                kept = await asyncio.to_thread(select_experts, self.shard, ids)
            await self._install(kept, self.placement_epoch + 1)
            self.committed_ids = ids
            log.info("%s hosts experts %s at placement epoch %d", self.worker_id, _ranges(ids),
                     self.placement_epoch)  # fmt: skip

    def _check_ids(self, expert_ids: Sequence[int]) -> tuple[int, ...]:
        num = self.shard.config.n_routed_experts
        ids = tuple(sorted(set(expert_ids)))
        if not ids or ids[0] < 0 or ids[-1] >= num:
            raise InvalidArgument(f"expert_ids={list(expert_ids)[:16]} must name experts in 0..{num - 1}")
        return ids

    async def _install(self, shard: ExpertShard, epoch: int) -> None:
        """Swaps the shard on the compute thread, between batches."""

        def swap() -> None:  # the epoch last: a DescribeExperts in between pairs the new set with the old
            # epoch, whose batches are then refused as stale — never the old set with the new epoch
            self.shard = shard
            self.local_index = shard.local_index(self.device)
            self.placement_epoch = epoch

        await self._on_compute_thread(swap)

    def load(self) -> LoadReport:
        """Token counts of every hosted expert, and of experts hosted earlier that computed tokens here (so
        the pool's sum per expert stays its total across rebalances)."""
        hosted = set(self.shard.expert_ids)
        counts = tuple(
            ExpertTokenCount(layer, expert, n)
            for layer, tokens in self.tokens.items()
            for expert, n in enumerate(tokens.tolist())
            if n > 0 or expert in hosted
        )
        return LoadReport(self.worker_id, "expert", unix_ms=int(time.time() * 1000), expert_tokens=counts)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _ranges(ids: Sequence[int]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2,5,7-8"."""
    parts: list[str] = []
    for expert in sorted(ids):
        if parts and int(parts[-1].rpartition("-")[2]) == expert - 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{expert}"
        else:
            parts.append(str(expert))
    return ",".join(parts)
