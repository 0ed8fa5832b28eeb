"""KV leaves P while its forward runs, on CUDA: a prefill worker and a decode engine in one process on the GPU
(the in-process KV fabric), 8 layers, P's forward made device-bound as a real model's is (`device_bound`).
Single-step 512-token prompts have their first chunk out before their forward ended (the packing after the
step this replaced never could), a chunk per layer group, and every (layer, page) D received equals P's cache
bit for bit — alone and for ragged prompts prefilled together; prompts prefilled alone decode exactly the
tokens of in-process `LLM.generate`. (Prompts batched together are not compared by tokens: on the H200 one
of five diverged from the oracle's batch of nine at its 7th token — decode batches of 5 and 9 split MLA's
context differently, so fp32 sums differ in order and a random model's near tie flips; the KV check is the
export's own contract and does not depend on batch shapes.)"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from moemesh.config.mesh import WorkerConfig
from moemesh.engine.kv_export import ExportRow, KvExporter
from moemesh.kernels import pack_kv
from moemesh.make_checkpoint import shape_config, write_random_checkpoint
from moemesh.services.decode.leases import LeaseTable
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.model_loading import load_engine
from moemesh.services.prefill.worker import PrefillWorker
from moemesh.transport.kv_loopback import LoopbackFabric

pytestmark = pytest.mark.gpu
NUM_LAYERS = 8
ENGINE = EngineConfig(page_size=16, num_kv_pages=1024, max_num_batched_tokens=4096, max_model_len=2048)
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
DTYPE = "float32"  # exact greedy equality (see test_mesh_gpu.py)
SLEEP_CYCLES = 4_000_000  # ~2 ms of device time per layer at H200 clocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return write_random_checkpoint(shape_config("tiny", NUM_LAYERS), tmp_path_factory.mktemp("gpu-export"),
                                   seed=7, device="cuda", log=lambda *_: None)  # fmt: skip


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 4096) for _ in range(n)] for n in lengths]


def device_bound(model, cycles: int = SLEEP_CYCLES) -> None:
    """The tiny model's forward is host-bound (its launches take longer than its kernels); a real model's on an
    H200 is device-bound: the host launches it all, then waits for the device while the event loop sends the
    chunks. A device-side sleep after each layer's attention (in its MLP) makes the tiny one behave so; the
    math is unchanged."""
    for layer in model.model.layers:
        forward = layer.mlp.forward

        def slow(*args, forward=forward, **kwargs):
            torch.cuda._sleep(cycles)
            return forward(*args, **kwargs)

        layer.mlp.forward = slow


def test_kv_leaves_during_the_forward_and_d_decodes_what_llm_generate_does(model_dir):
    alone = prompts(1, [512] * 4)
    together = prompts(2, [40, 300, 512, 97, 700])
    llm = LLM(model_dir, device="cuda", dtype=DTYPE, engine_config=ENGINE)
    want = [
        list(o.token_ids) for o in llm.generate(alone + together, [GREEDY] * (len(alone) + len(together)))
    ]
    del llm
    torch.cuda.empty_cache()

    def load(role):
        return load_engine(WorkerConfig(role=role, worker_id=f"{role}-g", model=str(model_dir), dtype=DTYPE,
                                        device="cuda", engine=ENGINE))  # fmt: skip

    p_loaded, d_loaded = load("prefill"), load("decode")
    device_bound(p_loaded.engine.model)
    sent: dict[
        str, list[torch.Tensor]
    ] = {}  # request -> P's pages of every layer as P held them at the handoff
    release = p_loaded.engine.release_handoff

    def snapshot_then_release(request_id: str) -> None:
        ids = torch.tensor(list(p_loaded.engine._handoffs[request_id]), device="cuda")
        sent[request_id] = [cache[ids].clone() for cache in p_loaded.engine.kv_caches]
        release(request_id)

    p_loaded.engine.release_handoff = snapshot_then_release
    received: dict[str, list[torch.Tensor]] = {}

    async def body():
        fabric = LoopbackFabric()
        receiver = fabric.receiver()
        await receiver.start()
        d_loop, p_loop = (
            EngineLoop(d_loaded.engine),
            EngineLoop(p_loaded.engine, exclusive=False),
        )  # as main.py
        leases = LeaseTable(d_loop, receiver, d_loaded.kv_layout, ttl_s=60.0)
        p_worker = PrefillWorker("prefill-g", p_loop, fabric.sender())
        p_worker.warm_up()
        async with asyncio.TaskGroup() as group:
            runners = [group.create_task(d_loop.run()), group.create_task(p_loop.run())]

            async def one(i: int, prompt: list[int]):
                rid = f"r{i}"
                reservation = await d_loop.call(d_loaded.engine.reserve_kv, rid, prompt)
                lease = leases.open(reservation)
                outcome = await p_worker.prefill(prompt, GREEDY, lease.target)
                await receiver.inbox.wait_complete(lease.key, timeout_s=30)
                ids = torch.tensor(lease.target.page_ids, device="cuda")
                received[rid] = [cache[ids].clone() for cache in d_loaded.engine.kv_caches]
                queue = d_loop.subscribe(rid)
                await lease.adopt(lambda: d_loaded.engine.add_prefilled(reservation, prompt,
                                                                        outcome.first_token_id, GREEDY))  # fmt: skip
                while not (out := await queue.get()).finished:
                    pass
                d_loop.unsubscribe(rid)
                return outcome, list(out.output_ids)

            try:
                first = [await one(i, p) for i, p in enumerate(alone)]  # one at a time: one step each
                rest = await asyncio.gather(*(one(len(alone) + i, p) for i, p in enumerate(together)))
            finally:
                for runner in runners:
                    runner.cancel()
        await receiver.close()
        return first, list(rest)

    first, rest = asyncio.run(asyncio.wait_for(body(), 240))
    for rid, pages in received.items():  # every layer, every page of the prompt (D holds no prefix of them)
        assert len(pages) == NUM_LAYERS and all(
            torch.equal(d, p) for d, p in zip(pages, sent[rid], strict=True)
        ), rid
    assert len(received) == len(alone) + len(together)
    assert [tokens for _, tokens in first] == want[: len(alone)]
    outcomes = [outcome for outcome, _ in first]
    groups = p_loaded.engine.runner.kv_export.groups
    assert groups[-1] == range(NUM_LAYERS - 1, NUM_LAYERS)  # the last layer alone: the tail's chunk is small
    assert all(o.num_kv_chunks == len(groups) for o in outcomes), [o.num_kv_chunks for o in outcomes]
    # each single-step prompt's first chunk left before its forward's end (with the packs after the step, as
    # before this change, it never could), and the tail is short: the last chunk is in flight before the end
    early = [(o.forward_done_unix_ns - o.kv_first_send_unix_ns) / 1e6 for o in outcomes]
    tails = [o.kv_transfer_ms for o in outcomes]
    print("first chunk sent before the forward's end by (ms):", early, "tails (ms):", tails)
    assert min(early) > 0, early
    assert max(tails) < 5.0, tails  # the last chunk is packed during the last layer's ~2 ms MLP
    stats = p_loaded.engine.stats()
    assert stats["pages_leased"] == 0 and not p_loaded.engine.runner.kv_export._next


def test_the_exporter_packs_behind_each_write_and_before_the_next_forward_without_a_host_sync():
    """The stream ordering itself, on CUDA: a slow "forward" (a device sleep, then a layer's pages written) —
    each group's pack waits for its write (without `wait_event` it would copy zeros), nothing in the export
    path syncs the host (sync debug mode "error"), and a forward after `order_before_forward` that rewrites
    the pages cannot overtake the packs that read them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    page_ids = (5, 9, 2)
    caches = [torch.zeros(16, 16, 8, device="cuda") for _ in range(4)]
    published = []
    exporter = KvExporter(caches, 16, published.extend, max_chunk_bytes=1 << 20, max_groups=3)
    exporter.track("r", 0)
    pack_kv(caches, torch.zeros(1, dtype=torch.long, device="cuda"))  # compiled before the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step = exporter.begin([ExportRow("r", page_ids, 0, 40, 40)])
        assert step is not None
        for i, cache in enumerate(caches):
            torch.cuda._sleep(SLEEP_CYCLES)  # a pack that did not wait would read the zeros
            for page in page_ids:
                cache[page].fill_(float(i + 1))
            step.layer_written(i)
        step.finish()
        exporter.order_before_forward()
        torch.cuda._sleep(SLEEP_CYCLES)
        for cache in caches:  # the next forward reuses the pages
            cache.fill_(-1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [(c.layer, c.num_layers, c.first_page) for c in published] == [(0, 2, 0), (2, 1, 0), (3, 1, 0)]
    for chunk in published:
        chunk.ready.synchronize()
        want = torch.arange(chunk.layer + 1, chunk.layer + chunk.num_layers + 1, dtype=torch.float32)
        assert chunk.pages.shape == (chunk.num_layers, 3, 16, 8)
        assert torch.equal(chunk.pages.amin(dim=(1, 2, 3)).cpu(), want)
        assert torch.equal(chunk.pages.amax(dim=(1, 2, 3)).cpu(), want)
    assert not exporter.is_tracked("r")
