"""The decode service's own parts on a real tiny engine (in one process, the in-process KV fabric): every way a
request can end — a cancel behind a step, an admission that raises, a deadline shorter than a step — returns
its pages. Each scenario ends asserting the pool has every page back (nothing leased)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from moemesh._proto.v1 import common_pb2, worker_pb2
from moemesh.config.engine import EngineConfig
from moemesh.config.mesh import WorkerConfig
from moemesh.engine.engine import StepFailed
from moemesh.engine.sampling_params import SamplingParams
from moemesh.services.decode.leases import LeaseTable
from moemesh.services.decode.outbox import Outbox
from moemesh.services.decode.servicer import DecodeServicer
from moemesh.services.decode.worker import DecodeJob, DecodeWorker
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.model_loading import LoadedModel, load_engine
from moemesh.transport.kv_loopback import LoopbackFabric
from moemesh.transport.peers import WorkerInfo
from tests.model.tiny import build_hf, save_hf

PROMPT = list(range(1, 20))  # 19 tokens: 3 pages of 8. The lease tests adopt it without writing its KV, so
# D's prefix cache may keep zeros under it: tests that check tokens use other prompts.
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf(build_hf("v3", seed=11), tmp_path_factory.mktemp("tiny-decode-internals"))


def _load(tiny_dir, role: str) -> LoadedModel:
    config = WorkerConfig(role=role, worker_id=f"{role}-t", model=str(tiny_dir), dtype="float32",
                          engine=EngineConfig(page_size=8, num_kv_pages=64))  # fmt: skip
    return load_engine(config)


@pytest.fixture(scope="module")
def loaded(tiny_dir) -> LoadedModel:
    return _load(tiny_dir, "decode")


def assert_every_page_back(loaded: LoadedModel) -> None:
    stats = loaded.engine.stats()
    assert stats["pages_leased"] == 0, stats
    assert stats["pages_free"] + stats["pages_cached"] == stats["pages_total"]
    assert not loaded.engine.has_unfinished()


class _Parts:
    """An EngineLoop running over the module's engine, a lease table over an in-process KV receiver."""

    def __init__(self, loaded: LoadedModel, fabric: LoopbackFabric | None = None) -> None:
        self.engine = loaded.engine
        self.loop = EngineLoop(loaded.engine)
        self.receiver = (fabric or LoopbackFabric()).receiver()
        self.leases = LeaseTable(self.loop, self.receiver, loaded.kv_layout, ttl_s=30.0)
        self._runner: asyncio.Task | None = None

    async def __aenter__(self) -> _Parts:
        await self.receiver.start()
        self._runner = asyncio.ensure_future(self.loop.run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._runner is not None
        self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)

    async def hold_engine_thread(self) -> threading.Event:
        """Keeps the engine thread busy (as a long step would) until the returned event is set."""
        busy, release = threading.Event(), threading.Event()

        def block() -> None:
            busy.set()
            release.wait(10)

        self._held = asyncio.ensure_future(self.loop.call(block))
        await asyncio.to_thread(busy.wait, 10)
        return release


def test_adopt_whose_add_raises_returns_the_pages(loaded):
    """Before: `ended` was set before `add` ran, so close() after a failed add returned early (3 pages lost)."""

    async def body():
        async with _Parts(loaded) as parts:
            reservation = await parts.loop.call(parts.engine.reserve_kv, "bad-add", PROMPT)
            lease = parts.leases.open(reservation)
            wrong = PROMPT[:-1]  # add_prefilled refuses a prompt that is not the reservation's

            with pytest.raises(ValueError, match="prompt has 18 tokens, the reservation 19"):
                await lease.adopt(lambda: parts.engine.add_prefilled(reservation, wrong, 5, GREEDY))
            await lease.close()
            assert lease.ended and not lease.adopted
        assert_every_page_back(loaded)

    asyncio.run(asyncio.wait_for(body(), 30))


def test_adopt_cancelled_while_waiting_behind_a_step_returns_the_pages(loaded):
    """Before: the cancelled add was dropped from the engine's queue, the lease counted as ended, and close()
    returned early: the pages stayed reserved forever."""

    async def body():
        async with _Parts(loaded) as parts:
            reservation = await parts.loop.call(parts.engine.reserve_kv, "cancel-adopt", PROMPT)
            lease = parts.leases.open(reservation)
            release = await parts.hold_engine_thread()
            adopt = asyncio.ensure_future(
                lease.adopt(lambda: parts.engine.add_prefilled(reservation, PROMPT, 5, GREEDY))
            )
            await asyncio.sleep(0.05)  # add is queued behind the held thread
            adopt.cancel()
            await asyncio.sleep(0.05)
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await adopt
            await lease.close()  # what the decode worker does on any failure
            if lease.adopted:  # add ran: the engine owns the pages, and the request's abort returns them
                await parts.loop.must_run(parts.engine.abort, "cancel-adopt")
        assert_every_page_back(loaded)

    asyncio.run(asyncio.wait_for(body(), 30))


def _decode_request(rid: str, prompt: list[int], timeout_s: float) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, timeout_s=timeout_s,
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0),
        prefill=worker_pb2.PrefillPeer(worker_id="prefill-0", grpc_address="127.0.0.1:1"),
    )  # fmt: skip


@pytest.mark.parametrize("timeout_s", [0.001, 0.004])
def test_short_deadlines_on_the_short_prompt_path_return_every_page(loaded, timeout_s):
    """The issue's run: 50 requests with a 6-token prompt and timeout_s=0.001 left 9 pages reserved for good
    (reserve, then a deadline between the reservation and its release). Each ends with a deadline error."""
    config = WorkerConfig(role="decode", worker_id="decode-t", model="unused", local_prefill_tokens=16)

    async def body() -> list[worker_pb2.SessionEvent]:
        async with _Parts(loaded) as parts:
            worker = DecodeWorker(config, parts.loop, parts.leases, peers=None)
            servicer = DecodeServicer(worker, parts.engine.max_model_len)
            outbox = Outbox()
            async with asyncio.TaskGroup() as group:
                for i in range(50):
                    request = _decode_request(f"r{i}", [3 + i % 7] * 6, timeout_s)
                    group.create_task(servicer._serve(request, outbox))
            await parts.loop.must_run(lambda: None)  # every cleanup queued so far ran
            outbox.end()
            return await outbox.take() or []

    events = asyncio.run(asyncio.wait_for(body(), 60))
    errors = {e.request_id: e.status_message for e in events if e.status_code}
    assert errors, "no request ran past its deadline: the scenario did not happen"
    assert all("ran past its" in m for m in errors.values()), errors
    assert_every_page_back(loaded)


POISON = 95  # (vocabulary 96) a prompt holding this token id makes the prefill worker's forward raise


def _poison(engine) -> None:
    forward = engine.model.forward

    def poisoned(batch, caches, **kwargs):  # kwargs: the prefill worker's kv_written
        if bool((batch.input_ids == POISON).any()):
            raise RuntimeError("injected fault in the forward")
        return forward(batch, caches, **kwargs)

    engine.model.forward = poisoned


async def _collect(loop: EngineLoop, rid: str, add) -> tuple[int, ...]:
    queue = loop.subscribe(rid)
    try:
        await loop.call(add)
        while True:
            out = await queue.get()
            if isinstance(out, BaseException):
                raise out
            if out.finished:
                return out.output_ids
    finally:
        loop.unsubscribe(rid)


def test_a_failing_forward_on_a_prefill_worker_fails_that_request_alone(tiny_dir, loaded):
    """Before: a step that raised was re-run forever on a prefill worker (nobody subscribed, nothing aborted).
    Now the batch that failed is split, the poisoned request fails alone with the forward's error, the two
    others prefilled in the same batch decode on D to the tokens a local prefill gives, and P stops stepping."""
    p_loaded = _load(tiny_dir, "prefill")
    p_engine = p_loaded.engine
    prompts = {"good-1": list(range(70, 89)), "poisoned": [5, 6, POISON] + list(range(30, 45)),
               "good-2": list(range(50, 63))}  # fmt: skip

    async def body():
        from moemesh.services.prefill.worker import PrefillWorker

        fabric = LoopbackFabric()
        async with _Parts(loaded, fabric) as d:
            want = {}
            for rid in ("good-1", "good-2"):  # the reference: prefilled and decoded on D alone
                want[rid] = await _collect(
                    d.loop, rid, lambda rid=rid: d.engine.add_request(prompts[rid], GREEDY, rid)
                )
            _poison(p_engine)
            p_loop = EngineLoop(p_engine, exclusive=False)
            p_worker = PrefillWorker("prefill-t", p_loop, fabric.sender())
            p_runner = asyncio.ensure_future(p_loop.run())
            try:
                leases = {}
                for rid, prompt in prompts.items():
                    reservation = await d.loop.call(d.engine.reserve_kv, rid, prompt)
                    leases[rid] = d.leases.open(reservation)
                await p_loop.must_run(lambda: None)  # so that the three prefills land in one turn
                outcomes = await asyncio.gather(
                    *(p_worker.prefill(prompts[rid], GREEDY, leases[rid].target) for rid in prompts),
                    return_exceptions=True,
                )
                got = dict(zip(prompts, outcomes, strict=True))
                assert isinstance(got["poisoned"], StepFailed), got
                assert "running poisoned failed (RuntimeError: injected fault in the forward)" in str(
                    got["poisoned"]
                )
                await leases["poisoned"].close()
                for rid in ("good-1", "good-2"):
                    outcome = got[rid]
                    assert outcome.first_token_id == want[rid][0], (rid, outcome)
                    await d.receiver.inbox.wait_complete(leases[rid].key, timeout_s=10)
                    args = (leases[rid].reservation, prompts[rid], outcome.first_token_id, GREEDY)
                    queue = d.loop.subscribe(rid)
                    await leases[rid].adopt(lambda args=args: d.engine.add_prefilled(*args))
                    while not (out := await queue.get()).finished:
                        pass
                    d.loop.unsubscribe(rid)
                    assert out.output_ids == want[rid], rid
                steps = p_engine.stats()["num_steps"]
                await asyncio.sleep(0.2)  # a retrying loop would step on meanwhile
                assert p_engine.stats()["num_steps"] == steps and not p_engine.has_unfinished()
                assert p_engine.stats()["pages_leased"] == 0
            finally:
                p_runner.cancel()
                await asyncio.gather(p_runner, return_exceptions=True)
        assert_every_page_back(loaded)

    asyncio.run(asyncio.wait_for(body(), 60))


class _GatedSender:
    """A KV sender whose sends wait for `gate` (KV slow to move), counting what went out."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.num_sent = 0

    async def send(self, *args, **kwargs) -> int:
        await self.gate.wait()
        self.num_sent += 1
        return await self.inner.send(*args, **kwargs)


def test_the_prefill_worker_hands_its_first_token_on_before_the_kv_moves(tiny_dir, loaded):
    """P's early result (the Prefill stream's first message, which D streams to the client at once) comes at
    the forward's end, not after the KV: with every send held back, the first token is out (and equals a local
    prefill's) while no KV byte has landed; then the KV lands and D decodes what a local prefill decodes."""
    p_loaded = _load(tiny_dir, "prefill")
    prompt = list(range(20, 45))  # 25 tokens: 4 pages of 8

    async def body():
        from moemesh.services.prefill.worker import PrefillWorker

        fabric = LoopbackFabric()
        async with _Parts(loaded, fabric) as d:
            want = await _collect(d.loop, "ref", lambda: d.engine.add_request(prompt, GREEDY, "ref"))
            p_loop = EngineLoop(p_loaded.engine, exclusive=False)
            sender = _GatedSender(fabric.sender())
            p_worker = PrefillWorker("prefill-t", p_loop, sender)
            p_runner = asyncio.ensure_future(p_loop.run())
            try:
                reservation = await d.loop.call(d.engine.reserve_kv, "early", prompt)
                lease = d.leases.open(reservation)
                early = asyncio.get_running_loop().create_future()

                async def forward_done(outcome) -> None:
                    early.set_result((outcome, d.receiver.inbox.progress(lease.key).bytes_received))

                prefill = asyncio.ensure_future(p_worker.prefill(prompt, GREEDY, lease.target, forward_done))
                first, landed_then = await asyncio.wait_for(early, 20)
                assert first.first_token_id == want[0] and first.kv_bytes_sent == 0 and first.prefill_ms > 0
                assert landed_then == 0 and sender.num_sent == 0 and not prefill.done()
                sender.gate.set()
                outcome = await prefill
                progress = await d.receiver.inbox.wait_complete(lease.key, timeout_s=10)
                assert outcome.kv_bytes_sent == progress.bytes_received == progress.expected_bytes > 0
                queue = d.loop.subscribe("early")
                await lease.adopt(
                    lambda: d.engine.add_prefilled(reservation, prompt, first.first_token_id, GREEDY)
                )
                while not (out := await queue.get()).finished:
                    pass
                d.loop.unsubscribe("early")
                assert out.output_ids == want
            finally:
                p_runner.cancel()
                await asyncio.gather(p_runner, return_exceptions=True)
        assert_every_page_back(loaded)

    asyncio.run(asyncio.wait_for(body(), 60))


def test_overlap_streams_the_tokens_the_engine_computes_alone(loaded):
    """EngineLoop's CUDA mode (overlap: a step's outputs handed on once the next step launched) on the real
    engine: concurrent ragged greedy prompts stream exactly the tokens the engine gives stepped on its own."""
    prompts = {f"ov-{i}": [(7 * i + j) % 200 + 1 for j in range(5 + 9 * i)] for i in range(4)}
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = loaded.engine
    alone: dict[str, tuple[int, ...]] = {}
    for rid, prompt in prompts.items():
        engine.add_request(prompt, params, f"{rid}-alone")
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                alone[out.request_id.removesuffix("-alone")] = out.output_ids

    async def body():
        loop = EngineLoop(engine, drain_s=0.0, exclusive=False, overlap=True)
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)
        try:
            queues = {rid: loop.subscribe(rid) for rid in prompts}
            for rid, prompt in prompts.items():
                await loop.call(engine.add_request, prompt, params, rid)
            streamed = {}
            for rid, queue in queues.items():
                tokens = []
                while True:
                    out = await queue.get()
                    assert not isinstance(out, BaseException), out
                    tokens += out.new_token_ids
                    if out.finished:
                        break
                streamed[rid] = tuple(tokens)
            return streamed
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    streamed = asyncio.run(asyncio.wait_for(body(), 60))
    assert streamed == alone
    assert all(len(tokens) == 6 for tokens in streamed.values())
    assert_every_page_back(loaded)


def test_step_calls_on_launched_once_per_forward_before_it_returns(loaded):
    """Engine.step(on_launched=...) on the real engine: once in every step that runs a forward (prefill
    chunks, decodes, both at once), before the step's outputs exist."""
    engine = loaded.engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request(list(range(30, 60)), params, "launch-long")  # 30 prompt tokens
    calls: list[int] = []
    num_steps = 0
    while engine.has_unfinished():
        if num_steps == 1:
            engine.add_request([5, 6, 7], params, "launch-short")  # joins while the long one runs
        outputs = engine.step(on_launched=lambda n=num_steps: calls.append(n))
        assert all(out.request_id.startswith("launch-") for out in outputs)
        num_steps += 1
    assert calls == list(range(num_steps))
    assert_every_page_back(loaded)


class _PrefillThatDiesAfterItsFirstToken:
    """A prefill worker that streams its early result (the right first token) and is lost before its KV."""

    def __init__(self, first_token_id: int) -> None:
        self.first_token_id = first_token_id
        self.aborts = 0

    async def Prefill(self, request, context):
        await context.write(worker_pb2.PrefillResult(request_id=request.request_id, kv_complete=False,
                                                     first_token_id=self.first_token_id, prefill_ms=1.0))  # fmt: skip
        await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker lost")

    async def Abort(self, request, context):
        self.aborts += 1
        return worker_pb2.AbortResponse(found=False)


class _OnePeer:
    """The PeerSet surface the decode worker uses: one handshaken prefill worker."""

    def __init__(self, info: WorkerInfo, channel) -> None:
        self.ready = {info.worker_id: info}
        self.refused: dict = {}
        self._channel = channel

    def channel(self, worker_id: str):
        return self._channel


def test_a_prefill_worker_lost_after_its_first_token_is_finished_here_after_that_token(loaded):
    """The client has P's first token already (here not the greedy one, as a sampled token may be), then P is
    lost: D computes prompt + that token itself (no other P, whose first token could differ), the stream goes on without a gap or a repeat, and every page returns.
    (The reference run leaves the prompt in D's prefix cache: local_prefill_tokens=0 still sends it to P.)"""
    prompt = list(range(40, 65))

    async def body():
        async with _Parts(loaded) as parts:
            greedy = await _collect(
                parts.loop, "ref", lambda: parts.engine.add_request(prompt, GREEDY, "ref")
            )
            sampled = (greedy[0] + 7) % 90 + 2  # what P might have sampled: not the greedy first token
            want = await _collect(parts.loop, "ref2", lambda: parts.engine.add_request(
                prompt, GREEDY, "ref2", output_ids=(sampled,)))  # fmt: skip
            assert want[0] == sampled and want[1:] != greedy[1:]
            fake = _PrefillThatDiesAfterItsFirstToken(sampled)
            server = grpc.aio.server()
            port = server.add_insecure_port("127.0.0.1:0")
            handlers = {
                "Prefill": grpc.unary_stream_rpc_method_handler(
                    fake.Prefill, worker_pb2.PrefillRequest.FromString, worker_pb2.PrefillResult.SerializeToString),
                "Abort": grpc.unary_unary_rpc_method_handler(
                    fake.Abort, worker_pb2.AbortRequest.FromString, worker_pb2.AbortResponse.SerializeToString),
            }  # fmt: skip
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("moemesh.v1.PrefillWorker", handlers),)
            )
            await server.start()
            info = WorkerInfo("prefill-0", "prefill", f"127.0.0.1:{port}")
            try:
                async with grpc.aio.insecure_channel(info.grpc_address) as channel:
                    config = WorkerConfig(
                        role="decode", worker_id="decode-t", model="unused", local_prefill_tokens=0
                    )
                    worker = DecodeWorker(config, parts.loop, parts.leases, _OnePeer(info, channel))
                    job = DecodeJob("lost-p", prompt, GREEDY, prefill_worker=info)
                    timing = common_pb2.TtftBreakdown()
                    outs = [out async for out in worker.generate(job, lambda: 30.0, timing)]
            finally:
                await server.stop(None)
        assert [t for out in outs for t in out.new_token_ids] == list(want)
        assert outs[0].new_token_ids == (want[0],) and outs[-1].output_ids == want and outs[-1].finished
        assert fake.aborts == 1 and worker.num_prefill_fallbacks == 1 and worker.num_remote_prefills == 0
        assert not timing.remote_prefill
        assert_every_page_back(loaded)

    asyncio.run(asyncio.wait_for(body(), 60))
