"""The expert pool as an attention worker sees it: `PoolWorker` (what DescribeExperts says of one worker) and
`ExpertTable` (who hosts which expert of which layer, and which worker computes each routed slot). Pure: no
I/O; `RemoteExperts` (expert_client.py) rebuilds the table whenever the pool changes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.transport.errors import Unavailable


@dataclass(frozen=True)
class PoolWorker:
    """One expert-pool worker as DescribeExperts tells it: layer -> the routed experts it hosts."""

    worker_id: str
    ucx_address: str
    placements: dict[int, tuple[int, ...]]
    placement_epoch: int = 0  # sent with every batch (0: unchecked)
    grpc_address: str = ""  # where `refresh` describes it again ("": it cannot be)


class ExpertTable:
    """Who hosts which expert of which layer. owners[layer]: int64 [E, R] worker indices (-1 padding),
    counts[layer]: int64 [E] replicas per expert. Pure; rebuilt whenever the pool changes."""

    def __init__(self, workers: list[PoolWorker], num_experts: int, layers: list[int]) -> None:
        self.workers = workers
        self.num_experts = num_experts
        self.owners: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self.missing: dict[int, list[int]] = {}
        for layer in layers:
            hosts: list[list[int]] = [[] for _ in range(num_experts)]
            for index, worker in enumerate(workers):
                for expert in worker.placements.get(layer, ()):
                    if 0 <= expert < num_experts:
                        hosts[expert].append(index)
            width = max(1, max(len(h) for h in hosts))
            owners = torch.full((num_experts, width), -1, dtype=torch.int64)
            for expert, h in enumerate(hosts):
                owners[expert, : len(h)] = torch.tensor(h, dtype=torch.int64)
            self.owners[layer] = owners
            self.counts[layer] = torch.tensor([len(h) for h in hosts], dtype=torch.int64)
            self.missing[layer] = [e for e, h in enumerate(hosts) if not h]

    @property
    def complete(self) -> bool:
        return bool(self.owners) and not any(self.missing.values())

    def describe_missing(self) -> str:
        gaps = {layer: m for layer, m in self.missing.items() if m}
        if not gaps:
            return "nothing"
        layer, experts = next(iter(gaps.items()))
        return (
            f"{sum(map(len, gaps.values()))} (layer, expert) pairs, e.g. layer {layer} experts {experts[:8]}"
        )

    def assign(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids int64 [T, k] (CPU) -> int64 [T, k]: the worker index computing each slot; replicas of an
        expert take its tokens in turn (by token index)."""
        counts = self.counts[layer][topk_ids]
        if bool((counts == 0).any()):
            raise Unavailable(f"no live expert worker hosts {self.describe_missing()}")
        turn = torch.arange(topk_ids.shape[0])[:, None] % counts
        return self.owners[layer][topk_ids, turn]
