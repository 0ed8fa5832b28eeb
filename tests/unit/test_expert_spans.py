"""`expert.dispatch`: the per-step `DispatchStats` of RemoteExperts summed per request, one span per request
when its span on the worker ends; nothing installed when tracing is off or the experts are local."""

from __future__ import annotations

from types import SimpleNamespace

from moemesh.services.expert_spans import ExpertDispatchSpans
from moemesh.telemetry import spans as names
from moemesh.telemetry.tracing import Telemetry, trace_id_of
from moemesh.transport.expert_client import DispatchStats


class FakeRemote:
    def __init__(self) -> None:
        self.steps: list[DispatchStats] = []

    def take_stats(self) -> DispatchStats:
        return self.steps.pop(0)


def _loop(running: list[str]):
    scheduler = SimpleNamespace(running=[SimpleNamespace(request_id=rid) for rid in running])
    return SimpleNamespace(engine=SimpleNamespace(scheduler=scheduler), on_step=[])


def _step(layers: int, tokens: int, workers: set[str], first: int, last: int) -> DispatchStats:
    return DispatchStats(layers=layers, tokens=tokens, bytes_sent=100 * tokens, bytes_received=10 * tokens,
                         wait_ns=1_000_000 * layers, first_unix_ns=first, last_unix_ns=last, workers=workers)  # fmt: skip


def test_nothing_is_installed_without_tracing_or_remote_experts():
    loop = _loop([])
    assert ExpertDispatchSpans.install(Telemetry.disabled("decode-0"), loop, FakeRemote()) is None
    traced = Telemetry.create("moemesh-decode", "decode-0", trace_buffer=4)
    assert ExpertDispatchSpans.install(traced, loop, None) is None
    assert loop.on_step == []


def test_one_span_per_request_summing_the_steps_it_was_in():
    telemetry = Telemetry.create("moemesh-decode", "decode-0", trace_buffer=4)
    loop, remote = _loop(["a", "b"]), FakeRemote()
    tracker = ExpertDispatchSpans.install(telemetry, loop, remote)
    assert loop.on_step == [tracker.after_step]
    remote.steps = [_step(2, 5, {"expert-0"}, 1_000, 2_000), DispatchStats(),
                    _step(2, 3, {"expert-1"}, 3_000, 4_000)]  # fmt: skip
    tracker.after_step([])  # a and b running
    tracker.after_step([])  # a step that sent nothing to the pool
    loop.engine.scheduler.running = []  # b left the batch; a finished in this step (its output)
    tracker.after_step([SimpleNamespace(request_id="a")])
    parent = telemetry.start(names.DECODE_STREAM, "")
    tracker.finish("a", parent)
    tracker.finish("b", parent)
    tracker.finish("never-sent", parent)  # nothing recorded for a request that sent nothing
    parent.end()
    recorded = [s for s in telemetry.store.spans([trace_id_of(parent)]) if s.name == names.EXPERT_DISPATCH]
    by_request = {s.attributes[names.REQUEST_ID]: s for s in recorded}
    assert sorted(by_request) == ["a", "b"]
    stream_id = f"{parent.get_span_context().span_id:016x}"
    a, b = by_request["a"], by_request["b"]
    assert a.parent_id == b.parent_id == stream_id and a.worker == "decode-0"
    assert (a.start_unix_ns, a.end_unix_ns, b.start_unix_ns, b.end_unix_ns) == (1_000, 4_000, 1_000, 2_000)
    assert {k: a.attributes[k] for k in (names.EXPERT_STEPS, names.EXPERT_LAYERS, names.EXPERT_TOKENS,
            names.EXPERT_BYTES_SENT, names.EXPERT_BYTES_RECEIVED, names.EXPERT_WAIT_MS)} == {
        names.EXPERT_STEPS: 2, names.EXPERT_LAYERS: 4, names.EXPERT_TOKENS: 8, names.EXPERT_BYTES_SENT: 800,
        names.EXPERT_BYTES_RECEIVED: 80, names.EXPERT_WAIT_MS: 4.0}  # fmt: skip
    assert a.attributes[names.EXPERT_WORKERS] == ["expert-0", "expert-1"]
    assert (b.attributes[names.EXPERT_STEPS], b.attributes[names.EXPERT_WORKERS]) == (1, ["expert-0"])
    tracker.finish("a", parent)  # finished once: popped
    assert (
        len([s for s in telemetry.store.spans([trace_id_of(parent)]) if s.name == names.EXPERT_DISPATCH]) == 2
    )
