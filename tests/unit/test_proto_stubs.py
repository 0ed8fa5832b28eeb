"""The committed stubs equal what tools/gen_proto.py makes now, and the protos follow DESIGN §3's rules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moemesh._proto.v1 import common_pb2, expert_pb2, gateway_pb2, worker_pb2

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "moemesh" / "_proto" / "v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "tools" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = _load_generator()
    fresh = {p.name: p.read_bytes() for p in gen.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "run `make proto` and commit moemesh/_proto"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit moemesh/_proto"


@pytest.mark.parametrize("module", [common_pb2, gateway_pb2, worker_pb2, expert_pb2])
def test_every_enum_starts_at_unspecified_zero(module):
    enums = list(module.DESCRIPTOR.enum_types_by_name.values())
    for message in module.DESCRIPTOR.message_types_by_name.values():
        enums += list(message.enum_types)
    for enum in enums:
        first = enum.values_by_number[0]
        prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
        assert first.name == f"{prefix}_UNSPECIFIED", f"{enum.full_name}: value 0 is {first.name}"


def test_kv_target_carries_the_design_fields():
    fields = set(worker_pb2.KvTarget.DESCRIPTOR.fields_by_name)
    expected = {"request_id", "lease_id", "lease_generation", "ucx_address", "page_ids", "num_skip_tokens"}
    assert expected | {"layout", "traceparent"} <= fields


def test_generate_request_roundtrip_keeps_unset_sampling_fields_unset():
    request = gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[1, 2, 3]))
    request.sampling.max_tokens = 4
    request.sampling.temperature = 0.0  # greedy is a set value, distinct from "server default"
    decoded = gateway_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded.WhichOneof("prompt") == "token_ids"
    assert list(decoded.token_ids.ids) == [1, 2, 3]
    assert decoded.sampling.HasField("temperature") and decoded.sampling.temperature == 0.0
    assert not decoded.sampling.HasField("top_p")
    assert not decoded.sampling.HasField("seed")
