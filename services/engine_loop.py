"""The loop a worker runs its engine in, shared by the prefill, decode and colocated services.

The engine is single-threaded and its `step()` blocks for a whole forward. `EngineLoop.run()` (a TaskGroup
task) starts one engine thread that steps back to back while there is work; everything else that changes
the engine (`reserve_kv`, `add_request`, `abort`, ...) is a command (`services/engine_commands.py`: `call`,
or `must_run` for cleanup), queued for that thread so it lands between two steps (every command waiting runs
before the next step). A step's outputs are posted to the event loop (per-request queues, `subscribe`), which
streams them; on CPU the two take turns (`services/gil_parking.py`).

`on_step(outputs)` hooks run in the event loop right after a step while the engine thread waits for them,
before anything else can touch the engine (the prefill worker packs newly computed pages there).

A step that raises (`StepFailed`: the engine aborted the requests it ran) fails those requests — their
subscribers get the error, then the `on_failed(request_id, error)` hooks — and the loop goes on with the
others; it is never retried. Any other exception from a step aborts every request (the engine's state is in
doubt). Either way nothing is left to re-run the failing step in a loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from moemesh.engine.engine import Engine, RequestOutput, StepFailed
from moemesh.services.engine_commands import CommandQueue
from moemesh.services.gil_parking import mark_drained, park

log = logging.getLogger(__name__)
T = TypeVar("T")
GATHER_LIMIT_S = 0.02  # an idle engine gathers a burst of commands for at most this long


class EngineLoop:
    """Owns the engine's thread of control. Lifecycle: `run()` in a TaskGroup until cancelled.

    On CPU (the defaults follow the engine's device):
    * exclusive: the event loop is parked for the length of each step (`gil_parking.park`). Not while
      `loop_needed()` says the loop has latency-bound work (a decode worker receiving KV: parking it would
      hold every chunk's completion for a step); a prefill worker is never exclusive (its loop sends each
      layer's KV while the forward goes on);
    * drain_s: after posting a step's outputs the engine thread waits up to this long for the event loop to
      stream them (`gil_parking.mark_drained`) before the next step.
    On CUDA neither, but (`overlap`) a step's outputs are handed to the event loop only once the next step's
    forward was launched (`Engine.step(on_launched=...)`), or at once when no step follows: the event loop
    streams them while the device computes, and the engine thread's host work (schedule, batch inputs,
    launch) does not share the GIL with it — otherwise that work waits for the event loop's turns while the
    device idles. A loop with `on_step` hooks (the prefill worker) delivers at once.

    gather_s (0: off): an idle engine woken by a command waits while more keep coming, each within gather_s of
    the one before (at most GATHER_LIMIT_S in all), so a burst of requests arriving one RPC at a time starts
    in one step, as it would in process, rather than the first few in a step of their own and the others
    queued behind it. It gathers only while arrivals come in bursts: a wake whose command had no follower
    within gather_s (whether the engine waited for one or started at once and saw the next command later)
    makes the next wake start at once, and a wake with company (or several commands waiting already) makes it
    gather again. The first wake gathers. So requests arriving one at a time pay no wait (it cost them gather_s
    of TTFT), and the first burst after them starts its first command alone."""

    def __init__(
        self,
        engine: Engine,
        drain_s: float | None = None,
        exclusive: bool | None = None,
        overlap: bool | None = None,
        gather_s: float = 0.0,
    ) -> None:
        if not 0 <= gather_s <= GATHER_LIMIT_S:
            raise ValueError(f"gather_s={gather_s} must be in [0, {GATHER_LIMIT_S}]")
        self.engine = engine
        on_cpu = engine.device.type != "cuda"
        self.drain_s = drain_s if drain_s is not None else (0.005 if on_cpu else 0.0)
        self.exclusive = exclusive if exclusive is not None else on_cpu
        self.overlap = overlap if overlap is not None else not on_cpu
        self.gather_s = gather_s
        self.loop_needed: Callable[[], bool] = lambda: False
        self.on_step: list[Callable[[list[RequestOutput]], None]] = []
        self.on_failed: list[Callable[[str, Exception], None]] = []  # (request id, error), in the event loop
        self.commands = CommandQueue()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._held: list[RequestOutput] = []  # overlap: the last step's outputs, until the next one launched
        self._bursty = True  # gather at the next idle wake (the last one had company within gather_s)
        self._woke_s: float | None = (
            None  # a wake that started at once: its last command's queue time, until judged
        )

    # -- commands (see services/engine_commands.py for what a cancelled caller does to each kind) -----------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args) on the engine's thread between two steps (inline while `run()` is not running). Dropped if
        the caller is cancelled before it started; `undo=` gets its result if the caller is cancelled after."""
        result, _ = await self.commands.call_at(fn, *args, **kwargs)
        return result

    async def call_at(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
        """`call`, and the time.monotonic() at which fn returned on the engine thread (the caller may resume
        a step later on CPU, where the event loop is parked while a step runs)."""
        return await self.commands.call_at(fn, *args, **kwargs)

    async def must_run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Cleanup: fn(*args) on the engine's thread whatever happens to the caller (which waits for it)."""
        return await self.commands.must_run(fn, *args, **kwargs)

    async def must_run_at(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
        return await self.commands.must_run_at(fn, *args, **kwargs)

    @property
    def gathers(self) -> bool:
        """Whether the next idle wake gathers (gather_s > 0 and arrivals have come in bursts; see gather_s)."""
        return self.gather_s > 0 and self._bursty and self._woke_s is None

    # -- outputs --------------------------------------------------------------------------------------------

    def subscribe(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        """A queue of the request's outputs; subscribe before adding the request. unsubscribe when done."""
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Starts the engine thread and returns only when cancelled (then stops the thread after its step;
        must-run commands still queued then run here)."""
        if self._thread is not None:
            raise RuntimeError("EngineLoop.run() is already running")
        self._event_loop = asyncio.get_running_loop()
        self._stopping = False
        ended: asyncio.Future[None] = self._event_loop.create_future()
        thread = threading.Thread(target=self._main, args=(ended,), name="engine", daemon=True)
        self._thread = thread
        self.commands.open(self._event_loop)
        thread.start()
        try:
            await asyncio.shield(ended)
        finally:
            with self.commands.cond:
                self._stopping = True
                self.commands.cond.notify_all()
            await asyncio.to_thread(thread.join)
            self._thread = None
            self.commands.close()

    # -- the engine thread --------------------------------------------------------------------------------------

    def _main(self, ended: asyncio.Future[None]) -> None:
        try:
            while self._turn():
                pass
        except BaseException as err:  # a bug in the loop itself: never leave run() waiting on a dead thread
            log.exception("the engine loop crashed")
            self.commands.post(lambda err=err: ended.done() or ended.set_exception(err))
        else:
            self.commands.post(lambda: ended.done() or ended.set_result(None))

    def _turn(self) -> bool:
        """The commands waiting, then one step if there is work. False once stopping."""
        cond = self.commands.cond
        idle = not self.engine.has_unfinished()
        if idle:
            self._release_held()  # no step follows to launch first
        with cond:
            while not self._stopping and not self.commands.has_pending() and not self.engine.has_unfinished():
                cond.wait()
            if idle and self.gather_s > 0 and not self._stopping:
                self._wake()
            if self._stopping:
                self._release_held()
                return False
            commands = self.commands.take()
        if self._woke_s is not None:
            self._judge(commands)
        for command in commands:
            self.commands.run(command)
        if not self.engine.has_unfinished():
            return True
        resume = None
        if self.exclusive and not self.loop_needed():
            resume = park(self.commands.post, self.drain_s)
        overlap = self.overlap and not self.on_step
        try:
            outputs = self.engine.step(on_launched=self._release_held) if overlap else self.engine.step()
        except StepFailed as err:  # its requests were aborted; the worker serves the others
            self._release_held()  # the step before's outputs go first
            log.error("%s", err, exc_info=err.cause)
            self.commands.post(lambda err=err: self._fail(err.request_ids, err))
            return True
        except Exception as err:  # not the forward: the engine's state is in doubt, end every request
            log.exception("engine step failed outside the forward; aborting every request")
            self._release_held()
            failed = self.engine.abort_all()
            self.commands.post(lambda err=err: self._fail(failed, err))
            return True
        finally:
            self._release_held()  # the step ran no forward, or failed: the last step's outputs go first
            if resume is not None:
                resume.set()
        if overlap and outputs:
            self._held = outputs
            return True
        if self.on_step:  # the hooks run in the event loop, before anything else touches the engine
            self._wait(asyncio.run_coroutine_threadsafe(self._run_hooks(outputs), self._loop()), None)
        if outputs:
            drained = concurrent.futures.Future() if self.drain_s > 0 else None
            self.commands.post(lambda: self._deliver(outputs, drained))
            if drained is not None:
                self._wait(drained, self.drain_s)
        elif not self.engine.num_running:  # nothing admissible yet (pages short): let others free some
            with cond:
                if not self.commands.has_pending():
                    cond.wait(0.01)
        return True

    def _wake(self) -> None:
        """Under the commands' condition, an idle engine woken by commands: gathers a burst, or starts at once
        (see gather_s)."""
        if self._woke_s is not None:  # the last wake that started at once: nothing came after it
            self._woke_s = None
            self._bursty = False
        if self._bursty or self.commands.num_pending() > 1:
            self._bursty = self._gather()
        else:
            self._woke_s = self.commands.last_queued_s()

    def _judge(self, commands: list) -> None:
        """After a wake that started at once: a command queued within gather_s of it means arrivals come in
        bursts (the next wake gathers); the first one queued later, that they do not."""
        assert self._woke_s is not None
        for command in commands:
            if command.queued_s > self._woke_s:
                self._bursty = command.queued_s - self._woke_s <= self.gather_s
                self._woke_s = None
                return

    def _gather(self) -> bool:
        """Under the commands' condition: waits while commands keep arriving (see gather_s). True when more
        than one command was waiting at its end."""
        cond, seen = self.commands.cond, self.commands.num_pending()
        limit = time.monotonic() + GATHER_LIMIT_S
        while not self._stopping and (left := min(self.gather_s, limit - time.monotonic())) > 0:
            cond.wait(left)
            if self.commands.num_pending() == seen:
                break
            seen = self.commands.num_pending()
        return self.commands.num_pending() > 1

    def _release_held(self) -> None:
        """Posts the outputs held back (overlap) to the event loop; from the engine thread."""
        if self._held:
            outputs, self._held = self._held, []
            self.commands.post(lambda: self._deliver(outputs, None))

    def _wait(self, future: concurrent.futures.Future, timeout_s: float | None) -> None:
        """Waits for a future the event loop completes, up to timeout_s (None: until done or stopping)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stopping:
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return
            try:
                future.result(timeout=left)
                return
            except concurrent.futures.TimeoutError:
                continue
            except Exception:
                log.exception("an on_step hook failed")
                return

    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self._event_loop is not None
        return self._event_loop

    # -- the event loop -------------------------------------------------------------------------------------------

    async def _run_hooks(self, outputs: list[RequestOutput]) -> None:
        for hook in self.on_step:
            hook(outputs)

    def _deliver(self, outputs: list[RequestOutput], drained: concurrent.futures.Future | None) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        if drained is not None:
            mark_drained(self._loop(), drained)

    def _fail(self, request_ids: Sequence[str], err: Exception) -> None:
        """Requests a failed step ended (the engine aborted them already): their subscribers get `err`, then
        the `on_failed` hooks (a worker that does not subscribe). A step that failed because a service it
        needs is gone (the expert pool: a ConnectionError) hands on that cause, so the requests end
        UNAVAILABLE rather than INTERNAL."""
        if isinstance(err, StepFailed) and isinstance(err.cause, ConnectionError):
            err = err.cause
        for rid in request_ids:
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(err)
            for hook in self.on_failed:
                hook(rid, err)
