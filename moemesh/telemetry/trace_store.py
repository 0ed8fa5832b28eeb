"""The gateway's recent requests for the built-in trace view: per request its trace id, TTFT, total time and
the spans gathered so far from every process (by span id, so a span stays once its worker forgot it)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from moemesh.telemetry.spans import SpanRecord


@dataclass
class RequestTrace:
    request_id: str
    trace_id: str
    model: str
    start_unix_ns: int
    num_prompt_tokens: int
    first_token_unix_ns: int = 0
    end_unix_ns: int = 0
    num_completion_tokens: int = 0
    finish_reason: str = ""  # "stop" | "length"; "" while running or after an error
    error: str = ""
    spans: dict[str, SpanRecord] = field(default_factory=dict)  # span id -> span

    @property
    def done(self) -> bool:
        return self.end_unix_ns > 0

    @property
    def ttft_ms(self) -> float | None:
        return (self.first_token_unix_ns - self.start_unix_ns) / 1e6 if self.first_token_unix_ns else None

    @property
    def total_ms(self) -> float | None:
        return (self.end_unix_ns - self.start_unix_ns) / 1e6 if self.end_unix_ns else None

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens and not self.first_token_unix_ns:
            self.first_token_unix_ns = time.time_ns()
        self.num_completion_tokens += num_tokens

    def finish(self, finish_reason: str = "", error: str = "") -> None:
        self.end_unix_ns = time.time_ns()
        self.finish_reason, self.error = finish_reason, error

    def add_spans(self, spans: Iterable[SpanRecord]) -> None:
        for span in spans:
            if span.trace_id == self.trace_id:
                self.spans[span.span_id] = span

    def summary(self) -> dict[str, Any]:
        """A row of `GET /traces`."""
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "model": self.model,
            "start_unix_ms": self.start_unix_ns // 1_000_000,
            "ttft_ms": _round(self.ttft_ms),
            "total_ms": _round(self.total_ms),
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_completion_tokens,
            "finish_reason": self.finish_reason,
            "error": self.error,
        }

    def to_json(self) -> dict[str, Any]:
        """`GET /traces/{request_id}?format=json`: the summary and the spans, by start; ms after the request's
        start at the gateway."""
        spans = sorted(self.spans.values(), key=lambda s: (s.start_unix_ns, s.end_unix_ns))
        return {**self.summary(), "spans": [s.to_json(self.start_unix_ns) for s in spans]}


class TraceStore:
    """The last `max_requests` requests (0: none kept), by request id; a repeated id replaces the older one."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self._requests: OrderedDict[str, RequestTrace] = OrderedDict()

    def begin(
        self, request_id: str, trace_id: str, model: str, num_prompt_tokens: int, start_unix_ns: int = 0
    ) -> RequestTrace:
        """start_unix_ns: when the request arrived (default now); the waterfall's 0 ms."""
        entry = RequestTrace(request_id, trace_id, model, start_unix_ns or time.time_ns(), num_prompt_tokens)
        if self.max_requests > 0 and trace_id:
            self._requests.pop(request_id, None)
            self._requests[request_id] = entry
            while len(self._requests) > self.max_requests:
                self._requests.popitem(last=False)
        return entry

    def get(self, request_id: str) -> RequestTrace | None:
        return self._requests.get(request_id)

    def recent(self, limit: int | None = None) -> list[RequestTrace]:
        """Newest first."""
        entries = list(reversed(self._requests.values()))
        return entries if limit is None else entries[:limit]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
