"""The expert wire's pure parts: which experts a worker hosts (`--experts`), who computes each slot
(`ExpertTable`, replicas taking turns), the batch's bytes and frames, and the expert worker's answers to
batches it cannot serve."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moemesh._proto.v1 import expert_pb2
from moemesh.config.mesh import WorkerConfig, parse_expert_set
from moemesh.transport.errors import Unavailable
from moemesh.transport.expert_client import RemoteExpertsOptions
from moemesh.transport.expert_table import ExpertTable, PoolWorker
from moemesh.transport.expert_wire import FRAME_BYTES, ExpertBatch, pack_frame, payload_bytes, unpack_frame


def test_expert_sets_from_flags():
    assert parse_expert_set("all", 4) == (0, 1, 2, 3)
    assert [parse_expert_set(f"{i}/3", 8) for i in range(3)] == [(0, 1), (2, 3, 4), (5, 6, 7)]
    assert parse_expert_set("6, 0-2", 8) == (0, 1, 2, 6)
    with pytest.raises(ValueError, match=r"experts='3/3' must be 'i/N' with 0 <= i < N <= 8"):
        parse_expert_set("3/3", 8)
    with pytest.raises(ValueError, match=r"experts='0-9' names experts outside 0..7"):
        parse_expert_set("0-9", 8)
    with pytest.raises(ValueError, match=r"experts='x' must be 'all'"):
        parse_expert_set("x", 8)


def test_worker_config_checks_the_expert_knobs():
    with pytest.raises(ValueError, match=r"expert_token_format='nvfp4' must be one of bf16, fp8"):
        WorkerConfig(role="decode", worker_id="d", expert_token_format="nvfp4")
    with pytest.raises(ValueError, match=r"remote_experts=True is for attention workers"):
        WorkerConfig(role="expert", worker_id="e", remote_experts=True)
    with pytest.raises(ValueError, match=r"token_format='fp4' must be one of bf16, fp8"):
        RemoteExpertsOptions(token_format="fp4")


def test_table_assigns_each_slot_to_a_host_and_replicas_take_turns():
    a = PoolWorker("a", "h:1", {1: (0, 1, 2)})
    b = PoolWorker("b", "h:2", {1: (2, 3)})  # expert 2 on both
    table = ExpertTable([a, b], num_experts=4, layers=[1])
    assert table.complete
    ids = torch.tensor([[0, 2], [3, 2], [1, 2], [2, 3]])
    assert table.assign(1, ids).tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]


def test_table_names_what_no_worker_hosts():
    table = ExpertTable(
        [PoolWorker("a", "h:1", {1: (0, 1)}), PoolWorker("b", "h:2", {2: (0, 1, 2, 3)})], 4, [1, 2]
    )
    assert not table.complete
    assert table.describe_missing() == "2 (layer, expert) pairs, e.g. layer 1 experts [2, 3]"
    assert table.assign(1, torch.tensor([[0, 1]])).tolist() == [[0, 0]]
    with pytest.raises(Unavailable, match=r"no live expert worker hosts 2 \(layer, expert\) pairs"):
        table.assign(1, torch.tensor([[0, 3]]))


def test_batch_bytes_round_trip():
    tokens = torch.arange(40, dtype=torch.uint8)
    ids = torch.tensor([[1, -1], [-1, 4], [7, 2]], dtype=torch.int32)
    weights = torch.tensor([[0.5, 0.25], [0.125, 1.0], [2.0, 3.0]])
    batch = ExpertBatch(9, 2, expert_pb2.TOKEN_FORMAT_BF16, 16, tokens, ids, weights, "00-ab-cd-01")
    header = unpack_frame(pack_frame(batch.header()), expert_pb2.ExpertBatchHeader)
    assert (header.micro_batch_id, header.layer, header.num_tokens, header.top_k) == (9, 2, 3, 2)
    assert [p.num_bytes for p in header.payloads] == [40, 24, 24]
    payload = batch.payload()
    assert payload.numel() == payload_bytes(header) == 48 + 32 + 32
    back = ExpertBatch.from_wire(header, payload)
    assert torch.equal(back.tokens, tokens) and torch.equal(back.expert_ids, ids)
    assert torch.equal(back.weights, weights) and back.num_slots == 4 and back.traceparent == "00-ab-cd-01"
    assert (back.unweighted, back.layer_slots) == (False, 0)  # weighted rows unless asked otherwise
    fused = dataclasses.replace(batch, unweighted=True, layer_slots=12)
    header = unpack_frame(pack_frame(fused.header()), expert_pb2.ExpertBatchHeader)
    back = ExpertBatch.from_wire(header, fused.payload())
    assert (header.unweighted, header.layer_slots, back.unweighted, back.layer_slots) == (True, 12, True, 12)


def test_batch_headers_that_do_not_add_up_are_refused():
    batch = ExpertBatch(1, 1, 1, 16, torch.zeros(8, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.int32),
                        torch.zeros(2, 2))  # fmt: skip
    header = batch.header()
    header.top_k = 3
    with pytest.raises(ValueError, match=r"needs 24-byte ids and weights, got 16 and 16"):
        ExpertBatch.from_wire(header, batch.payload())
    with pytest.raises(ValueError, match=r"does not fit a 1024-byte frame"):
        pack_frame(expert_pb2.ExpertBatchHeader(traceparent="x" * FRAME_BYTES))
