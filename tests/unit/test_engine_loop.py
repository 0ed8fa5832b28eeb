"""EngineLoop: the engine thread steps while the event loop streams; calls land between steps; a cancelled
call either never ran or has its result undone; a must-run command runs whatever happens to its caller; a
failed step fails its requests; hooks see every step."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from moemesh.engine.engine import RequestOutput, StepFailed
from moemesh.services.engine_commands import finish
from moemesh.services.engine_loop import EngineLoop


class FakeEngine:
    """Requests that each need `n` steps; every step emits one token per request. Records what ran where."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.device = SimpleNamespace(type="cpu")
        self.step_s = step_s
        self.left: dict[str, int] = {}
        self.emitted: dict[str, int] = {}
        self.log: list[tuple[str, ...]] = []
        self.threads: set[str] = set()
        self.fail_next = False
        self.break_next = False
        self.in_step = False

    @property
    def num_running(self) -> int:
        return len(self.left)

    def has_unfinished(self) -> bool:
        return bool(self.left)

    def add(self, rid: str, n: int) -> str:
        assert not self.in_step, "a command ran during a step"
        self.threads.add(threading.current_thread().name)
        self.left[rid], self.emitted[rid] = n, 0
        self.log.append(("add", rid))
        return rid

    def abort(self, rid: str) -> None:
        assert not self.in_step
        self.left.pop(rid, None)
        self.log.append(("abort", rid))

    def abort_all(self) -> list[str]:
        aborted = list(self.left)
        self.left.clear()
        self.log.append(("abort_all", *aborted))
        return aborted

    def step(self, on_launched=None) -> list[RequestOutput]:  # never launches: the loop delivers after it
        self.in_step = True
        try:
            self.threads.add(threading.current_thread().name)
            time.sleep(self.step_s)
            if self.fail_next:  # as Engine.step: the step's requests are aborted, then StepFailed
                self.fail_next = False
                failed = tuple(self.left)
                self.left.clear()
                self.log.append(("failed", *failed))
                raise StepFailed(failed, RuntimeError("the forward blew up"))
            if self.break_next:  # an exception that is not the forward's
                self.break_next = False
                raise KeyError("scheduler bug")
            outputs = []
            for rid in list(self.left):
                self.emitted[rid] += 1
                self.left[rid] -= 1
                done = self.left[rid] == 0
                if done:
                    del self.left[rid]
                ids = tuple(range(self.emitted[rid]))
                outputs.append(RequestOutput(rid, (ids[-1],), ids, "", done))
            self.log.append(("step", len(outputs)))
            return outputs
        finally:
            self.in_step = False


async def _collect(loop: EngineLoop, queue: asyncio.Queue) -> list[int]:
    tokens = []
    while True:
        out = await queue.get()
        if isinstance(out, BaseException):
            raise out
        tokens += out.new_token_ids
        if out.finished:
            return tokens


def test_steps_run_on_the_engine_thread_and_stream_every_token():
    engine = FakeEngine(step_s=0.002)

    async def body():
        loop = EngineLoop(engine)
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)  # run() started its thread
        try:
            queues = {rid: loop.subscribe(rid) for rid in ("a", "b")}
            assert await loop.call(engine.add, "a", 5) == "a"
            await loop.call(engine.add, "b", 3)
            got = await asyncio.gather(*(_collect(loop, q) for q in queues.values()))
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert got == [[0, 1, 2, 3, 4], [0, 1, 2]]
        assert engine.threads == {"engine"}  # commands and steps: one thread, never the event loop's
        assert loop._thread is None  # stopped with run()

    asyncio.run(asyncio.wait_for(body(), 10))


def test_call_runs_inline_without_a_running_loop():
    engine = FakeEngine()
    assert asyncio.run(EngineLoop(engine).call(engine.add, "x", 1)) == "x"
    assert engine.threads == {threading.current_thread().name}


def test_a_call_cancelled_before_it_ran_never_runs():
    engine = FakeEngine(step_s=0.05)

    async def body():
        loop = EngineLoop(engine)
        runner = asyncio.ensure_future(loop.run())
        try:
            await loop.call(
                engine.add, "long", 40
            )  # the thread is now in 50 ms steps (2 s of them: a loaded box)
            await asyncio.sleep(0.01)
            pending = asyncio.ensure_future(loop.call(engine.add, "never", 1))
            await asyncio.sleep(0)  # queued behind the running step
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            await asyncio.sleep(0.15)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert ("add", "never") not in engine.log

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_call_cancelled_while_running_raises_at_once_and_its_result_is_undone():
    """Before: the caller got the result and the cancellation only at its next await (where a cleanup
    `call` was then dropped); now the caller never owns the result: `undo` gets it, on the engine thread."""
    engine = FakeEngine()
    started, release = threading.Event(), threading.Event()
    undone: list[tuple[str, str]] = []

    def slow_reserve() -> str:
        started.set()
        release.wait(60)  # generous: on a loaded box a short wait could end before the test checks
        return "pages-7"

    async def body():
        loop = EngineLoop(engine)
        runner = asyncio.ensure_future(loop.run())
        seen = []

        async def caller():
            seen.append(await loop.call(slow_reserve, undo=lambda r: undone.append((r, _thread()))))

        try:
            task = asyncio.ensure_future(caller())
            assert await asyncio.to_thread(started.wait, 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # at once: the command still runs
            assert undone == []
            release.set()
            for _ in range(6000):  # the engine thread runs the undo once slow_reserve returns
                if undone:
                    break
                await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert seen == []
        assert undone == [("pages-7", "engine")]

    asyncio.run(asyncio.wait_for(body(), 120))


def _thread() -> str:
    return threading.current_thread().name


def test_a_must_run_command_cancelled_before_it_started_still_runs_and_its_caller_waits():
    """The cleanup kind: `call` drops a command cancelled before it started (the root of the decode worker's
    page leaks); `must_run` runs it, and the cancelled caller resumes only once it ran."""
    engine = FakeEngine(step_s=0.05)

    async def body():
        loop = EngineLoop(engine)
        runner = asyncio.ensure_future(loop.run())
        try:
            await loop.call(
                engine.add, "long", 40
            )  # the thread is now in 50 ms steps (2 s of them: a loaded box)
            await asyncio.sleep(0.01)
            cleanup = asyncio.ensure_future(loop.must_run(engine.abort, "long"))
            await asyncio.sleep(0)  # queued behind the running step
            cleanup.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cleanup
            assert ("abort", "long") in engine.log  # ran before the caller saw its cancellation
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(asyncio.wait_for(body(), 10))


def test_must_run_commands_left_when_the_loop_stops_run_inline_others_fail():
    engine = FakeEngine(step_s=0.05)

    async def body():
        loop = EngineLoop(engine)
        runner = asyncio.ensure_future(loop.run())
        await loop.call(engine.add, "long", 100)
        await asyncio.sleep(0.01)  # inside a step
        cleanup = asyncio.ensure_future(loop.must_run(engine.abort, "long"))
        plain = asyncio.ensure_future(loop.call(engine.add, "late", 1))
        await asyncio.sleep(0)
        runner.cancel()  # stops after the running step, before the commands' turn
        await asyncio.gather(runner, return_exceptions=True)
        await cleanup
        with pytest.raises(RuntimeError, match="the engine loop stopped"):
            await plain
        assert ("abort", "long") in engine.log and ("add", "late") not in engine.log

    asyncio.run(asyncio.wait_for(body(), 10))


def test_finish_runs_cleanup_to_its_end_through_a_cancellation():
    async def body():
        steps = []

        async def cleanup():
            steps.append("end lease")
            await asyncio.sleep(0.05)
            steps.append("free pages")
            return 3

        task = asyncio.ensure_future(finish(cleanup()))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # twice: still held
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["end lease", "free pages"]
        assert await finish(cleanup()) == 3

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_failed_step_fails_its_requests_once_and_the_loop_serves_on():
    """A subscriber gets the error; a request nobody subscribed to (a prefill worker's) reaches the on_failed
    hooks; the failed step is never re-run (before, it was, in a hot loop, for the unsubscribed request)."""
    engine = FakeEngine(step_s=0.002)

    async def body():
        loop = EngineLoop(engine)
        failed: list[tuple[str, str]] = []
        loop.on_failed.append(lambda rid, err: failed.append((rid, type(err).__name__)))
        runner = asyncio.ensure_future(loop.run())
        try:
            queue = loop.subscribe("doomed")
            engine.fail_next = True
            await loop.must_run(lambda: (engine.add("doomed", 3), engine.add("unsubscribed", 3)))
            with pytest.raises(StepFailed, match="running doomed, unsubscribed failed .*the forward blew up"):
                await _collect(loop, queue)
            loop.unsubscribe("doomed")
            await asyncio.sleep(0.1)  # a retrying loop would step ~50 times meanwhile
            assert [e for e in engine.log if e[0] == "step"] == []
            queue = loop.subscribe("fine")
            await loop.call(engine.add, "fine", 2)
            assert await _collect(loop, queue) == [0, 1]
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert failed == [("doomed", "StepFailed"), ("unsubscribed", "StepFailed")]
        assert engine.log.count(("failed", "doomed", "unsubscribed")) == 1

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_step_failing_outside_the_forward_aborts_every_request():
    engine = FakeEngine()

    async def body():
        loop = EngineLoop(engine)
        failed: list[str] = []
        loop.on_failed.append(lambda rid, err: failed.append(rid))
        runner = asyncio.ensure_future(loop.run())
        try:
            engine.break_next = True
            await loop.must_run(lambda: (engine.add("a", 3), engine.add("b", 3)))
            while len(failed) < 2:
                await asyncio.sleep(0.01)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert failed == ["a", "b"] and ("abort_all", "a", "b") in engine.log and not engine.left

    asyncio.run(asyncio.wait_for(body(), 10))


def test_hooks_run_in_the_event_loop_after_each_step_before_the_next():
    engine = FakeEngine()

    async def body():
        loop = EngineLoop(engine)
        event_loop_thread = threading.current_thread().name
        seen: list[tuple[str, int, bool]] = []
        loop.on_step.append(
            lambda outputs: seen.append((threading.current_thread().name, len(outputs), engine.in_step))
        )
        runner = asyncio.ensure_future(loop.run())
        try:
            queue = loop.subscribe("r")
            await loop.call(engine.add, "r", 3)
            await _collect(loop, queue)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert seen == [(event_loop_thread, 1, False)] * 3
        assert [e for e in engine.log if e[0] == "step"] == [("step", 1)] * 3

    asyncio.run(asyncio.wait_for(body(), 10))


@pytest.mark.parametrize("exclusive", [True, False])
def test_on_cpu_the_event_loop_is_parked_while_a_step_runs(exclusive):
    """A ticker in the event loop stalls for a whole 200 ms step when steps are exclusive (the CPU default),
    and keeps ticking through it when they are not (CUDA)."""
    engine = FakeEngine(step_s=0.2)

    async def body() -> float:
        loop = EngineLoop(engine, exclusive=exclusive)
        assert EngineLoop(engine).exclusive  # the fake engine is on CPU
        runner = asyncio.ensure_future(loop.run())
        ticks: list[float] = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.002)

        tick_task = asyncio.ensure_future(ticker())
        try:
            queue = loop.subscribe("r")
            await asyncio.sleep(0.02)
            await loop.call(engine.add, "r", 3)
            assert await _collect(loop, queue) == [0, 1, 2]
        finally:
            for task in (runner, tick_task):
                task.cancel()
            await asyncio.gather(runner, tick_task, return_exceptions=True)
        return max(b - a for a, b in zip(ticks, ticks[1:], strict=False))

    longest_gap_s = asyncio.run(asyncio.wait_for(body(), 10))
    if exclusive:
        assert longest_gap_s >= 0.19
    else:
        assert longest_gap_s < 0.1


def test_call_at_tells_when_the_engine_ran_the_call_not_when_the_caller_resumed():
    """`call_at` gives the engine thread's time, which the TTFT breakdown measures from, not the time its caller
    resumed: here the event loop is held for 0.3 s right after the call is posted (as a parked loop or a busy
    one holds it), the engine thread runs the call meanwhile, and the caller resumes only after the hold.
    (Before: it relied on the loop parking within a step's first 5 ms, which a loaded box does not guarantee.)"""
    engine = FakeEngine(step_s=0.1)

    async def body() -> tuple[float, float, float]:
        loop = EngineLoop(engine, exclusive=False)
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)
        try:
            posted_s = time.monotonic()
            call = asyncio.ensure_future(loop.call_at(engine.add, "b", 1))
            await asyncio.sleep(0)  # the call is posted to the engine thread
            time.sleep(0.3)  # the event loop held: the engine thread runs the call meanwhile
            rid, ran_s = await call
            resumed_s = time.monotonic()
            assert rid == "b"
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        return posted_s, ran_s, resumed_s

    posted_s, ran_s, resumed_s = asyncio.run(asyncio.wait_for(body(), 10))
    assert posted_s <= ran_s < resumed_s
    assert resumed_s - posted_s >= 0.3 and ran_s - posted_s < 0.25  # the engine's time, not the caller's


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
                step_no = len(out.output_ids)
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
        assert [out.output_ids for out in got[:-1]] == [tuple(range(n)) for n in range(1, len(steps) + 1)]

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
