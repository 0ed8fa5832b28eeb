"""EngineLoop's batching around the device: on CUDA a step's outputs go to the event loop once the next step
launched (overlap), and an idle engine gathers a burst of arrivals into its first step."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from moemesh.engine.engine import RequestOutput, StepFailed
from moemesh.services.engine_loop import EngineLoop
from tests.unit.engine_loop_fakes import FakeEngine


class LaunchingEngine(FakeEngine):
    """A FakeEngine whose step calls `on_launched` (as Engine.step does once the forward is on the device),
    then waits as a device would (GIL released) until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.launched: list[int] = []
        self.seen_before_launch: list[
            int
        ] = []  # steps whose outputs reached the event loop before the launch
        self.delivered: list[int] = []  # step numbers of the outputs the event loop received, in order
        self.proceed = threading.Event()

    def step(self, on_launched=None) -> list[RequestOutput]:
        n = len(self.launched) + 1
        time.sleep(0.05)  # the host's half of the step: outputs of step n-1 must not be delivered during it
        self.seen_before_launch += [s for s in self.delivered if s == n - 1]
        self.launched.append(n)
        if on_launched is not None:
            on_launched()
        assert self.proceed.wait(10), "the event loop never received the step before's outputs"
        self.proceed.clear()
        return super().step()


def test_overlap_delivers_a_step_once_the_next_one_launched():
    """overlap (the CUDA default): step n's outputs reach the event loop after step n+1 launched and while it
    runs; the last step's outputs are delivered when no step follows. Every token arrives, in order."""
    engine = LaunchingEngine()

    async def body():
        loop = EngineLoop(engine, drain_s=0.0, exclusive=False, overlap=True)
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)
        try:
            queue = loop.subscribe("a")
            await loop.call(engine.add, "a", 3)
            engine.proceed.set()  # step 1: nothing before it to deliver
            tokens = []
            while True:
                out = await queue.get()
                assert not isinstance(out, BaseException)
                step_no = out.num_output_tokens
                engine.delivered.append(step_no)
                tokens += out.new_token_ids
                if step_no < 3:  # delivered while step_no + 1 waits on the "device"
                    assert engine.launched[-1] == step_no + 1
                    engine.proceed.set()
                if out.finished:
                    break
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert tokens == [0, 1, 2]
        assert engine.delivered == [1, 2, 3]
        assert engine.launched == [1, 2, 3]
        assert engine.seen_before_launch == []

    asyncio.run(asyncio.wait_for(body(), 30))


def test_overlap_delivers_the_step_before_a_failed_one_first():
    """A step that fails (here one that never called on_launched) still hands on the step before's outputs,
    ahead of its error: every token computed reaches the subscriber."""
    engine = FakeEngine(step_s=0.02)

    async def body():
        loop = EngineLoop(engine, drain_s=0.0, exclusive=False, overlap=True)
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)
        try:
            queue = loop.subscribe("a")
            await loop.call(engine.add, "a", 50)
            got = [await queue.get()]
            engine.fail_next = True
            while not isinstance(got[-1], BaseException):
                got.append(await queue.get())
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert isinstance(got[-1], StepFailed)
        steps = [entry for entry in engine.log if entry[0] == "step"]
        assert [(out.num_output_tokens, out.new_token_ids) for out in got[:-1]] == [
            (n, (n - 1,)) for n in range(1, len(steps) + 1)
        ]

    asyncio.run(asyncio.wait_for(body(), 30))


def test_an_idle_engine_gathers_a_burst_of_requests_into_its_first_step():
    """Requests arriving one RPC at a time (1 ms apart here) start in one step, as they would in process;
    without gathering the first of them ran in a step of its own."""
    engine = FakeEngine()

    async def body():
        loop = EngineLoop(engine, drain_s=0.0, exclusive=False, gather_s=0.02)
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)
        try:
            calls = []
            for i in range(4):
                calls.append(asyncio.ensure_future(loop.call(engine.add, f"r{i}", 2)))
                await asyncio.sleep(0.001)
            await asyncio.gather(*calls)
            alone = await loop.call(engine.add, "late", 1)  # a command arriving alone still runs
            assert alone == "late"
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert engine.log[:5] == [("add", "r0"), ("add", "r1"), ("add", "r2"), ("add", "r3"), ("step", 4)]

    asyncio.run(asyncio.wait_for(body(), 30))


def test_an_idle_engine_gathers_only_while_arrivals_come_in_bursts():
    """A command arriving alone (the next one more than gather_s later) turns gathering off: the next lone one
    starts at once instead of waiting gather_s. Two arriving together turn it back on, and the next burst
    starts in one step."""
    engine = FakeEngine()

    async def body():
        loop = EngineLoop(engine, drain_s=0.0, exclusive=False, gather_s=0.02)
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)
        try:
            assert loop.gathers  # the first wake gathers
            await loop.call(engine.add, "a", 1)  # gathered for, nothing came
            assert not loop.gathers
            await asyncio.sleep(0.05)
            await loop.call(engine.add, "b", 1)  # started at once
            assert not loop.gathers
            await asyncio.sleep(0.05)
            with (
                loop.commands.cond
            ):  # the engine thread wakes to both waiting (a reentrant lock: ours to queue)
                pair = [asyncio.ensure_future(loop.call(engine.add, f"c{i}", 1)) for i in range(2)]
                await asyncio.sleep(0)
            await asyncio.gather(*pair)
            assert loop.gathers  # "b" had no company; "c0" had
            await asyncio.sleep(0.05)
            calls = []
            for i in range(4):
                calls.append(asyncio.ensure_future(loop.call(engine.add, f"d{i}", 2)))
                await asyncio.sleep(0.001)
            await asyncio.gather(*calls)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        burst = engine.log.index(("add", "d0"))
        assert engine.log[burst : burst + 5] == [("add", "d0"), ("add", "d1"), ("add", "d2"), ("add", "d3"),
                                                ("step", 4)]  # fmt: skip

    asyncio.run(asyncio.wait_for(body(), 30))


def test_gather_s_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"gather_s=0.5 must be in \[0, 0.02\]"):
        EngineLoop(FakeEngine(), gather_s=0.5)
