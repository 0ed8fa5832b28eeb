"""Commands from the event loop to the engine thread, and what a caller's cancellation does to them.

Two kinds of command, one queue (`CommandQueue`), run by the engine thread between two steps in the order they
were queued:

* `call` / `call_at` — work a cancelled caller no longer wants (`add_request`, `reserve_kv`). Cancelled before
  it started, the command is dropped and never runs. Cancelled once it started, the caller gets
  `CancelledError` at once and the command's result is handed to `undo` (itself run as a must-run command), so a
  resource it acquired (`reserve_kv`'s pages) is given back: a cancelled caller never owns a result.
* `must_run` — cleanup (`cancel_reservation`, `abort`): it runs whatever happens to its caller. A caller
  cancelled while it waits keeps waiting until the command ran, then gets the `CancelledError`; a command
  queued when the engine thread stopped runs inline once it has.

`finish(aw)` gives any awaitable the must-run rule: it runs to its end even if the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Command:
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    future: asyncio.Future
    must_run: bool = False
    started: bool = False  # taken by the engine thread (under the queue's condition)
    done_s: float = 0.0  # time.monotonic() when fn returned on the engine thread
    queued_s: float = 0.0  # time.monotonic() when it was queued


class CommandQueue:
    """Lifecycle: `open(event_loop)` when an engine thread starts taking commands, `close()` once it stopped.
    While closed every command runs inline in the caller (nothing else touches the engine then)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()  # guards the queue; the engine thread waits on it for work
        self._pending: collections.deque[Command] = collections.deque()
        self._event_loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_open(self) -> bool:
        return self._event_loop is not None

    def has_pending(self) -> bool:
        """Call under `cond`."""
        return bool(self._pending)

    def num_pending(self) -> int:
        """Call under `cond`."""
        return len(self._pending)

    def last_queued_s(self) -> float:
        """When the newest pending command was queued (time.monotonic()); call under `cond` with one pending."""
        return self._pending[-1].queued_s

    # -- the event loop's side ------------------------------------------------------------------------------

    async def call_at(
        self, fn: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None, **kwargs: Any
    ) -> tuple[T, float]:
        """fn(*args, **kwargs) on the engine thread; its result and the time.monotonic() at which it returned
        there (the caller may resume a step later on CPU). Cancellation: see the module docstring."""
        if not self.is_open:
            return fn(*args, **kwargs), time.monotonic()
        command = self._queue(fn, args, kwargs, must_run=False)
        try:
            return await asyncio.shield(command.future), command.done_s
        except asyncio.CancelledError:
            with self.cond:
                if not command.started:
                    self._pending.remove(command)
                    raise
            if undo is not None:  # it ran or runs: hand whatever it returns back
                command.future.add_done_callback(lambda done: self._undo(done, undo))
            raise

    async def must_run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the engine thread, never dropped; the caller waits until it ran (a
        cancellation meanwhile is raised after)."""
        result, _ = await self.must_run_at(fn, *args, **kwargs)
        return result

    async def must_run_at(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
        if not self.is_open:
            return fn(*args, **kwargs), time.monotonic()
        command = self._queue(fn, args, kwargs, must_run=True)
        return await finish(command.future), command.done_s

    # -- the engine thread's side ---------------------------------------------------------------------------

    def take(self) -> list[Command]:
        """Every command queued; call under `cond`. They are the engine thread's from now on."""
        commands, self._pending = list(self._pending), collections.deque()
        for command in commands:
            command.started = True
        return commands

    def run(self, command: Command) -> None:
        """Runs a taken command here and posts its outcome to the event loop."""
        try:
            result = command.fn(*command.args, **command.kwargs)
            command.done_s = time.monotonic()
        except BaseException as err:
            self.post(lambda err=err: command.future.done() or command.future.set_exception(err))
        else:
            self.post(lambda: command.future.done() or command.future.set_result(result))

    def post(self, fn: Callable[[], object]) -> None:
        """fn in the event loop, soon (from any thread)."""
        assert self._event_loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is left to tell
            self._event_loop.call_soon_threadsafe(fn)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def open(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self._event_loop = event_loop

    def close(self) -> None:
        """In the event loop, once the engine thread stopped: must-run commands still queued run here, the
        others fail with RuntimeError (nobody is left to run them)."""
        with self.cond:
            leftover, self._pending = list(self._pending), collections.deque()
            self._event_loop = None
        for command in leftover:
            if command.future.done():
                continue
            if not command.must_run:
                command.future.set_exception(RuntimeError("the engine loop stopped"))
                continue
            try:
                command.done_s = time.monotonic()
                command.future.set_result(command.fn(*command.args, **command.kwargs))
            except Exception as err:
                command.future.set_exception(err)

    def queue_must_run(self, fn: Callable[..., object], *args: Any) -> None:
        """A must-run command nobody waits for (the engine loop's own cleanup); a failure is logged."""
        if not self.is_open:
            fn(*args)
            return
        command = self._queue(fn, args, {}, must_run=True)
        command.future.add_done_callback(_log_failure)

    def _queue(self, fn: Callable[..., Any], args: tuple, kwargs: dict, must_run: bool) -> Command:
        assert self._event_loop is not None
        command = Command(
            fn, args, kwargs, self._event_loop.create_future(), must_run, queued_s=time.monotonic()
        )
        with self.cond:
            self._pending.append(command)
            self.cond.notify()
        return command

    def _undo(self, done: asyncio.Future, undo: Callable[[Any], object]) -> None:
        if not done.cancelled() and done.exception() is None:
            self.queue_must_run(undo, done.result())


async def finish(aw: Awaitable[T]) -> T:
    """Awaits `aw` to its end even if the caller is cancelled meanwhile (then raises the CancelledError once
    it ended). For cleanup that must not stop half-way: ending a lease, returning pages."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():  # the work itself was cancelled (its loop is stopping)
                raise
            if not task.done():
                cancelled = True
                continue
            result = task.result()  # it ended as the cancellation arrived
            cancelled = True
            break
    if cancelled:
        raise asyncio.CancelledError
    return result


def _log_failure(done: asyncio.Future) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("an engine cleanup command failed", exc_info=done.exception())
