"""A fake engine for the EngineLoop tests: requests that each need `n` steps, one token per step."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from moemesh.engine.engine import RequestOutput, StepFailed
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
                n = self.emitted[rid]
                outputs.append(
                    RequestOutput(rid, (n - 1,), n, "", done, output_ids=tuple(range(n)) if done else None)
                )
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
