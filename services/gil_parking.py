"""Turn-taking between the engine thread and the event loop on CPU, where both are Python under one GIL.

Every torch op of a step hands the GIL back and forth, so event-loop work (gRPC streaming) done *during* a step
cost the step 20-30 % more than the same work done between steps. Two tools, used by `EngineLoop`:

* `park(post, wait_s)` — the event loop blocks (GIL released) until the returned event is set; gRPC's core
  threads keep the sockets moving meanwhile, and the loop catches up between steps.
* `Drain` — after posting a step's outputs the engine thread waits up to `drain_s` for the event loop to take
  `DRAIN_TURNS` turns of its own (the consumers woken write their chunks), so tokens leave before the next
  step, not after it.

On CUDA neither is used: a step mostly waits for the device with the GIL released; the loop overlaps it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable

PARK_LIMIT_S = 5.0  # a parked event loop resumes on its own after this long, whatever the engine thread does
DRAIN_TURNS = 4


def park(post: Callable[[Callable[[], object]], None], wait_s: float) -> threading.Event:
    """From the engine thread: has the event loop block until the returned event is set (or PARK_LIMIT_S),
    and waits up to `wait_s` for it to get there (a busy loop parks later, or finds the event set already)."""
    parked, resume = threading.Event(), threading.Event()

    def block() -> None:
        parked.set()
        resume.wait(timeout=PARK_LIMIT_S)

    post(block)
    parked.wait(timeout=max(wait_s, 0.001))
    return resume


def mark_drained(
    event_loop: asyncio.AbstractEventLoop, drained: concurrent.futures.Future, turns: int = DRAIN_TURNS
) -> None:
    """In the event loop, right after a step's outputs were queued: lets the consumers woken take `turns`
    turns of the loop (they run and write), then tells the engine thread (`drained`) it may step again."""
    if turns > 0:
        event_loop.call_soon(mark_drained, event_loop, drained, turns - 1)
    elif not drained.done():
        drained.set_result(None)
