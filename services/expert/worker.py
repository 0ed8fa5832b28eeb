"""The expert-pool worker's work: compute one MoE layer's routed experts for the tokens an attention worker
sent, and count each expert's tokens (GetLoad, for placement).

A batch (transport/expert_wire.py) holds the tokens in a token format (decoded here with
kernels/token_format.py), each token's k expert ids (-1 for slots another worker computes) and its routing
weights. The answer is one weighted row per computed slot, in (token, slot) order — the rows `LocalExperts`
computes for the same slots in a colocated worker, by the same code (`LocalExperts.slot_outputs`), so the
attention worker's combine gives the colocated result bit for bit (BF16 tokens).

Batches run one at a time on one compute thread (the event loop keeps receiving meanwhile).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import torch

from moemesh.kernels.token_format import TokenLayout, decode_tokens
from moemesh.model.expert_shard import ExpertShard
from moemesh.telemetry.metrics import ExpertMetrics
from moemesh.transport.errors import InvalidArgument
from moemesh.transport.expert_wire import ExpertBatch
from moemesh.transport.registry import ExpertTokenCount, LoadReport


class ExpertWorker:
    """Lifecycle: construct with the loaded shard, serve `compute` until close()."""

    def __init__(
        self, worker_id: str, shard: ExpertShard, device: torch.device, dtype: torch.dtype,
        metrics: ExpertMetrics | None = None,
    ) -> None:  # fmt: skip
        """metrics: where each batch's per-expert token counts also go (Prometheus; None: GetLoad only)."""
        self.worker_id = worker_id
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
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="experts")

    async def compute(self, batch: ExpertBatch) -> torch.Tensor:
        """-> bf16 [num_slots, hidden_size]. Raises InvalidArgument for a batch this worker cannot serve."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.compute_sync, batch)

    def compute_sync(self, batch: ExpertBatch) -> torch.Tensor:
        start_s = time.perf_counter()
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
            weights = batch.weights.to(self.device, torch.float32).flatten()[slots]
            out = experts.slot_outputs(hidden, slots // batch.top_k, local, weights)
            if out.is_cuda:  # the event loop's thread hands it to UCX next: it must be written by then
                torch.cuda.current_stream(out.device).synchronize()
        counts = torch.bincount(experts_of.cpu(), minlength=self.tokens[batch.layer].numel())
        self.tokens[batch.layer] += counts
        self.num_batches += 1
        if self.metrics is not None:
            self.metrics.record_tokens(batch.layer, counts.tolist())
            self.metrics.record_batch(batch.num_tokens, time.perf_counter() - start_s)
        return out

    def load(self) -> LoadReport:
        counts = tuple(
            ExpertTokenCount(layer, expert, int(tokens[expert]))
            for layer, tokens in self.tokens.items()
            for expert in self.shard.expert_ids
        )
        return LoadReport(self.worker_id, "expert", unix_ms=int(time.time() * 1000), expert_tokens=counts)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
