"""Kernel launches of one decode step, counted on a CPU (`bench/launch_count.py`): the per-layer budget of the
CUDA path (fused MoE and MLP), and no host sync anywhere in the step. The counts are exact, so a change that
adds a launch to the decode step fails here and says where."""

from __future__ import annotations

import pytest

from bench.launch_count import build_model, count_decode_step, decode_batch, table
from moemesh.kernels.dispatch import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts Triton launches under TRITON_INTERPRET=1")

# launches per part of a decode step on the CUDA path (V2-Lite structure: no q-LoRA, dense layer 0)
BUDGET = {
    "bf16": dict(embed=1, attention=8, dense_mlp=3, moe=5, head=3),
    "fp8": dict(embed=1, attention=9, dense_mlp=5, moe=5, head=3),
}


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_decode_step_launches_per_layer(weights):
    # FP8 experts need 128-aligned expert widths; the dense width stays unaligned, as V2-Lite's 10944
    fp8 = dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=128) if weights == "fp8" else {}
    model = build_model("tiny", layers=3, fp8=weights == "fp8", moe="fused", **fp8)
    fwd, caches = decode_batch(model, batch=2, context=40)
    counts = count_decode_step(model, fwd, caches, dry=False)  # the kernels run too: the step is real
    rows = table(counts, 3)
    want = BUDGET[weights]
    got = dict(
        embed=rows[0]["launches"],
        attention=[r["attention"] for r in rows[1:4]],
        mlp=[r["mlp"] for r in rows[1:4]],
        head=rows[4]["launches"],
    )
    assert got == dict(
        embed=want["embed"],
        attention=[want["attention"]] * 3,
        mlp=[want["dense_mlp"], want["moe"], want["moe"]],
        head=want["head"],
    ), counts.names
    assert sum(counts.syncs.values()) == 0, counts.syncs


def test_the_counter_sees_the_reference_path_too():
    """The torch reference MoE (a loop over the experts that got tokens) launches far more: the counter counts
    aten ops, not only Triton kernels."""
    model = build_model("tiny", layers=2, fp8=False, moe="reference")
    fwd, caches = decode_batch(model, batch=2, context=40)
    counts = count_decode_step(model, fwd, caches, dry=False)
    assert counts.launches[(1, "mlp")] > 2 * BUDGET["bf16"]["moe"]
    assert counts.launches[(1, "attention")] == BUDGET["bf16"]["attention"]


def test_the_command_prints_the_per_layer_table(capsys):
    from bench.launch_count import main

    counts = main(["--shapes", "tiny", "--layers", "2", "--batch", "3", "--fp8"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["part", "attention", "mlp/moe", "launches", "syncs"]
    assert lines[2].split()[:4] == [
        "layer",
        "0",
        str(counts.launches[(0, "attention")]),
        str(counts.launches[(0, "mlp")]),
    ]
    assert lines[-1].split() == ["total", str(counts.total), "0"]
