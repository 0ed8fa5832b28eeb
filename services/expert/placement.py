"""Where the routed experts live in the expert pool: EPLB's policy (DeepSeek, `eplb.py`), pure.

Input: each routed expert's measured load (token slots it computed, summed over the MoE layers — every layer
has the same expert set per worker), the number of expert-pool workers and their capacity in expert slots.
Output: the experts each worker hosts.

1. **Replicate the hottest**: every expert gets one replica; each spare slot goes to the expert with the
   highest load per replica (an expert has at most one replica per worker).
2. **Pack by load**: the replicas, heaviest first (a replica carries load / replicas: the attention workers
   spread an expert's tokens evenly over its replicas), each onto the least loaded worker that has room and
   does not host that expert yet (between equally loaded ones, the worker hosting it now). When every worker
   with room already hosts it, a replica of another expert moves from a full worker to make room (such a move
   always exists).
3. **Keep what can stay**: the packed sets are given to the current workers so that as few experts as
   possible move (each new set to the worker that already hosts most of it), and experts of equal load trade
   places where that lets them stay (experts that measured nothing do not move for nothing).

Every expert is hosted at least once; no worker hosts an expert twice; every worker gets exactly
`slots_per_worker` experts. Deterministic: ties go to the lower expert id and the lower worker index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """workers[i]: the expert ids worker i hosts, ascending. replicas[e]: how many workers host expert e."""

    workers: tuple[tuple[int, ...], ...]
    num_experts: int

    @property
    def replicas(self) -> tuple[int, ...]:
        counts = [0] * self.num_experts
        for hosted in self.workers:
            for expert in hosted:
                counts[expert] += 1
        return tuple(counts)

    def worker_loads(self, loads: Sequence[float]) -> tuple[float, ...]:
        """Each worker's expected load: every expert's load split evenly over its replicas."""
        replicas = self.replicas
        return tuple(sum(loads[e] / replicas[e] for e in hosted) for hosted in self.workers)

    def balance(self, loads: Sequence[float]) -> float:
        """max / mean expected load per worker: 1.0 is perfect (and the value when nothing was measured)."""
        per_worker = self.worker_loads(loads)
        mean = sum(per_worker) / len(per_worker)
        return max(per_worker) / mean if mean > 0 else 1.0


def check_placement(workers: Sequence[Sequence[int]], num_experts: int) -> Placement:
    """A Placement of explicit sets; ValueError naming what is wrong (an expert nobody hosts, a duplicate)."""
    if not workers:
        raise ValueError("workers=[] must name at least one expert worker's set")
    hosted: set[int] = set()
    sets = []
    for i, experts in enumerate(workers):
        ids = tuple(sorted(experts))
        if len(set(ids)) != len(ids):
            raise ValueError(f"workers[{i}]={list(experts)} hosts an expert twice")
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"workers[{i}] names experts {bad} outside 0..{num_experts - 1}")
        hosted.update(ids)
        sets.append(ids)
    missing = sorted(set(range(num_experts)) - hosted)
    if missing:
        raise ValueError(f"experts {missing[:8]} are hosted by no worker")
    return Placement(tuple(sets), num_experts)


def replicate(loads: Sequence[float], num_slots: int, max_replicas: int) -> list[int]:
    """Replicas per expert: one each, then each spare slot to the highest load per replica (EPLB's
    `replicate_experts`), at most max_replicas each."""
    counts = [1] * len(loads)
    for _ in range(num_slots - len(loads)):
        open_ = [e for e in range(len(loads)) if counts[e] < max_replicas]
        hottest = max(open_, key=lambda e: (loads[e] / counts[e], -e))
        counts[hottest] += 1
    return counts


def pack(
    loads: Sequence[float], counts: Sequence[int], slots_per_worker: int, current: Sequence[Sequence[int]]
) -> list[set[int]]:
    """The replicas onto len(current) workers, heaviest first onto the least loaded worker with room that lacks
    the expert (EPLB's `balanced_packing`, with the one-replica-per-worker rule); between equally loaded
    workers, one that hosts the expert now."""
    num_workers = len(current)
    home = [set(hosted) for hosted in current]
    items = sorted(
        ((loads[e] / counts[e], e) for e in range(len(loads)) for _ in range(counts[e])),
        key=lambda item: (-item[0], item[1]),
    )
    hosted: list[set[int]] = [set() for _ in range(num_workers)]
    weight = [0.0] * num_workers
    for load, expert in items:
        room = [w for w in range(num_workers) if len(hosted[w]) < slots_per_worker]
        fits = [w for w in room if expert not in hosted[w]]
        if not fits:  # every worker with room hosts it: a full worker without it gives up one expert
            w = room[0]
            v, moved = _swap(hosted, w, expert)
            hosted[v].remove(moved)
            hosted[w].add(moved)
            shift = loads[moved] / counts[moved]
            weight[v] -= shift
            weight[w] += shift
            fits = [v]
        target = min(fits, key=lambda w: (weight[w], expert not in home[w], w))
        hosted[target].add(expert)
        weight[target] += load
    return hosted


def _swap(hosted: list[set[int]], w: int, expert: int) -> tuple[int, int]:
    """A full worker v without `expert` and an expert of v that w lacks. Exists: were every expert of a full v
    also on w, w would hold more than its slots (those plus `expert`)."""
    for v, experts in enumerate(hosted):
        if v != w and expert not in experts:
            movable = sorted(experts - hosted[w])
            if movable:
                return v, movable[0]
    raise AssertionError("no swap found: the slot counts are inconsistent")


def keep_in_place(
    packed: Sequence[set[int]], current: Sequence[Sequence[int]], share: Sequence[float]
) -> list[set[int]]:
    """The packed sets reordered so worker i gets the set that lets most of its experts stay (greedy): a set
    keeps an expert that worker hosts now, or one of equal load per replica (`share`) that `stay_home` can
    trade for it."""

    def keepable(p: set[int], hosted: Sequence[int]) -> int:
        by_share: dict[float, list[int]] = {}
        for e in p:
            by_share.setdefault(share[e], [0, 0])[0] += 1
        for e in hosted:
            if share[e] in by_share:
                by_share[share[e]][1] += 1
        return sum(min(a, b) for a, b in by_share.values())

    pairs = sorted(
        ((keepable(packed[p], current[w]), w, p) for w in range(len(current)) for p in range(len(packed))),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    out: list[set[int] | None] = [None] * len(current)
    used: set[int] = set()
    for _, w, p in pairs:
        if out[w] is None and p not in used:
            out[w] = set(packed[p])
            used.add(p)
    return [s if s is not None else set() for s in out]


def stay_home(
    sets: list[set[int]], share: Sequence[float], current: Sequence[Sequence[int]]
) -> list[set[int]]:
    """Swaps experts of equal load per replica between two workers when that lets more of them stay where they
    are (every worker's load unchanged): experts that measured nothing are not moved for nothing."""
    home = [set(hosted) for hosted in current]
    changed = True
    while changed:
        changed = False
        for w, v in ((w, v) for w in range(len(sets)) for v in range(len(sets)) if w != v):
            for a in sorted(sets[w] - home[w]):
                if a not in home[v] or a in sets[v]:
                    continue
                swaps = [b for b in sorted(sets[v] - sets[w]) if share[b] == share[a] and b not in home[v]]
                if swaps:
                    b = swaps[0]
                    sets[w].remove(a), sets[v].remove(b), sets[w].add(b), sets[v].add(a)
                    changed = True
    return sets


def rebalance(loads: Sequence[float], slots_per_worker: int, current: Sequence[Sequence[int]]) -> Placement:
    """EPLB placement for len(current) workers with slots_per_worker experts each, given each expert's load
    (len(loads) = n_routed_experts) and what each worker hosts now. Raises ValueError naming the field."""
    num_experts, num_workers = len(loads), len(current)
    if num_experts == 0:
        raise ValueError("loads=[] must give one load per routed expert")
    if num_workers == 0:
        raise ValueError("current=[] must list at least one expert worker")
    bad = [(e, x) for e, x in enumerate(loads) if not x >= 0]  # also NaN
    if bad:
        raise ValueError(f"loads[{bad[0][0]}]={bad[0][1]} must be >= 0")
    if not 1 <= slots_per_worker <= num_experts:
        raise ValueError(
            f"slots_per_worker={slots_per_worker} must be in [1, {num_experts}] (the routed experts)"
        )
    if slots_per_worker * num_workers < num_experts:
        raise ValueError(
            f"slots_per_worker={slots_per_worker} x {num_workers} workers < {num_experts} routed experts: "
            f"every expert needs a slot (at least {-(-num_experts // num_workers)} per worker)"
        )
    counts = replicate(loads, slots_per_worker * num_workers, max_replicas=num_workers)
    packed = pack(loads, counts, slots_per_worker, current)
    share = [load / count for load, count in zip(loads, counts, strict=True)]  # a replica's load
    settled = stay_home(keep_in_place(packed, current, share), share, current)
    return check_placement(settled, num_experts)
