"""EngineLoop: the engine thread steps while the event loop streams; calls land between steps; a cancelled
call either never ran or has its result undone; a must-run command runs whatever happens to its caller; a
failed step fails its requests; hooks see every step."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from moemesh.engine.engine import StepFailed
from moemesh.services.engine_commands import finish
from moemesh.services.engine_loop import EngineLoop
from tests.unit.engine_loop_fakes import FakeEngine, _collect


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
