"""An attention worker with `--remote-experts` frees its routed-expert weights before its engine plans memory
(`detach_routed_experts`, from `load_engine`): on a GPU its KV pool is planned from what it really holds. Until
`install_remote_experts`, `AwayExperts` stands in: each block computes what it will compute with the pool,
with zero routed rows (the memory profile's forward)."""

from __future__ import annotations

import pytest
import torch

from moemesh.config.mesh import WorkerConfig
from moemesh.make_checkpoint import shape_config, write_random_checkpoint
from moemesh.model.moe_fused import fused_shared
from moemesh.services.model_loading import load_engine
from moemesh.services.remote_experts import AwayExperts, detach_routed_experts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(shape_config("tiny", 3), tmp_path_factory.mktemp("detach"), seed=2,
                                   log=lambda *_: None)  # fmt: skip


def test_remote_experts_leave_before_the_engine_plans_and_blocks_run_without_them(model_dir):
    config = WorkerConfig(role="decode", worker_id="d", model=str(model_dir), dtype="bfloat16",
                          remote_experts=True)  # fmt: skip
    loaded = load_engine(config)
    model = loaded.engine.model
    layers = model.moe_layers()
    assert len(layers) == 2 and loaded.engine.config.cuda_graph_batch_sizes == ()
    for moe in layers:
        assert isinstance(moe.expert_backend, AwayExperts)
        assert [p.numel() for p in moe.experts.parameters()] == [0, 0], moe.layer_idx
        assert moe.experts.w13.dtype == torch.bfloat16  # dtypes kept: the fused path reads them
    assert detach_routed_experts(model) == 0  # nothing left to free (install_remote_experts calls it again)

    moe = layers[0]
    x = torch.randn(5, moe.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        moe.use_fused = False  # torch path: zero routed rows summed, plus the shared experts
        assert torch.equal(moe(x), moe.shared_experts(x))
        moe.use_fused = True  # fused path (torch references on CPU): moe_combine of zero rows and the shared
        assert torch.equal(moe(x), fused_shared(moe, x).to(x.dtype))
    moe.use_fused = None


def test_detach_frees_every_routed_weight_and_says_how_much(model_dir):
    config = WorkerConfig(role="colocated", worker_id="c", model=str(model_dir), dtype="bfloat16")
    model = load_engine(config).engine.model  # experts local: nothing detached
    routed = sum(p.numel() * p.element_size() for moe in model.moe_layers() for p in moe.experts.parameters())
    raw = shape_config("tiny", 3)
    per_layer = raw["n_routed_experts"] * 3 * raw["hidden_size"] * raw["moe_intermediate_size"] * 2  # bf16
    assert routed == 2 * per_layer > 0
    assert detach_routed_experts(model) == routed
