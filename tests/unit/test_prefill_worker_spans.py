"""The prefill worker on the demo engine with a recording sender (no D, no UCX): its prefill span ends at the
forward's end — packing and sending are the KV transfer's part — and `warm_up` packs every layer's page 0 as
a request's pages are packed (the pack kernel compiled before the first request, issue 10's first GPU run)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from moemesh import LLM
from moemesh.config.engine import EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels.paged_kv import pack_kv_reference
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.prefill.worker import PrefillWorker
from moemesh.transport.kv import KvLayout, KvTarget, LeaseKey

PACK_DELAY_S = 0.3


class RecordingSender:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, int, int, torch.Tensor]] = []

    async def connect(self, address: str) -> None:
        pass

    async def send(self, target, layer, first_page, pages, num_layers=1) -> int:
        self.chunks.append((layer, first_page, num_layers, pages.clone()))
        return pages.numel() * pages.element_size()


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(page_size=8, num_kv_pages=64, max_num_batched_tokens=64, max_model_len=256)
    return LLM("demo", device="cpu", engine_config=config).engine


def test_warm_up_packs_page_zero_of_every_layer(engine):
    worker = PrefillWorker("p0", EngineLoop(engine), RecordingSender())
    engine.kv_caches[0][0].fill_(0.5)
    engine.kv_caches[-1][0].fill_(-2.0)
    packed = worker.warm_up()
    assert packed.shape == (len(engine.kv_caches), 1, *engine.kv_caches[0].shape[1:])
    assert torch.equal(packed, pack_kv_reference(engine.kv_caches, torch.tensor([0])))
    assert packed[0].unique().tolist() == [0.5] and packed[-1].unique().tolist() == [-2.0]


def test_prefill_span_ends_at_the_forward_and_packing_counts_as_transfer(engine, monkeypatch):
    """A pack that takes PACK_DELAY_S lands in kv_transfer_ms, not in prefill_ms."""
    sender = RecordingSender()
    loop = EngineLoop(engine)
    worker = PrefillWorker("p0", loop, sender)
    pack = worker._pack

    def slow_pack(job, page_ids, end):
        time.sleep(PACK_DELAY_S)
        return pack(job, page_ids, end)

    monkeypatch.setattr(worker, "_pack", slow_pack)
    prompt = list(range(5, 5 + 150))  # 19 pages of 8, three steps of 64 tokens
    num_pages = -(-len(prompt) // 8)
    layout = KvLayout("fp32", 8, engine.kv_caches[0].shape[2] * 4, len(engine.kv_caches))
    target = KvTarget("r1", LeaseKey(1, 1), "loopback", tuple(range(100, 100 + num_pages)), 0, layout)

    async def body():
        async with asyncio.TaskGroup() as group:
            runner = group.create_task(loop.run())
            outcome = await worker.prefill(prompt, SamplingParams(max_tokens=1), target)
            runner.cancel()
        return outcome

    outcome = asyncio.run(body())
    assert outcome.num_prompt_tokens == 150
    # three steps of 64, 64 and 22 tokens, a pack after each: the last one came after the forward's end (the
    # transfer's part); the two before held the engine between steps (the prefill's part)
    assert outcome.kv_transfer_ms >= 1000 * PACK_DELAY_S
    assert outcome.prefill_ms >= 2000 * PACK_DELAY_S
    sent_pages = sorted({(first, chunk.shape[1]) for _, first, _, chunk in sender.chunks})
    assert sum(n for _, n in sent_pages) == num_pages
    assert outcome.kv_bytes_sent == sum(c.numel() * c.element_size() for *_, c in sender.chunks)
