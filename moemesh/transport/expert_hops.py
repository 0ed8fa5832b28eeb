"""Where one expert-wire round trip spends its time: named timestamps per batch, on both ends, for benchmarks.

`HopLog.mark(batch_id, name)` records `time.perf_counter_ns()` (CLOCK_MONOTONIC on Linux: one clock for every
process of a host), so the attention worker's and the expert worker's marks of the same batch (ids are the
wire's micro_batch_id) join into one timeline. Off unless a `HopLog` is given: `RemoteExperts.hop_log`,
`UcxExpertServer(hop_log=...)`. A mark is a dict store; the log keeps the last `limit` batches.

Events, in the order one batch meets them (client = attention worker, server = expert worker):
    submit          client: the engine thread entered RemoteExperts.submit
    built           client: the batch's payload is built (encode, ids, weights; device syncs included)
    loop            client: the event loop's thread picked the exchange up (the engine -> loop hop)
    header_sent     client: the header frame's send completed
    payload_sent    client: the payload's send completed
    srv_header      server: the header frame arrived (as its event loop saw it)
    srv_payload     server: the payload arrived
    compute_start   server: the compute thread started the batch (the loop -> compute hop)
    compute_end     server: its output rows are ready (device synced)
    srv_computed    server: the event loop has them back (the compute -> loop hop)
    srv_sent        server: the result frame and the output rows are sent
    frame_received  client: the result frame arrived
    output_received client: the output rows arrived
    woke            client: the engine thread has every worker's rows (the loop -> engine hop)
    combined        client: the layer's combine is done
"""

from __future__ import annotations

import time
from collections import OrderedDict

EVENTS = (
    "submit", "built", "loop", "header_sent", "payload_sent", "srv_header", "srv_payload", "compute_start",
    "compute_end", "srv_computed", "srv_sent", "frame_received", "output_received", "woke", "combined",
)  # fmt: skip


class HopLog:
    """batch id -> {event: perf_counter_ns}; the last `limit` batches."""

    def __init__(self, limit: int = 4096) -> None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1")
        self.limit = limit
        self.batches: OrderedDict[int, dict[str, int]] = OrderedDict()

    def mark(self, batch_id: int, event: str, ns: int | None = None) -> None:
        marks = self.batches.get(batch_id)
        if marks is None:
            marks = self.batches[batch_id] = {}
            if len(self.batches) > self.limit:
                self.batches.popitem(last=False)
        marks[event] = time.perf_counter_ns() if ns is None else ns

    def export(self) -> dict[int, dict[str, int]]:
        return {batch_id: dict(marks) for batch_id, marks in self.batches.items()}


def timeline_ms(batches: list[dict[str, int]]) -> list[dict]:
    """Joined marks of many batches (client and server merged per batch) -> one row per event seen in every
    batch, in EVENTS order: the median time since `submit` and the median step from the event before it (ms).
    Steps are medians of per-batch differences, so they need not add up to the medians since submit."""
    full = [b for b in batches if "submit" in b]
    events = [e for e in EVENTS if full and all(e in b for b in full)]
    rows, previous = [], None
    for event in events:
        since = sorted((b[event] - b["submit"]) / 1e6 for b in full)
        step = sorted((b[event] - b[previous]) / 1e6 for b in full) if previous else [0.0]
        rows.append(
            {"event": event, "since_submit_ms": since[len(since) // 2], "step_ms": step[len(step) // 2]}
        )
        previous = event
    return rows
