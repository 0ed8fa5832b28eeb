"""The expert pool computes what the colocated worker computes, whatever the grouping: `RemoteExperts` (its real
split by owner and its combine) over a wire that is a function call (each batch goes through its header frame and
payload bytes to a real `ExpertWorker` holding a real shard: everything but UCX) against the colocated block on
the same tokens, on both of its paths: bit for bit with BF16 tokens, for one worker, three, replicas that split an
expert's tokens, and a skewed routing that gives a worker many more rows per expert than the whole layer has (on
CUDA that picks another tile shape of torch's grouped GEMM on the worker than on the colocated side).
* torch path (`set_fused(moe, False)`): the weighted rows against `LocalExperts`, and the block's output;
* fused path (`set_fused(moe, True)`, the CUDA default): the unweighted rows against the rows `fused_moe`
  computes (`moe_permute` + `routed_gemms` over the whole layer), and the block's output against `fused_moe`'s
  (`moe_route`'s routing, one fp32 `moe_combine` with the shared experts' `fused_mlp`).

CPU (BF16: the per-expert loop) always; CUDA (BF16: the grouped GEMM) at V2-Lite expert shapes with the `gpu`
marker."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from moemesh.config.mesh import parse_expert_set
from moemesh.kernels import moe_permute
from moemesh.model.config import ModelConfig
from moemesh.model.expert_shard import ExpertShard
from moemesh.model.moe import MoE
from moemesh.model.moe_fused import routed_gemms, set_fused
from moemesh.services.expert.worker import ExpertWorker
from moemesh.services.remote_experts import token_encoder
from moemesh.transport.errors import InvalidArgument
from moemesh.transport.expert_client import RemoteExperts, RemoteExpertsOptions
from moemesh.transport.expert_table import PoolWorker
from moemesh.transport.expert_wire import TOKEN_FORMATS, ExpertBatch, pack_frame, unpack_frame

LAYER = 1
TINY = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4)
V2_LITE = dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6)
LAYOUTS = {"one": ["all"], "three": ["0/3", "1/3", "2/3"], "replicas": ["0/3", "1/3", "2/3", "1-6"]}


def model_config(shape: dict) -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "deepseek_v2", "vocab_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "first_k_dense_replace": 1, "n_shared_experts": 1, **shape,
    })  # fmt: skip


def random_moe(config: ModelConfig, device: str) -> MoE:
    """Seeded random BF16 weights, drawn on `device` (V2-Lite's experts are 0.5 G values)."""
    gen = torch.Generator(device).manual_seed(3)
    moe = MoE(config, LAYER).to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.05)
    return moe


class LoopbackExperts(RemoteExperts):
    """RemoteExperts whose wire is a call: each batch's header goes through its frame bytes and its payload is
    copied, then the worker's `compute_sync` answers; the split, the encode and the combine are RemoteExperts'
    own."""

    def __init__(self, workers: dict[str, ExpertWorker], config: ModelConfig) -> None:
        super().__init__(
            [LAYER], config.n_routed_experts, token_encoder("bf16"), RemoteExpertsOptions("bf16")
        )
        self.experts = workers

    async def _exchange(self, part) -> torch.Tensor:
        header = unpack_frame(pack_frame(part.batch.header()), type(part.batch.header()))
        batch = ExpertBatch.from_wire(header, part.payload.clone())
        return self.experts[part.worker.worker_id].compute_sync(batch).to(self.wire_device, torch.bfloat16)


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pool-loop", daemon=True)
        self.thread.start()
        self.workers: list[ExpertWorker] = []

    def pool(self, moe: MoE, specs: list[str], device: str) -> LoopbackExperts:
        config = moe.config
        workers = {}
        for i, spec in enumerate(specs):
            ids = parse_expert_set(spec, config.n_routed_experts)
            experts = type(moe.experts)(len(ids), config.hidden_size, config.moe_intermediate_size)
            with torch.no_grad():
                experts.w13.data = moe.experts.w13[list(ids)].clone()
                experts.w2.data = moe.experts.w2[list(ids)].clone()
            shard = ExpertShard(config, ids, {LAYER: experts})
            workers[f"w{i}"] = ExpertWorker(f"w{i}", shard, torch.device(device), torch.bfloat16)
        self.workers += workers.values()
        remote = LoopbackExperts(workers, config)
        asyncio.run_coroutine_threadsafe(remote.start(), self.loop).result(timeout=30)
        for name, worker in workers.items():
            remote.add_worker(PoolWorker(name, "loopback:0", {LAYER: worker.shard.expert_ids}))
        return remote

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def loop():
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def cuda_moe():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return random_moe(model_config(V2_LITE), "cuda")


def routing(moe: MoE, num_tokens: int, skew: bool, seed: int):
    """hidden bf16 [T, D] and the block's own routing of it; `skew` pushes every token to experts 0..7."""
    gen = torch.Generator().manual_seed(seed)
    device = moe.experts.w13.device
    hidden = torch.randn(num_tokens, moe.config.hidden_size, generator=gen).to(device, torch.bfloat16)
    if not skew:
        weights, ids = moe.gate(hidden)
        return hidden, ids, weights
    logits = torch.randn(num_tokens, moe.config.n_routed_experts, generator=gen)
    logits[:, :8] += 20.0
    weights, ids = logits.softmax(-1).topk(moe.config.num_experts_per_tok, dim=-1)
    return hidden, ids.to(device), weights.to(device)


def fused_rows(moe: MoE, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The unweighted row of every slot [T * k, D] (token-major) as `fused_moe` computes them: the whole
    layer's rows permuted by expert, then its routed GEMMs."""
    num_experts = moe.config.n_routed_experts
    permuted = moe_permute(hidden, ids, num_experts)
    y = routed_gemms(permuted.x, moe.experts.w13, moe.experts.w2, permuted.offsets, ids.numel(), num_experts)
    return y[permuted.slot_rows.long()]


def check_rows_and_block(loop: Loop, moe: MoE, layout: str, cases: list[tuple[int, bool]]) -> None:
    device = str(moe.experts.w13.device)
    remote = loop.pool(moe, LAYOUTS[layout], device)
    for num_tokens, skew in cases:
        hidden, ids, weights = routing(moe, num_tokens, skew, seed=num_tokens)
        with torch.no_grad():
            local = moe.experts(LAYER, hidden, ids, weights)
            away = remote(LAYER, hidden, ids, weights)
            assert torch.equal(away, local), (layout, num_tokens, skew, float((away - local).abs().max()))
            local = fused_rows(moe, hidden, ids)
            away = remote.submit(LAYER, hidden, ids, weights, unweighted=True).result()
            assert torch.equal(away, local), (layout, num_tokens, skew, float((away - local).abs().max()))
    hidden = routing(moe, 33, False, seed=7)[0]
    # Both paths of the block, each against the same block with local experts on that path: the torch path
    # (router, weighted rows summed in BF16, shared output added) and the fused one (moe_route, one fp32
    # combine of unweighted rows and the shared output), which round differently.
    outputs = {}
    for fused in (False, True):
        set_fused(moe, fused)
        with torch.no_grad():
            here = moe(hidden)
            moe.set_expert_backend(remote)
            try:
                there = moe(hidden)  # the deferred path: shared experts while the routed ones are away
            finally:
                moe.set_expert_backend(moe.experts)
                set_fused(moe, None)
        assert torch.equal(there, here), (layout, fused, float((there - here).abs().max()))
        outputs[fused] = here
    assert not torch.equal(outputs[True], outputs[False])  # two paths indeed: the comparisons tell them apart
    assert remote.num_batches >= 2 * len(cases) + 2


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pool_rows_equal_the_colocated_rows_bit_for_bit(loop, layout):
    moe = random_moe(model_config(TINY), "cpu")
    check_rows_and_block(loop, moe, layout, [(1, False), (3, False), (17, False), (64, False), (40, True)])


def test_small_batches_compute_on_the_event_loop_the_rest_on_the_compute_thread(loop):
    moe = random_moe(model_config(TINY), "cpu")
    worker = loop.pool(moe, ["all"], "cpu").experts["w0"]
    worker.inline_max_tokens = 8
    threads, compute_sync = [], worker.compute_sync
    worker.compute_sync = lambda batch: (
        threads.append(threading.current_thread().name),
        compute_sync(batch),
    )[1]
    for num_tokens in (8, 9):
        hidden, ids, weights = routing(moe, num_tokens, False, seed=num_tokens)
        batch = ExpertBatch(num_tokens, LAYER, TOKEN_FORMATS["bf16"], moe.config.hidden_size,
                            token_encoder("bf16")(hidden), ids.to(torch.int32), weights.float())  # fmt: skip
        rows = asyncio.run_coroutine_threadsafe(worker.compute(batch), loop.loop).result(timeout=30)
        assert torch.equal(rows, compute_sync(batch))
    assert threads[0] == "pool-loop" and threads[1].startswith("experts"), threads
    fused = dataclasses.replace(batch, unweighted=True, layer_slots=1)  # fewer than its own 36 slots
    with pytest.raises(InvalidArgument, match=r"layer_slots=1 must be >= the 36 slots of the batch"):
        compute_sync(fused)
    with pytest.raises(ValueError, match=r"inline_max_tokens=-1 must be >= 0"):
        ExpertWorker("x", worker.shard, torch.device("cpu"), torch.bfloat16, inline_max_tokens=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_on_cuda_pool_rows_equal_the_colocated_rows_bit_for_bit(loop, cuda_moe, layout):
    """V2-Lite expert shapes, both paths of the block (the fused one is the CUDA default). The skewed 1024-token
    case: the colocated grouped GEMM sees 6144 rows over 64 experts (96 a group: torch's small tile), the worker
    hosting experts 0..21 nearly all of them over 22 (its large tile). The skewed 256-token case is the fused
    path's decode kernel (1536 rows <= 32 a group): the layer's 24 rows per expert pick its 32-row tile, the
    worker's own 1536 / 22 would pick the 64-row one — it is handed the layer's (`rows_per_expert`)."""
    cases = [(1, False), (6, False), (64, False), (512, False), (2048, False), (1024, True), (256, True)]
    check_rows_and_block(loop, cuda_moe, layout, cases)
