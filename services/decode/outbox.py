"""A decode session's outgoing events, bounded: a client that stops reading its stream cannot grow the worker's
memory without bound.

Each request's task `put`s its chunks; the session's writer `take`s whatever is ready and sends it as one
message. While `max_events` events are undelivered a `put` waits (back-pressure: the request stops taking its
engine outputs); a `put` that waited `stall_s` raises ResourceExhausted, which ends that request (it leaves the
engine, its pages return) with that status. A request's last event (`put_last`: its error) is always taken, so
the outbox holds at most `max_events` chunks plus one error per request.
"""

from __future__ import annotations

import asyncio
import collections
import time

from moemesh.transport.errors import ResourceExhausted

MAX_EVENTS = 1024  # undelivered events per session
STALL_S = 30.0  # how long a request may wait for room before it fails with RESOURCE_EXHAUSTED


class Outbox:
    def __init__(self, max_events: int = MAX_EVENTS, stall_s: float = STALL_S) -> None:
        if max_events < 1:
            raise ValueError(f"max_events={max_events} must be >= 1")
        if stall_s <= 0:
            raise ValueError(f"stall_s={stall_s} must be > 0")
        self.max_events = max_events
        self.stall_s = stall_s
        self._events: collections.deque = collections.deque()
        self._ready = asyncio.Event()  # something to take (or the end)
        self._room = asyncio.Event()  # fewer than max_events undelivered
        self._room.set()
        self._ended = False

    def __len__(self) -> int:
        return len(self._events)

    async def put(self, event: object, request_id: str) -> None:
        """Waits while the outbox is full; raises ResourceExhausted after `stall_s` of waiting."""
        deadline = time.monotonic() + self.stall_s
        while len(self._events) >= self.max_events:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ResourceExhausted(
                    f"request {request_id}: the client read nothing for {self.stall_s:g} s while the session held "
                    f"{len(self._events)} undelivered events (at most {self.max_events})"
                ) from None
        self._events.append(event)
        self._ready.set()

    def put_last(self, event: object) -> None:
        """A request's final event (its error): taken even when the outbox is full."""
        self._events.append(event)
        self._ready.set()

    def end(self) -> None:
        """No more puts: `take` returns None once the events left were taken."""
        self._ended = True
        self._ready.set()

    async def take(self) -> list | None:
        """Every event ready (waits for one); None once ended and empty."""
        while not self._events:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        events = list(self._events)
        self._events.clear()
        self._room.set()
        return events
