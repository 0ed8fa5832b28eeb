"""The gateway's built-in trace view: its recent requests (`TraceStore`, filled by `Gateway.generate`) and, for
one request, the spans of every process it touched — the gateway's own, and each registered worker's, asked
over `Spans.GetSpans` when the trace is viewed (cheap while nobody looks). Spans gathered once stay with the
request after a worker forgot them or left."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from moemesh.telemetry.spans import SpanRecord
from moemesh.telemetry.trace_store import RequestTrace, TraceStore
from moemesh.telemetry.tracing import Telemetry
from moemesh.transport.errors import MeshError, Unavailable
from moemesh.transport.registry import Membership
from moemesh.transport.spans import fetch_spans

log = logging.getLogger(__name__)
FETCH_TIMEOUT_S = 2.0


class TraceView:
    def __init__(
        self,
        store: TraceStore,
        telemetry: Telemetry,
        membership: Membership,
        channel: Callable[[str], grpc.aio.Channel],
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.membership = membership
        self.channel = channel  # the gateway's cached channels, by address

    def recent(self, limit: int | None = None) -> list[RequestTrace]:
        return self.store.recent(limit)

    async def gather(self, request_id: str) -> RequestTrace | None:
        """The request with every span its processes still keep added; None when it is not (or no longer)
        among the recent ones. A worker that does not answer in FETCH_TIMEOUT_S is left out (logged)."""
        entry = self.store.get(request_id)
        if entry is None:
            return None
        if self.telemetry.store is not None:
            entry.add_spans(self.telemetry.store.spans([entry.trace_id]))
        members = self.membership.members()
        results = await asyncio.gather(
            *(self._fetch(m.grpc_address, entry.trace_id) for m in members), return_exceptions=True
        )
        for member, result in zip(members, results, strict=True):
            if isinstance(result, MeshError):
                log.warning("spans of %s from %s: %s", request_id, member.worker_id, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                entry.add_spans(result)
        return entry

    async def _fetch(self, address: str, trace_id: str) -> list[SpanRecord]:
        """One retry after UNAVAILABLE: the channel is shared with the decode sessions, and a connection the
        server closed (GOAWAY) fails the next call before the channel reconnects."""
        try:
            return await fetch_spans(self.channel(address), [trace_id], FETCH_TIMEOUT_S)
        except Unavailable:
            return await fetch_spans(self.channel(address), [trace_id], FETCH_TIMEOUT_S)
