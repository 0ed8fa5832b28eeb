"""The expert pool in this process over real ucxx (TCP on loopback): expert-pool workers (`ExpertWorker` +
`UcxExpertServer`, each holding only its shard of the tiny checkpoint) on a background event loop, and the
model's routed experts swapped for `RemoteExperts`. With BF16 tokens the logits are the local ones bit for bit
(one worker, three, and with replicas) and greedy generation of ragged prompts gives the same tokens; FP8
tokens stay within a stated logit tolerance; a batch a worker cannot serve and a lost worker end in errors
naming why, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
import time

import grpc
import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh._proto.v1 import expert_pb2, expert_pb2_grpc
from moemesh.config.engine import EngineConfig
from moemesh.config.mesh import parse_expert_set
from moemesh.model.checkpoint import CheckpointError
from moemesh.model.expert_shard import load_expert_shard
from moemesh.model.moe_fused import set_fused
from moemesh.services.expert.servicer import ExpertServicer
from moemesh.services.expert.worker import ExpertWorker
from moemesh.services.gateway.rebalance import Rebalancer
from moemesh.services.remote_experts import token_encoder
from moemesh.supervisor import free_ports
from moemesh.transport.channels import aio_channel
from moemesh.transport.errors import FailedPrecondition, InvalidArgument, StalePlacement, Unavailable
from moemesh.transport.expert_client import RemoteExperts, RemoteExpertsOptions
from moemesh.transport.expert_server import UcxExpertServer
from moemesh.transport.expert_table import PoolWorker
from moemesh.transport.expert_wire import ExpertBatch
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.registry import Membership
from tests.integration.mesh_tiny import build_tiny

pytest.importorskip("ucxx")

# FP8 e4m3 tokens (1x128 groups) against BF16 tokens, on the tiny model (logits' std about 0.6): the mean
# |logit difference| per prompt is at most FP8_MEAN_LOGIT_TOLERANCE (measured 0.012-0.017), and at most
# FP8_VS_BF16_ERROR times the mean |difference| computing in BF16 itself makes against fp32 (measured 1.4-2.1x).
# Not a bound on the max: a token whose top-k experts are a near tie routes differently either way (BF16
# against fp32 moves single logits by 0.57 on these prompts).
FP8_MEAN_LOGIT_TOLERANCE = 0.03
FP8_VS_BF16_ERROR = 3.0
PROMPTS = [[5, 9, 13], list(range(40, 77)), [300, 2, 7, 7, 1, 250, 19, 4, 8], list(range(100, 117))]


class Pool:
    """Expert workers and RemoteExperts on one event loop in a background thread (as in a worker process:
    the engine calls from its own thread)."""

    def __init__(self, model_dir, device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.device = torch.device(device)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pool-loop", daemon=True)
        self.thread.start()
        self.servers: list[UcxExpertServer] = []
        self.experts: dict[str, ExpertWorker] = {}
        self.clients: list[RemoteExperts] = []

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def worker(self, name: str, spec: str) -> PoolWorker:
        shard = load_expert_shard(self.model_dir, parse_expert_set(spec, 8), self.device, torch.bfloat16)
        worker = ExpertWorker(name, shard, self.device, torch.bfloat16)
        self.experts[name] = worker
        server = UcxExpertServer(worker.compute)
        self.servers.append(server)
        address = self.run(server.start())
        return PoolWorker(name, address, {layer: shard.expert_ids for layer in shard.layers})

    def remote(
        self, llm: LLM, workers: list[PoolWorker], token_format: str = "bf16", **options
    ) -> RemoteExperts:
        layers = llm.model.moe_layers()
        remote = RemoteExperts([m.layer_idx for m in layers], 8, token_encoder(token_format),
                               RemoteExpertsOptions(token_format, **options))  # fmt: skip
        self.run(remote.start())
        for worker in workers:
            remote.add_worker(worker)
        self.clients.append(remote)
        return remote

    def close(self) -> None:
        for obj in [*self.clients, *self.servers]:
            with contextlib.suppress(Exception):
                self.run(obj.close())
        self.run(_cancel_others())  # ucxx's progress task on this loop
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def experts_on(llm: LLM, backend):
    layers = llm.model.moe_layers()
    for moe in layers:
        moe.set_expert_backend(backend)
    try:
        yield
    finally:
        for moe in layers:
            moe.set_expert_backend(moe.experts)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-experts"))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    # no prefix cache: a second generate of the same prompts would reuse the first one's pages and prefill only
    # the tails, in other chunks than the first — which rounds differently in BF16 whoever computes the experts
    config = EngineConfig(page_size=8, num_kv_pages=128, max_num_seqs=8, max_num_batched_tokens=48,
                          enable_prefix_caching=False)  # fmt: skip
    return LLM(tiny_dir, device="cpu", dtype="bfloat16", engine_config=config)


@pytest.fixture(scope="module")
def pool(tiny_dir):
    pool = Pool(tiny_dir)
    pool.shards = {name: pool.worker(name, spec) for name, spec in
                   [("all", "all"), ("s0", "0/3"), ("s1", "1/3"), ("s2", "2/3"), ("r", "2-6")]}  # fmt: skip
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def local(llm):
    logits = [llm.score(ids) for ids in PROMPTS]
    tokens = [c.token_ids for c in llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))]
    return logits, tokens


@pytest.mark.parametrize("layout", [("all",), ("s0", "s1", "s2"), ("s0", "s1", "s2", "r")])
def test_bf16_tokens_give_the_local_logits_and_tokens_bit_for_bit(layout, pool, llm, local):
    remote = pool.remote(llm, [pool.shards[name] for name in layout])
    before = {name: pool.experts[name].tokens[1].clone() for name in layout}
    with experts_on(llm, remote):
        logits = [llm.score(ids) for ids in PROMPTS]
        tokens = [c.token_ids for c in llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))]
    for i, (mine, ref) in enumerate(zip(logits, local[0], strict=True)):
        assert torch.equal(mine, ref), f"prompt {i}: max diff {(mine - ref).abs().max()}"
    assert tokens == local[1]
    assert remote.num_batches >= 2 * len(PROMPTS)  # every MoE layer of every forward went to the pool
    computed = {name: pool.experts[name].tokens[1] - before[name] for name in layout}
    slots = sum(len(ids) for ids in PROMPTS) * 2 + 6 * 2 * len(PROMPTS)  # score + generate, top_k = 2
    assert sum(int(c.sum()) for c in computed.values()) >= slots  # every slot once (generate recomputes none)
    if "r" in layout:  # experts 2..6 have two hosts, which take their tokens in turn
        assert remote.table.counts[1].tolist() == [1, 1, 2, 2, 2, 2, 2, 1]
        assert int(computed["r"][2:7].sum()) > 0
        assert int(computed["s1"][2:5].sum() + computed["s2"][5:7].sum() + computed["s0"][2:2].sum()) > 0


@pytest.fixture(scope="module")
def local_fused(llm):
    """The colocated model on the fused path (the CUDA default; on a CPU each op's torch reference)."""
    set_fused(llm.model, True)
    try:
        logits = [llm.score(ids) for ids in PROMPTS]
        tokens = [c.token_ids for c in llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))]
    finally:
        set_fused(llm.model, None)
    return logits, tokens


@pytest.mark.parametrize("layout", [("all",), ("s0", "s1", "s2"), ("s0", "s1", "s2", "r")])
def test_on_the_fused_path_the_pool_gives_the_fused_logits_and_tokens_bit_for_bit(layout, pool, llm, local,
                                                                                    local_fused):  # fmt: skip
    """Every block on the fused path with its experts away (`moe_route`, unweighted rows, `moe_combine`) gives
    what the fused colocated model gives: logits bit for bit, the same greedy tokens."""
    remote = pool.remote(llm, [pool.shards[name] for name in layout])
    set_fused(llm.model, True)
    try:
        with experts_on(llm, remote):
            logits = [llm.score(ids) for ids in PROMPTS]
            tokens = [
                c.token_ids for c in llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))
            ]
    finally:
        set_fused(llm.model, None)
    for i, (mine, ref) in enumerate(zip(logits, local_fused[0], strict=True)):
        assert torch.equal(mine, ref), f"prompt {i}: max diff {(mine - ref).abs().max()}"
    assert tokens == local_fused[1]
    assert remote.num_batches >= 2 * len(PROMPTS)
    # the two paths round differently, so the comparisons above tell them apart
    assert not all(torch.equal(a, b) for a, b in zip(local_fused[0], local[0], strict=True))


def test_a_worker_predating_unweighted_rows_is_refused_naming_it(pool, llm):
    """A worker whose wire knows no `unweighted` computes weighted rows and does not echo the flag: the fused
    block's call fails naming it, rather than combining weighted rows as unweighted ones."""

    class OldServer(UcxExpertServer):
        async def _answer(self, ep, header, payload):
            header.ClearField("unweighted")  # what a receiver without fields 10 and 11 parses
            header.ClearField("layer_slots")
            await super()._answer(ep, header, payload)

    worker = pool.experts["all"]
    server = OldServer(worker.compute)
    pool.servers.append(server)
    old = PoolWorker("old", pool.run(server.start()), {layer: worker.shard.expert_ids for layer in (1, 2)})
    remote = pool.remote(llm, [old])
    assert torch.equal(llm.score(PROMPTS[0]), remote_score(llm, remote, PROMPTS[0]))  # torch path: fine
    set_fused(llm.model, True)
    try:
        with (
            experts_on(llm, remote),
            pytest.raises(FailedPrecondition, match=r"expert worker old answered weighted rows to a batch "
                                                    r"asking for unweighted ones: it runs another version"),
        ):  # fmt: skip
            llm.score(PROMPTS[0])
    finally:
        set_fused(llm.model, None)


def remote_score(llm: LLM, remote: RemoteExperts, ids: list[int]) -> torch.Tensor:
    with experts_on(llm, remote):
        return llm.score(ids)


def test_pingpong_micro_batches_give_the_same_tokens(pool, llm, local, tiny_dir):
    """Decode batches of 4 split in two, interleaved at the remote MoE layers: the same greedy tokens."""
    config = dataclasses.replace(llm.engine.config, pingpong=True)
    pingpong = LLM(tiny_dir, device="cpu", dtype="bfloat16", engine_config=config)
    remote = pool.remote(pingpong, [pool.shards[n] for n in ("s0", "s1", "s2")])
    with experts_on(pingpong, remote):
        tokens = [
            c.token_ids for c in pingpong.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))
        ]
    assert tokens == local[1]
    assert pingpong.engine.runner.num_pingpong_steps >= 5  # every decode step of the 4 requests was split


def test_fp8_tokens_stay_within_the_stated_logit_tolerance(pool, llm, local, tiny_dir):
    remote = pool.remote(llm, [pool.shards[n] for n in ("s0", "s1", "s2")], token_format="fp8")
    with experts_on(llm, remote):
        logits = [llm.score(ids) for ids in PROMPTS]
    fp32 = LLM(tiny_dir, device="cpu", dtype="float32", engine_config=llm.engine.config)
    for i, (mine, ref, exact) in enumerate(zip(logits, local[0], map(fp32.score, PROMPTS), strict=True)):
        fp8_error, bf16_error = float((mine - ref).abs().mean()), float((ref - exact).abs().mean())
        assert 0 < fp8_error <= FP8_MEAN_LOGIT_TOLERANCE, (i, fp8_error)  # > 0: really quantized
        assert fp8_error <= FP8_VS_BF16_ERROR * bf16_error, (i, fp8_error, bf16_error)


def test_a_batch_for_experts_the_worker_does_not_host_is_refused_naming_them(pool, llm):
    lying = PoolWorker("s0", pool.shards["s0"].ucx_address, {1: tuple(range(8)), 2: tuple(range(8))})
    remote = pool.remote(llm, [lying])
    with (
        experts_on(llm, remote),
        pytest.raises(InvalidArgument, match=r"experts \[\d.*\] of layer 1 are not hosted on s0"),
    ):
        llm.score(PROMPTS[1])


def test_a_replica_takes_over_the_layer_of_a_lost_worker(pool, llm, local):
    (dead_port,) = free_ports(1)
    gone = PoolWorker("gone", f"127.0.0.1:{dead_port}", {1: tuple(range(8)), 2: tuple(range(8))})
    remote = pool.remote(llm, [gone, pool.shards["all"]])
    assert remote.table.counts[1].tolist() == [2] * 8
    with experts_on(llm, remote):
        logits = llm.score(PROMPTS[1])  # the first layer's batch to `gone` fails; `all` takes the layer over
    assert torch.equal(logits, local[0][1])
    assert sorted(remote.workers) == ["all"]


def test_a_lost_worker_fails_the_call_and_leaves_the_pool(pool, llm):
    (dead_port,) = free_ports(1)
    gone = PoolWorker("gone", f"127.0.0.1:{dead_port}", {1: tuple(range(8)), 2: tuple(range(8))})
    remote = pool.remote(llm, [gone], timeout_s=5.0, placement_wait_s=0.5)
    start = time.monotonic()
    with experts_on(llm, remote):
        with pytest.raises(Unavailable, match=r"gone"):
            llm.score(PROMPTS[0])
        assert remote.workers == {}  # forgotten: the next call waits for the pool, then says what is missing
        with pytest.raises(Unavailable, match=r"does not cover every routed expert after 0.5 s: missing 16"):
            llm.score(PROMPTS[0])
    assert time.monotonic() - start < 15


async def _serve_grpc(worker: ExpertWorker, ucx_address: str) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertPoolServicer_to_server(ExpertServicer(worker, ucx_address), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_rebalance_between_calls_moves_experts_and_the_logits_stay(pool, llm, local, tiny_dir):
    """Two expert workers with their gRPC service (DescribeExperts, GetLoad, SetExperts) and the gateway's
    Rebalancer over a Membership that lists them: the placement computed from GetLoad is applied (PREPARE,
    then COMMIT); the attention side's next batches are refused as routed by the old epoch, it describes the
    pool again and resends the layer — the logits stay the local ones bit for bit."""
    members, grpc_servers = [], []
    for name, spec in (("a", "0-3"), ("b", "4-7")):
        load = functools.partial(load_expert_shard, tiny_dir, device=pool.device, dtype=torch.bfloat16)
        worker = ExpertWorker(name, load(parse_expert_set(spec, 8)), pool.device, torch.bfloat16, None, load)
        pool.experts[name] = worker
        server = UcxExpertServer(worker.compute)
        pool.servers.append(server)
        ucx_address = pool.run(server.start())
        grpc_server, address = pool.run(_serve_grpc(worker, ucx_address))
        grpc_servers.append(grpc_server)
        members.append(WorkerInfo(name, "expert", address, ucx_address))
    a, b = pool.experts["a"], pool.experts["b"]
    try:
        membership = Membership()
        for member in members:
            membership.register(member)
        rebalancer = Rebalancer(membership, aio_channel)
        with pytest.raises(FailedPrecondition, match="counted no tokens yet"):
            pool.run(rebalancer.rebalance())
        remote = pool.remote(llm, [])
        remote.channel_factory = aio_channel
        pool.run(remote.sync(members))
        with experts_on(llm, remote):
            assert all(torch.equal(llm.score(ids), want) for ids, want in zip(PROMPTS, local[0], strict=True))
        with pytest.raises(ValueError, match=r"slots_per_worker=3 x 2 workers < 8 routed experts"):
            pool.run(rebalancer.rebalance(3))
        dry = pool.run(rebalancer.rebalance(5, dry_run=True))
        assert not dry.applied and (a.shard.expert_ids, b.shard.expert_ids) == ((0, 1, 2, 3), (4, 5, 6, 7))
        (dead_port,) = free_ports(1)  # a worker the registry lists but nobody answers for: named
        lost = Membership()
        for member in (members[0], WorkerInfo("gone", "expert", f"127.0.0.1:{dead_port}")):
            lost.register(member)
        with pytest.raises(Unavailable, match=r"^expert worker gone: "):
            pool.run(Rebalancer(lost, aio_channel).rebalance(5))

        def broken(ids):
            raise CheckpointError(f"{tiny_dir}: expert tensors missing")

        pre = (a.placement_epoch, b.placement_epoch)
        b.load_experts, load_b = broken, b.load_experts  # b cannot load: a, prepared already, rolls back
        with pytest.raises(InvalidArgument, match=r"^expert worker b: .*expert tensors missing"):
            pool.run(rebalancer.rebalance(5))
        b.load_experts = load_b
        assert (a.shard.expert_ids, b.shard.expert_ids) == ((0, 1, 2, 3), (4, 5, 6, 7))
        epochs = (a.placement_epoch, b.placement_epoch)
        assert epochs == (pre[0] + 1, pre[1])  # a loaded its new experts and dropped them again
        loads = [int(a.tokens[1][e] + a.tokens[2][e] + b.tokens[1][e] + b.tokens[2][e]) for e in range(8)]
        assert list(dry.expert_load) == loads and sum(loads) > 0
        report = pool.run(rebalancer.rebalance(5))  # 10 slots: the two hottest experts get a second replica
        assert report.applied and [w.expert_ids for w in report.after] == [w.expert_ids for w in dry.after]
        assert (a.shard.expert_ids, b.shard.expert_ids) == tuple(w.expert_ids for w in report.after)
        hottest = sorted(range(8), key=lambda e: (-loads[e], e))[:2]
        assert sorted(set(a.shard.expert_ids) & set(b.shard.expert_ids)) == sorted(hottest)
        assert report.balance_after <= report.balance_before
        assert a.placement_epoch == epochs[0] + 1 and b.placement_epoch == epochs[1] + 1
        moved = [
            set(new.expert_ids) - set(old.expert_ids)
            for old, new in zip(report.before, report.after, strict=True)
        ]
        assert report.experts_loaded == sum(map(len, moved)) >= 2  # at least the two new replicas
        with experts_on(llm, remote):  # routed by the old epochs: refused, described again, resent
            for ids, want in zip(PROMPTS, local[0], strict=True):
                assert torch.equal(llm.score(ids), want)
        assert {n: (w.placement_epoch, w.placements[1]) for n, w in remote.workers.items()} == {
            "a": (a.placement_epoch, a.shard.expert_ids),
            "b": (b.placement_epoch, b.shard.expert_ids),
        }
        # what the protocol never lets happen is still answered clearly: an old epoch, an unprepared commit
        stale = ExpertBatch(1, 1, expert_pb2.TOKEN_FORMAT_BF16, a.hidden_size,
                            token_encoder("bf16")(torch.zeros(1, a.hidden_size)), torch.tensor([[0, -1]], dtype=torch.int32),
                            torch.ones(1, 2), placement_epoch=epochs[0])  # fmt: skip
        with pytest.raises(StalePlacement, match=rf"routed by placement epoch {epochs[0]}; a is at epoch"):
            a.compute_sync(stale)
        missing = sorted(set(range(8)) - set(a.shard.expert_ids))[:1]
        with pytest.raises(FailedPrecondition, match=rf"experts {missing[0]} are not loaded on a: PREPARE"):
            pool.run(a.commit(missing))
        with pytest.raises(FailedPrecondition, match="no expert workers in the mesh"):
            pool.run(Rebalancer(Membership(), aio_channel).rebalance())
    finally:
        for server in grpc_servers:
            pool.run(server.stop(None))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prepare_and_commit_hold_what_a_fresh_load_gives(device, tiny_dir):
    """SetExperts' two phases on one worker: PREPARE hosts the union (same epoch), COMMIT the new set (next
    epoch); the weights are a fresh load's bit for bit, and so are the rows it computes."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    load = functools.partial(load_expert_shard, tiny_dir, device=device, dtype=torch.bfloat16)
    worker = ExpertWorker("w", load((0, 1, 2, 3)), torch.device(device), torch.bfloat16, None, load)
    fresh = ExpertWorker("f", load((2, 3, 6)), torch.device(device), torch.bfloat16)
    epoch = worker.placement_epoch

    async def apply():
        await worker.prepare((2, 3, 6))
        union = (worker.shard.expert_ids, worker.placement_epoch)
        await worker.commit((2, 3, 6))
        return union

    try:
        assert asyncio.run(apply()) == ((0, 1, 2, 3, 6), epoch)
        assert (worker.shard.expert_ids, worker.placement_epoch) == ((2, 3, 6), epoch + 1)
        for layer, experts in worker.shard.layers.items():
            assert torch.equal(experts.w13, fresh.shard.layers[layer].w13), layer
            assert torch.equal(experts.w2, fresh.shard.layers[layer].w2), layer
        hidden = torch.randn(6, worker.hidden_size, generator=torch.Generator().manual_seed(3)).to(
            torch.bfloat16
        )
        ids = torch.tensor([[2, 6], [3, -1], [6, 3], [-1, 2], [6, -1], [2, 3]], dtype=torch.int32)
        batch = ExpertBatch(1, 1, expert_pb2.TOKEN_FORMAT_BF16, worker.hidden_size, token_encoder("bf16")(hidden),
                            ids, torch.rand(6, 2, generator=torch.Generator().manual_seed(4)),
                            placement_epoch=worker.placement_epoch)  # fmt: skip
        assert torch.equal(
            worker.compute_sync(batch), fresh.compute_sync(dataclasses.replace(batch, placement_epoch=0))
        )
    finally:
        worker.close()
        fresh.close()


@pytest.mark.gpu
def test_on_cuda_greedy_with_remote_experts_equals_colocated(tiny_dir):
    """Attention and expert workers on one GPU (the wire staged through host memory over TCP): the colocated
    engine runs eagerly, as one with remote experts must (no CUDA graph spans the round trip), on each path of
    every block — the fused one (the CUDA default) and the torch one (`set_fused(model, False)`) — and the same
    engine with its experts in the pool on the same path gives its logits bit for bit and its greedy tokens.

    Without the prefix cache: the first H200 run of this test (79c2b4a) generated the remote run after the
    colocated one on the same engine, so the remote run hit the colocated run's cached prompt pages and
    prefilled only their tails, in other chunks — on CUDA the MLA prefill over a cached prefix (and the
    expansion of fewer rows) rounds differently in BF16 from one chunk over the whole prompt, and one prompt's
    near tie flipped. The colocated run repeated must give its own tokens again (so any difference is the
    experts')."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = EngineConfig(page_size=8, num_kv_pages=128, max_num_seqs=8, max_num_batched_tokens=48,
                          cuda_graph_batch_sizes=(), enable_prefix_caching=False)  # fmt: skip
    llm = LLM(tiny_dir, device="cuda", dtype="bfloat16", engine_config=config)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    pool = Pool(tiny_dir, "cuda")
    try:
        remote = pool.remote(llm, [pool.worker(f"g{i}", f"{i}/3") for i in range(3)])
        for fused in (None, False):  # the default (fused on CUDA), then every block's torch path
            set_fused(llm.model, fused)
            want_logits = [llm.score(ids) for ids in PROMPTS]
            want = [c.token_ids for c in llm.generate(PROMPTS, params)]
            assert [c.token_ids for c in llm.generate(PROMPTS, params)] == want, fused  # repeatable
            with experts_on(llm, remote):
                logits = [llm.score(ids) for ids in PROMPTS]
                got = [c.token_ids for c in llm.generate(PROMPTS, params)]
            for i, (mine, ref) in enumerate(zip(logits, want_logits, strict=True)):
                assert torch.equal(mine, ref), (
                    f"fused={fused} prompt {i}: max diff {(mine - ref).abs().max()}"
                )
            assert got == want, fused
    finally:
        set_fused(llm.model, None)
        pool.close()
    assert llm.engine.stats()["prefix_hit_tokens"] == 0


def test_grpc_fallback_and_describe_answer_like_the_wire(pool):
    """`Dispatch` (payloads inline) gives the rows the UCX path gives; `DescribeExperts` lists the shard."""
    worker = pool.experts["s1"]
    servicer = ExpertServicer(worker, "127.0.0.1:1")
    described = pool.run(servicer.DescribeExperts(expert_pb2.DescribeExpertsRequest(), None))
    assert [(p.layer, list(p.expert_ids)) for p in described.placements] == [(1, [2, 3, 4]), (2, [2, 3, 4])]
    assert (described.num_routed_experts, described.ucx_address) == (8, "127.0.0.1:1")
    hidden = torch.randn(5, worker.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids = torch.tensor([[2, -1], [3, 4], [-1, 4], [2, 3], [-1, 2]], dtype=torch.int32)
    batch = ExpertBatch(7, 1, expert_pb2.TOKEN_FORMAT_BF16, worker.hidden_size, token_encoder("bf16")(hidden), ids,
                        torch.rand(5, 2, generator=torch.Generator().manual_seed(2)))  # fmt: skip
    parts = [
        batch.tokens,
        batch.expert_ids.view(torch.uint8).flatten(),
        batch.weights.view(torch.uint8).flatten(),
    ]
    request = expert_pb2.ExpertBatch(header=batch.header(), payloads=[p.numpy().tobytes() for p in parts])
    reply = pool.run(servicer.Dispatch(request, None))
    header = reply.header
    assert (header.micro_batch_id, header.layer, header.payloads[0].num_bytes) == (
        7,
        1,
        7 * 2 * worker.hidden_size,
    )
    rows = torch.frombuffer(bytearray(reply.payloads[0]), dtype=torch.bfloat16).view(7, worker.hidden_size)
    assert torch.equal(rows, worker.compute_sync(batch))
