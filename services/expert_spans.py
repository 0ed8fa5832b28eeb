"""`expert.dispatch`: an attention worker's exchanges with the expert pool, one span per request and worker —
never one per layer call or per step (a decode of n tokens makes n steps x every MoE layer).

After every engine step (an `EngineLoop.on_step` hook: in the event loop while the engine thread waits) the
step's `DispatchStats` (transport/expert_client.py) are added to every request the step held (its running
batch and the requests that got an output). When a request's span on this worker ends (decode.stream on D,
prefill.forward on P), `finish(request_id, parent)` records one `expert.dispatch` under it: from the first
layer sent to the last answer combined, with the steps, layer exchanges, token rows, bytes and pool workers of
the steps it took part in (those are batch totals, shared with the requests batched with it) and the time the
engine waited for the pool.

With tracing off nothing is installed: no hook, no per-step work.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from moemesh.engine.engine import Engine, RequestOutput
from moemesh.telemetry import spans
from moemesh.telemetry.tracing import Parent, Telemetry
from moemesh.transport.expert_client import DispatchStats, RemoteExperts

MAX_TRACKED = 4096  # requests whose span has not ended yet; the oldest is dropped beyond (a request lost)


@dataclass
class _RequestDispatch:
    steps: int = 0
    layers: int = 0
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_ns: int = 0
    first_unix_ns: int = 0
    last_unix_ns: int = 0
    workers: set[str] = field(default_factory=set)

    def add(self, step: DispatchStats) -> None:
        self.steps += 1
        self.layers += step.layers
        self.tokens += step.tokens
        self.bytes_sent += step.bytes_sent
        self.bytes_received += step.bytes_received
        self.wait_ns += step.wait_ns
        self.first_unix_ns = self.first_unix_ns or step.first_unix_ns
        self.last_unix_ns = max(self.last_unix_ns, step.last_unix_ns)
        self.workers |= step.workers


class ExpertDispatchSpans:
    """Lifecycle: `install(...)` after the engine loop is built (None when tracing is off or experts are
    local); `finish(request_id, parent)` wherever a request's span on this worker ends (None-safe callers)."""

    def __init__(self, telemetry: Telemetry, engine: Engine, remote: RemoteExperts) -> None:
        self.telemetry = telemetry
        self.engine = engine
        self.remote = remote
        self._requests: OrderedDict[str, _RequestDispatch] = OrderedDict()

    @classmethod
    def install(cls, telemetry: Telemetry, loop, remote: RemoteExperts | None) -> ExpertDispatchSpans | None:
        """loop: the worker's EngineLoop (its `on_step` gets the hook)."""
        if remote is None or not telemetry.enabled:
            return None
        tracker = cls(telemetry, loop.engine, remote)
        loop.on_step.append(tracker.after_step)
        return tracker

    def after_step(self, outputs: list[RequestOutput]) -> None:
        step = self.remote.take_stats()
        if not step.layers:
            return
        held = {r.request_id for r in self.engine.scheduler.running} | {o.request_id for o in outputs}
        for rid in held:
            entry = self._requests.get(rid)
            if entry is None:
                entry = self._requests[rid] = _RequestDispatch()
                while len(self._requests) > MAX_TRACKED:
                    self._requests.popitem(last=False)
            entry.add(step)

    def finish(self, request_id: str, parent: Parent) -> None:
        """Records the request's `expert.dispatch` under `parent` (nothing when it sent nothing here)."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        self.telemetry.record(spans.EXPERT_DISPATCH, entry.first_unix_ns, entry.last_unix_ns, parent, {
            spans.REQUEST_ID: request_id, spans.WORKER: self.telemetry.worker,
            spans.EXPERT_STEPS: entry.steps, spans.EXPERT_LAYERS: entry.layers,
            spans.EXPERT_TOKENS: entry.tokens, spans.EXPERT_BYTES_SENT: entry.bytes_sent,
            spans.EXPERT_BYTES_RECEIVED: entry.bytes_received,
            spans.EXPERT_WAIT_MS: round(entry.wait_ns / 1e6, 3),
            spans.EXPERT_WORKERS: sorted(entry.workers)})  # fmt: skip
