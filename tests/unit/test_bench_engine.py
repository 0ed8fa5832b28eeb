"""bench_engine's reduced CPU form: it runs, and its JSON carries every per-step figure the issue asks for."""

from __future__ import annotations

import json

import pytest

from bench import bench_engine


def test_cpu_form_reports_step_device_host_launches_and_floor(tmp_path):
    path = bench_engine.main(["--device", "cpu", "--skip-peer", "--moe", "fused", "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    assert payload["card"] == "cpu" and payload["commit"] and payload["date"]
    rows = payload["rows"]
    assert [(r["weights"], r["moe"], r["batch"]) for r in rows] == [
        ("bf16", "fused", 1),
        ("bf16", "fused", 8),
    ]
    for r in rows:
        for key in (
            "step_ms",
            "device_ms",
            "host_prepare_ms",
            "host_schedule_ms",
            "host_after_ms",
            "floor_ms",
        ):
            assert r[key] > 0, (key, r[key])
        assert r["launches"] > 10 and r["launch_source"] == "cpu torch ops"
        assert sum(r["kernels"].values()) == r["launches"] and "aten::linear" in r["kernels"]
        assert r["step_over_floor"] == pytest.approx(r["step_ms"] / r["floor_ms"])
        assert (
            0 < r["launch_device_sample_ms"] < r["step_ms"]
        )  # the forward and the sampler, past the host parts
        assert r["pages_leaked_after_abort"] == 0
    assert "no tokenizer" in payload["engine"]  # measured as workers run it
    assert rows[1]["weight_bytes"] > rows[0]["weight_bytes"]  # 8 tokens touch more experts than one


def test_bad_arguments_name_the_value():
    with pytest.raises(SystemExit):
        bench_engine.main(["--device", "cpu", "--moe", "fast"])
