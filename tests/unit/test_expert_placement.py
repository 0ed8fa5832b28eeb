"""EPLB placement (services/expert/placement.py): loads -> which experts each expert-pool worker hosts."""

from __future__ import annotations

import random

import pytest

from moemesh.services.expert.placement import Placement, check_placement, rebalance, replicate

CONTIGUOUS_3_OF_8 = [(0, 1), (2, 3, 4), (5, 6, 7)]  # `--experts i/3` of 8


def test_the_hottest_expert_gets_the_spare_slot_and_the_packing_balances_the_workers():
    loads = [800, 10, 10, 10, 10, 10, 10, 10]  # expert 0 carries most of the tokens
    placement = rebalance(loads, 3, CONTIGUOUS_3_OF_8)  # 9 slots: one spare
    assert placement.replicas == (2, 1, 1, 1, 1, 1, 1, 1)
    # expert 0's two replicas (400 each) on two workers, two light experts beside each, three on the third
    # worker: loads 420, 30, 420; and of the equally light experts as many as can stay where they are, so
    # only two experts load from the checkpoint (6 on worker 0, 0 on worker 2)
    assert placement.workers == ((0, 1, 6), (2, 3, 4), (0, 5, 7))
    assert placement.worker_loads(loads) == (420.0, 30.0, 420.0)
    before = check_placement(CONTIGUOUS_3_OF_8, 8)
    assert before.balance(loads) == pytest.approx(810 / (870 / 3))  # worker 0 had 800 + 10 of 870
    assert placement.balance(loads) == pytest.approx(420 / 290)


def test_replicas_go_by_load_per_replica():
    assert replicate([100, 60, 1], 5, max_replicas=3) == [2, 2, 1]  # 100, then 60 (60 > 100 / 2), not 100
    assert replicate([100, 60, 1], 6, max_replicas=3) == [3, 2, 1]  # then 100 (100 / 2 > 60 / 2)
    assert replicate([100, 60, 1], 6, max_replicas=2) == [2, 2, 2]  # at most one replica per worker


def test_every_worker_fills_its_slots_with_distinct_experts_and_every_expert_is_hosted():
    rng = random.Random(5)
    for _ in range(300):
        num_experts = rng.randint(1, 24)
        num_workers = rng.randint(1, 6)
        slots = rng.randint(-(-num_experts // num_workers), num_experts)
        loads = [rng.choice([0, 1, 5, 1000]) * rng.random() for _ in range(num_experts)]
        current = [tuple(range(i * num_experts // num_workers, (i + 1) * num_experts // num_workers))
                   for i in range(num_workers)]  # fmt: skip
        placement = rebalance(loads, slots, current)
        assert all(len(hosted) == slots == len(set(hosted)) for hosted in placement.workers)
        assert min(placement.replicas) >= 1 and max(placement.replicas) <= num_workers
        assert sum(placement.replicas) == slots * num_workers


def test_skewed_load_ends_better_balanced_than_contiguous_shards():
    rng = random.Random(1)
    for _ in range(50):
        loads = [rng.paretovariate(1.2) for _ in range(64)]  # a few hot experts, as routers produce
        current = [tuple(range(16 * i, 16 * (i + 1))) for i in range(4)]
        before = check_placement(current, 64).balance(loads)
        after = rebalance(loads, 20, current)  # 16 spare slots for replicas of the hottest
        assert after.balance(loads) <= before
        assert after.balance(loads) < 1.1


def test_without_spare_slots_the_experts_are_packed_by_load_and_none_is_replicated():
    loads = [90, 80, 70, 60, 5, 4, 3, 2]
    placement = rebalance(loads, 4, [(0, 1, 2, 3), (4, 5, 6, 7)])
    assert placement.replicas == (1,) * 8
    # 90 -> w0, 80 -> w1, 70 -> w1 (80 < 90), 60 -> w0 (90 < 150), 5 -> w0 (150 = 150: it hosts 5 now... no:
    # w1 does, which is then the tie's winner), 4 -> w0, 3 -> w0 or w1 by load, 2 likewise: 157 and 157
    assert placement.worker_loads(loads) == (157.0, 157.0)
    assert placement.balance(loads) == 1.0


def test_the_workers_keep_the_sets_closest_to_what_they_host():
    assert rebalance([1] * 6, 3, [(3, 4, 5), (0, 1, 2)]).workers == ((3, 4, 5), (0, 1, 2))  # balanced: stays
    assert rebalance([0] * 6, 2, [(3, 5), (0, 1), (2, 4)]).workers == ((3, 5), (0, 1), (2, 4))
    placement = rebalance([50, 1, 1, 1, 1, 1], 3, [(0, 1, 2), (3, 4, 5)])  # 50 stays; the light ones trade
    assert placement.workers == ((0, 1, 2), (3, 4, 5))


def test_nothing_measured_still_gives_a_valid_placement_with_balance_one():
    placement = rebalance([0] * 8, 3, CONTIGUOUS_3_OF_8)
    assert {e for hosted in placement.workers for e in hosted} == set(range(8))
    assert placement.balance([0] * 8) == 1.0


@pytest.mark.parametrize(
    ("loads", "slots", "current", "message"),
    [
        ([], 1, [(0,)], r"loads=\[\] must give one load per routed expert"),
        ([1, 2], 1, [], r"current=\[\] must list at least one expert worker"),
        ([1, -2], 1, [(0,), (1,)], r"loads\[1\]=-2 must be >= 0"),
        ([1, float("nan")], 1, [(0,), (1,)], r"loads\[1\]=nan must be >= 0"),
        ([1, 2, 3], 0, [(0, 1, 2)], r"slots_per_worker=0 must be in \[1, 3\]"),
        ([1, 2, 3], 4, [(0, 1, 2)], r"slots_per_worker=4 must be in \[1, 3\]"),
        ([1] * 8, 2, CONTIGUOUS_3_OF_8, r"slots_per_worker=2 x 3 workers < 8 routed experts.*at least 3"),
    ],
)
def test_bad_input_names_the_field(loads, slots, current, message):
    with pytest.raises(ValueError, match=message):
        rebalance(loads, slots, current)


def test_check_placement_names_a_gap_or_a_duplicate():
    assert check_placement([(1, 0), (2,)], 3) == Placement(((0, 1), (2,)), 3)
    with pytest.raises(ValueError, match=r"experts \[2\] are hosted by no worker"):
        check_placement([(0, 1)], 3)
    with pytest.raises(ValueError, match=r"workers\[0\]=\[1, 1\] hosts an expert twice"):
        check_placement([(1, 1), (0, 2)], 3)
    with pytest.raises(ValueError, match=r"workers\[1\] names experts \[5\] outside 0..2"):
        check_placement([(0, 1, 2), (5,)], 3)
