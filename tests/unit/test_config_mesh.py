"""The mesh services' deploy knobs: flags win over MOEMESH_* environment, bad values name field and value."""

from __future__ import annotations

import argparse

import pytest

from moemesh.config.mesh import GatewayConfig, WorkerConfig


def serve_args(role: str, *extra: str) -> argparse.Namespace:
    return argparse.Namespace(role=role, worker_id="", host="127.0.0.1", port=5000, model="demo", device="cpu",
                              registry="127.0.0.1:50051", topology="pd", extra=list(extra))  # fmt: skip


def test_worker_flags_win_over_the_environment():
    env = {"MOEMESH_PAGE_SIZE": "8", "MOEMESH_NUM_KV_PAGES": "100", "MOEMESH_KV_CHECKSUM": "1",
           "MOEMESH_TORCH_THREADS": "3"}  # fmt: skip
    config = WorkerConfig.from_args(serve_args("decode", "--page-size", "16", "--lease-ttl-s", "2.5"), env)
    assert config.engine.page_size == 16 and config.engine.num_kv_pages == 100
    assert config.kv_checksum and config.torch_threads == 3 and config.lease_ttl_s == 2.5
    assert config.worker_id == "decode-5000" and not config.force_local_prefill
    assert WorkerConfig.from_args(serve_args("colocated"), {}).force_local_prefill


def test_bad_worker_knobs_name_field_and_value():
    with pytest.raises(ValueError, match="lease_ttl_s=0.0 must be > 0"):
        WorkerConfig.from_args(serve_args("prefill", "--lease-ttl-s", "0"), {})
    with pytest.raises(ValueError, match="page_size=0 must be >= 1"):
        WorkerConfig.from_args(serve_args("prefill"), {"MOEMESH_PAGE_SIZE": "0"})
    with pytest.raises(ValueError, match="role='gateway' must be prefill, decode, colocated or expert"):
        WorkerConfig(role="gateway", worker_id="g")


def test_gateway_knobs():
    config = GatewayConfig.from_args(
        serve_args("gateway", "--max-inflight", "4"), {"MOEMESH_HEARTBEAT_S": "0.2"}
    )
    assert (config.max_inflight, config.heartbeat_s, config.model_id) == (4, 0.2, "demo")
    with pytest.raises(ValueError, match="max_inflight=0 must be >= 1"):
        GatewayConfig(max_inflight=0)
