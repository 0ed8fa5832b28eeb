"""The prefill worker on the demo engine (4 layers) with a recording sender (no D, no UCX): KV leaves while the
forward runs — each layer group's pages are packed right after that group's attention wrote them, before the
next layer runs, and sent at once — the chunks' bytes are the cache's, the prefill span ends at the forward's
end and the transfer's tail is what is left after it; a step failing mid-forward fails the transfer and
leaks no page. `warm_up` packs every layer's page 0 (the pack kernel compiled before the first request)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from moemesh import LLM
from moemesh.config.engine import EngineConfig
from moemesh.engine.kv_export import layer_groups
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels.paged_kv import pack_kv_reference
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.prefill.worker import PrefillWorker
from moemesh.transport.errors import LeaseRefused
from moemesh.transport.kv import KvLayout, KvTarget, LeaseKey
from moemesh.transport.kv_wire import RefusalReason

PAGE = 8
SEND_DELAY_S = 0.2


class RecordingSender:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.chunks: list[tuple[int, int, int, torch.Tensor]] = []
        self.by_request: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}
        self.delay_s = delay_s
        self.acked_ns: list[int] = []

    async def connect(self, address: str) -> None:
        pass

    async def send(self, target, layer, first_page, pages, num_layers=1) -> int:
        self.chunks.append((layer, first_page, num_layers, pages.clone()))
        self.by_request.setdefault(target.request_id, []).append(self.chunks[-1])
        await asyncio.sleep(self.delay_s)
        self.acked_ns.append(time.time_ns())
        return pages.numel() * pages.element_size()


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(page_size=PAGE, num_kv_pages=64, max_num_batched_tokens=64, max_model_len=256)
    return LLM("demo", device="cpu", engine_config=config).engine


def _target(engine, rid: str, num_tokens: int, skip_tokens: int = 0) -> KvTarget:
    layout = KvLayout("fp32", PAGE, engine.kv_caches[0].shape[2] * 4, len(engine.kv_caches))
    num_pages = -(-num_tokens // PAGE)
    return KvTarget(rid, LeaseKey(1, 1), "loopback", tuple(range(100, 100 + num_pages)), skip_tokens, layout)


class Recorder:
    """The order of layer ends (a forward hook on each decoder layer), chunk publications and sends, and the
    cache's content of each finished request's pages when they are released."""

    def __init__(self, engine, worker: PrefillWorker) -> None:
        self.log: list[tuple] = []
        self.released: dict[str, torch.Tensor] = {}
        self.handles = [
            layer.register_forward_hook(lambda *_, i=i: self.log.append(("layer", i)))
            for i, layer in enumerate(engine.model.model.layers)
        ]
        publish = worker.exporter.publish

        def published(chunks):
            for c in chunks:
                self.log.append(("packed", c.layer, c.num_layers, c.first_page, c.pages.shape[1]))
            publish(chunks)

        worker.exporter.publish = published
        release = engine.release_handoff

        def release_handoff(rid):
            ids = torch.tensor(engine._handoffs[rid])
            self.released[rid] = pack_kv_reference(engine.kv_caches, ids)
            release(rid)

        self.engine, self.release = engine, release
        engine.release_handoff = release_handoff

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.engine.release_handoff = self.release


def _prefill_all(worker, loop, work: list[tuple[list[int], KvTarget]]) -> list:
    """Prefills every (prompt, target) at once (one engine turn); their outcomes or exceptions."""

    async def body():
        async with asyncio.TaskGroup() as group:
            runner = group.create_task(loop.run())
            await loop.must_run(lambda: None)  # the engine thread is up: the requests land in one turn
            try:
                return await asyncio.gather(
                    *(
                        worker.prefill(prompt, SamplingParams(max_tokens=1), target)
                        for prompt, target in work
                    ),
                    return_exceptions=True,
                )
            finally:
                runner.cancel()

    return asyncio.run(body())


def _prefill(engine, worker, loop, prompt, target):
    [result] = _prefill_all(worker, loop, [(prompt, target)])
    if isinstance(result, Exception):
        raise result
    return result


def _assert_sent_once_as_in_cache(
    chunks, cache: torch.Tensor, num_pages: int, first_page: int = 0, atol: float = 0.0
) -> None:
    """Every (layer, page) from first_page on sent exactly once, with the cache's bytes (within atol)."""
    cells = [(layer + j, first + k) for layer, first, n, pages in chunks
             for j in range(n) for k in range(pages.shape[1])]  # fmt: skip
    assert sorted(cells) == [
        (layer, p) for layer in range(cache.shape[0]) for p in range(first_page, num_pages)
    ]
    for layer, first, n, pages in chunks:
        want = cache[layer : layer + n, first : first + pages.shape[1]]
        assert torch.equal(pages, want) if atol == 0 else torch.allclose(pages, want, rtol=0, atol=atol)


def test_warm_up_packs_page_zero_of_every_layer(engine):
    worker = PrefillWorker("p0", EngineLoop(engine), RecordingSender())
    engine.kv_caches[0][0].fill_(0.5)
    engine.kv_caches[-1][0].fill_(-2.0)
    packed = worker.warm_up()
    assert packed.shape == (len(engine.kv_caches), 1, *engine.kv_caches[0].shape[1:])
    assert torch.equal(packed, pack_kv_reference(engine.kv_caches, torch.tensor([0])))
    assert packed[0].unique().tolist() == [0.5] and packed[-1].unique().tolist() == [-2.0]


def test_layer_groups_end_with_the_last_layer_alone():
    assert layer_groups(4) == (range(0, 1), range(1, 2), range(2, 3), range(3, 4))
    assert layer_groups(4, 3) == (range(0, 2), range(2, 3), range(3, 4))
    assert layer_groups(27, 8) == (range(0, 4), range(4, 7), range(7, 11), range(11, 15), range(15, 19),
                                   range(19, 22), range(22, 26), range(26, 27))  # fmt: skip
    assert layer_groups(5, 1) == (range(0, 5),) and layer_groups(1) == (range(0, 1),)
    with pytest.raises(ValueError, match="max_groups=0"):
        layer_groups(4, 0)


@pytest.mark.parametrize(
    ("num_tokens", "skip_tokens", "max_groups", "steps"),
    [
        (150, 0, 8, [(0, 8), (8, 16), (16, 19)]),  # three steps of 64, 64 and 22 tokens: full pages, then all
        (40, 16, 3, [(2, 5)]),  # one step; D has the first two pages, they are not sent
    ],
)
def test_each_layer_groups_pages_are_packed_before_the_next_layer_runs(
    engine, num_tokens, skip_tokens, max_groups, steps
):
    sender = RecordingSender()
    loop = EngineLoop(engine)
    worker = PrefillWorker("p0", loop, sender, max_layer_groups=max_groups)
    groups = worker.exporter.groups
    rec = Recorder(engine, worker)
    prompt = [(7 * i + num_tokens) % 250 + 3 for i in range(num_tokens)]
    try:
        outcome = _prefill(engine, worker, loop, prompt, _target(engine, f"sched-{num_tokens}", num_tokens,
                                                                 skip_tokens))  # fmt: skip
    finally:
        rec.close()
    # per step: group g's pages packed after the layer before it ended and before its own last layer ended
    # (right after its attention), i.e. while the forward runs
    expected = []
    for first, end in steps:
        for g in groups:
            expected += [("layer", i) for i in g[:-1]]
            expected += [("packed", g.start, len(g), first, end - first), ("layer", g[-1])]
    assert [e for e in rec.log if e[0] in ("layer", "packed")] == expected
    # every (layer, page) sent once, the bytes the cache's at the forward's end
    cache = rec.released[f"sched-{num_tokens}"]
    _assert_sent_once_as_in_cache(sender.chunks, cache, -(-num_tokens // PAGE), skip_tokens // PAGE)
    assert outcome.num_kv_chunks == len(steps) * len(groups) == len(sender.chunks)
    assert outcome.kv_bytes_sent == sum(c.numel() * c.element_size() for *_, c in sender.chunks)
    assert not worker.exporter.is_tracked(f"sched-{num_tokens}")
    assert engine.stats()["pages_leased"] == 0


def test_chunks_leave_before_the_forward_ends_and_the_tail_is_what_follows_it(engine):
    sender = RecordingSender(delay_s=SEND_DELAY_S)
    loop = EngineLoop(engine)
    worker = PrefillWorker("p0", loop, sender)
    prompt = list(range(5, 5 + 150))  # three steps of 64, 64 and 22 tokens
    outcome = _prefill(engine, worker, loop, prompt, _target(engine, "tail", len(prompt)))
    assert outcome.num_prompt_tokens == 150 and outcome.prefill_ms > 0
    assert 0 < outcome.kv_first_send_unix_ns < outcome.forward_done_unix_ns
    # the tail: from the forward's end to the last acknowledgement (the last chunk's SEND_DELAY_S at most)
    tail_ms = (max(sender.acked_ns) - outcome.forward_done_unix_ns) / 1e6
    assert outcome.kv_transfer_ms == pytest.approx(tail_ms, abs=50)
    assert 0 < outcome.kv_transfer_ms <= 1000 * SEND_DELAY_S + 50


def test_a_step_failing_mid_forward_stops_the_transfer_and_leaks_no_page(engine):
    sender = RecordingSender()
    loop = EngineLoop(engine)
    worker = PrefillWorker("p0", loop, sender)
    mlp = engine.model.model.layers[2].mlp
    forward = mlp.forward

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in layer 2")

    mlp.forward = broken
    prompt = [(3 * i) % 200 + 11 for i in range(40)]
    try:
        with pytest.raises(RuntimeError, match="injected failure in layer 2"):
            _prefill(engine, worker, loop, prompt, _target(engine, "broken", len(prompt)))
    finally:
        mlp.forward = forward
    # layers 0..2 were packed (layer 2's attention ran) and may have gone; layer 3 never was
    assert {layer for layer, *_ in sender.chunks} <= {0, 1, 2}
    assert not worker.exporter.is_tracked("broken")
    stats = engine.stats()
    assert stats["pages_leased"] == 0 and stats["num_running"] == stats["num_waiting"] == 0


def test_a_batch_failing_mid_forward_is_rerun_alone_and_each_page_still_goes_once(engine):
    """The forward of a batch of two raises in layer 2's MLP (after groups 0-2 were packed); the engine re-runs
    each request alone and the exporter packs what the failed forward did not reach: both transfers complete,
    each (layer, page) sent once with the bytes of the cache."""
    sender = RecordingSender()
    loop = EngineLoop(engine)
    worker = PrefillWorker("p0", loop, sender)
    rec = Recorder(engine, worker)
    mlp = engine.model.model.layers[2].mlp
    forward, calls = mlp.forward, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure in layer 2, once")
        return forward(*args, **kwargs)

    mlp.forward = fails_once
    prompts = {
        "iso-a": [(5 * i) % 190 + 9 for i in range(30)],
        "iso-b": [(11 * i) % 170 + 4 for i in range(21)],
    }
    try:
        outcomes = _prefill_all(
            worker, loop, [(p, _target(engine, rid, len(p))) for rid, p in prompts.items()]
        )
    finally:
        mlp.forward = forward
        rec.close()
    assert len(calls) >= 3  # the batch, then each request alone
    for (rid, prompt), outcome in zip(prompts.items(), outcomes, strict=True):
        assert not isinstance(outcome, Exception), outcome
        num_pages = -(-len(prompt) // PAGE)
        # layers 0-2 came from the batched forward, the cache holds the re-run's: equal up to fp32 rounding
        _assert_sent_once_as_in_cache(sender.by_request[rid], rec.released[rid], num_pages, atol=1e-5)
        assert not worker.exporter.is_tracked(rid)
    # groups 0-2 of both went in the failed forward, layer 3 in each re-run: four chunks per request
    assert (
        sorted((layer, n) for layer, _, n, _ in sender.chunks)
        == [(0, 1)] * 2 + [(1, 1)] * 2 + [(2, 1)] * 2 + [(3, 1)] * 2
    )
    assert engine.stats()["pages_leased"] == 0


def test_a_prompt_tail_on_the_decode_path_is_packed_after_that_forward(engine):
    """The same prompt again: P's prefix cache holds its 5 full pages, so its forward computes one token — on
    the decode path, which has no per-layer signal: every group is packed after that forward, all 6 pages
    (D has none of them), with the cache's bytes."""
    prompt = [(13 * i) % 230 + 7 for i in range(41)]  # 5 full pages of 8 and one token
    sender = RecordingSender()
    loop = EngineLoop(engine)
    worker = PrefillWorker("p0", loop, sender)
    _prefill(engine, worker, loop, prompt, _target(engine, "tail-1", len(prompt)))
    sender.chunks.clear()
    rec = Recorder(engine, worker)
    try:
        outcome = _prefill(engine, worker, loop, prompt, _target(engine, "tail-2", len(prompt)))
    finally:
        rec.close()
    assert outcome.num_cached_tokens == 40
    expected = [("layer", i) for i in range(4)] + [("packed", g, 1, 0, 6) for g in range(4)]
    assert [e for e in rec.log if e[0] in ("layer", "packed")] == expected
    _assert_sent_once_as_in_cache(sender.chunks, rec.released["tail-2"], 6)


class RefusingSender(RecordingSender):
    """Refuses the `refuse_at`-th chunk (as D refuses a write to a closed lease)."""

    def __init__(self, refuse_at: int) -> None:
        super().__init__()
        self.refuse_at = refuse_at

    async def send(self, target, layer, first_page, pages, num_layers=1) -> int:
        if len(self.chunks) + 1 == self.refuse_at:
            self.chunks.append((layer, first_page, num_layers, pages.clone()))
            raise LeaseRefused("lease 1/g1 was released", RefusalReason.RELEASED)
        return await super().send(target, layer, first_page, pages, num_layers)


def test_an_abort_or_a_refusal_mid_prompt_stops_the_sends_and_returns_every_page(engine):
    """A prompt over three steps: D aborts once the first chunk went out, or refuses the second chunk. prefill()
    raises LeaseRefused, nothing is sent after abort() returned, the exporter forgot the request, no page leaks."""
    prompt = [(17 * i) % 210 + 5 for i in range(150)]
    target = _target(engine, "abort-mid", len(prompt))
    sender = RecordingSender(delay_s=0.05)
    loop = EngineLoop(engine)
    worker = PrefillWorker("p0", loop, sender)

    async def body():
        async with asyncio.TaskGroup() as group:
            runner = group.create_task(loop.run())
            prefill = asyncio.ensure_future(worker.prefill(prompt, SamplingParams(max_tokens=1), target))
            while not sender.chunks:
                await asyncio.sleep(0.001)
            assert await worker.abort("abort-mid", target.lease)
            sent_at_abort = len(sender.chunks)
            with pytest.raises(LeaseRefused, match="aborted by the decode worker"):
                await prefill
            await asyncio.sleep(0.2)
            runner.cancel()
        return sent_at_abort

    sent_at_abort = asyncio.run(body())
    assert len(sender.chunks) == sent_at_abort < 3 * 4
    assert not worker.exporter.is_tracked("abort-mid")
    assert engine.stats()["pages_leased"] == 0 and not engine.has_unfinished()

    refusing = RefusingSender(refuse_at=2)
    worker = PrefillWorker("p0", loop, refusing)
    with pytest.raises(LeaseRefused, match="was released"):
        _prefill(engine, worker, loop, prompt, _target(engine, "refused-mid", len(prompt)))
    assert len(refusing.chunks) < 3 * 4  # the refusal stopped the sends: not every chunk of the 3 steps went
    assert not worker.exporter.is_tracked("refused-mid")
    assert engine.stats()["pages_leased"] == 0 and not engine.has_unfinished()
