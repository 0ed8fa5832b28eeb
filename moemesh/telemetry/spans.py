"""Span names (DESIGN §7) and `SpanRecord`, a finished span as the built-in trace view keeps it: plain data,
no OpenTelemetry import (the trace view's client, `moemesh trace`, runs on the SDK-only install)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# One trace per request; never a span per token.
GATEWAY_GENERATE = "gateway.generate"  # the whole request at the gateway: arrival -> last chunk
GATEWAY_ROUTE = "gateway.route"  # picking (P, D)
DECODE_ADMIT = "decode.admit"  # D: arrival -> the request is in the engine (with its KV, when P prefilled it)
PREFILL_FORWARD = "prefill.forward"  # P: arrival -> the prompt's forward ended (its first token sampled)
KV_SEND = "kv.send"  # P: the first KV chunk sent -> the last acknowledged (bytes, pages, chunks)
KV_RECEIVE = "kv.receive"  # D: the lease opened -> every byte landed
DECODE_FIRST_TOKEN = "decode.first_token"  # D: admitted -> the first token out
DECODE_STREAM = "decode.stream"  # D: the first token -> the last (tokens)
EXPERT_DISPATCH = "expert.dispatch"  # P or D: a request's exchanges with the expert pool, first -> last

# Attribute keys.
REQUEST_ID = "moemesh.request_id"
MODEL = "moemesh.model"
WORKER = "moemesh.worker"
PROMPT_TOKENS = "moemesh.prompt_tokens"
CACHED_TOKENS = "moemesh.cached_tokens"
COMPLETION_TOKENS = "moemesh.completion_tokens"
TOKENS = "moemesh.tokens"
FINISH_REASON = "moemesh.finish_reason"
TTFT_MS = "moemesh.ttft_ms"
DECODE_WORKER = "moemesh.decode_worker"
PREFILL_WORKER = "moemesh.prefill_worker"
KV_BYTES = "moemesh.kv.bytes"
KV_PAGES = "moemesh.kv.pages"
KV_CHUNKS = "moemesh.kv.chunks"
KV_LAYERS = "moemesh.kv.layers"
KV_DURATION_MS = "moemesh.kv.duration_ms"
LEASE = "moemesh.kv.lease"
EXPERT_STEPS = "moemesh.expert.steps"  # engine steps that sent tokens to the pool
EXPERT_LAYERS = "moemesh.expert.layers"  # MoE layer exchanges of those steps
EXPERT_TOKENS = "moemesh.expert.tokens"  # token rows sent (summed over layers and pool workers)
EXPERT_BYTES_SENT = "moemesh.expert.bytes_sent"
EXPERT_BYTES_RECEIVED = "moemesh.expert.bytes_received"
EXPERT_WAIT_MS = "moemesh.expert.wait_ms"  # time the engine waited for the pool's answers
EXPERT_WORKERS = "moemesh.expert.workers"  # the pool workers it reached


@dataclass(frozen=True)
class SpanRecord:
    """One finished span. Ids are lowercase hex (trace 32 digits, span 16); parent_id "" for a root."""

    name: str
    worker: str
    trace_id: str
    span_id: str
    parent_id: str
    start_unix_ns: int
    end_unix_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    error: bool = False

    @property
    def duration_ms(self) -> float:
        return (self.end_unix_ns - self.start_unix_ns) / 1e6

    def to_json(self, origin_unix_ns: int) -> dict[str, Any]:
        """As `/traces/{id}?format=json` serves it: start and end in ms after `origin_unix_ns`."""
        return {
            "name": self.name,
            "worker": self.worker,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "start_ms": round((self.start_unix_ns - origin_unix_ns) / 1e6, 3),
            "end_ms": round((self.end_unix_ns - origin_unix_ns) / 1e6, 3),
            "attributes": dict(self.attributes),
            "error": self.error,
        }
