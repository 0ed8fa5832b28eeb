"""KV export: a prefill worker's newly computed pages copied out layer group by layer group while the forward
that computes them still runs, so that by the forward's end only the last group's chunk is left to send.

The exporter belongs to the model runner and is used on the engine thread only; what it hands out (chunks:
a packed copy and a CUDA event after which the copy is complete) is read, never changed, by the worker's
event loop. `ModelRunner.execute` calls it per forward:

    step = exporter.begin(rows)        # which tracked requests' pages this forward completes (full pages; all
                                       # of them when the prompt ends here); the page ids go up on the side stream
    model(batch, caches, kv_written=step.layer_written)   # after layer i's attention wrote its KV
    step.finish()                      # groups no layer signal packed (a decode-path forward: all of them)

Group g (`layer_groups`: the last layer alone, so the tail is one small chunk) is packed once its last
layer's KV is written: on CUDA an event recorded there on the forward's stream, the side stream waits for it,
packs (`pack_kv`) into buffers allocated on the side stream and records the chunk's `ready` event — nothing
waits on the host. On CPU the pack runs inline (the forward's own thread), `ready` is None.

Page reuse is ordered in stream terms: every forward first waits for the side stream's work so far
(`order_before_forward`), so a page released (a finished prompt, an abort, a preemption) is never rewritten
before the packs that read it ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moemesh.kernels import pack_kv

# Chunks per request and step. The tail is the last group's pack and round trip whatever the others are (it is
# one layer); the groups before it are sent while later layers compute, all in flight at once, so fewer of
# them costs nothing and saves D one header / payload / ack exchange (several event-loop turns) per group.
DEFAULT_MAX_GROUPS = 4


def layer_groups(num_layers: int, max_groups: int = DEFAULT_MAX_GROUPS) -> tuple[range, ...]:
    """Layers in send order: the last layer alone (the chunk left after the forward is small), the others
    split into at most max_groups - 1 near-equal groups. max_groups=1: one group of every layer."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if max_groups < 1:
        raise ValueError(f"max_groups={max_groups} must be >= 1")
    if max_groups == 1 or num_layers == 1:
        return (range(num_layers),)
    rest = num_layers - 1
    n = min(rest, max_groups - 1)
    bounds = [round(i * rest / n) for i in range(n + 1)]
    return tuple(range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)) + (range(rest, num_layers),)


@dataclass(frozen=True)
class KvExportChunk:
    """Layers [layer, layer + num_layers) of pages [first_page, first_page + n) of the request's page list."""

    request_id: str
    layer: int
    num_layers: int
    first_page: int  # index into the request's pages (in token order)
    pages: torch.Tensor  # [num_layers, n, page_size, kv_dim], a copy
    ready: torch.cuda.Event | None  # CUDA: the copy is complete once this event passed

    @property
    def end_page(self) -> int:
        return self.first_page + self.pages.shape[1]


@dataclass(frozen=True)
class ExportRow:
    """One request of a forward: tokens [start, end) computed by it."""

    request_id: str
    page_ids: Sequence[int]
    start: int
    end: int
    num_prompt_tokens: int


@dataclass
class _Work:
    request_id: str
    starts: list[int]  # per layer group: its first page to pack (index into the request's pages)
    end: int  # pages [start, end) of each group are complete after this forward
    index: torch.Tensor  # the ids of pages [min(starts), end), on the cache's device
    complete: bool  # the prompt ends in this forward


class KvExporter:
    """Packs tracked requests' pages as forwards complete them; `publish(chunks)` gets each layer group's
    chunks (on the engine thread: it must only hand them on, e.g. `call_soon_threadsafe`).

    Progress is kept per layer group and advances only when a group is packed: a forward that raises midway
    leaves its unpacked groups where they were, and the request's next forward (a failed batch is re-run one
    request at a time) packs them from there — every (layer, page) is published exactly once."""

    def __init__(
        self,
        caches: list[torch.Tensor],
        page_size: int,
        publish: Callable[[list[KvExportChunk]], None],
        max_chunk_bytes: int,
        max_groups: int = DEFAULT_MAX_GROUPS,
    ) -> None:
        if max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes={max_chunk_bytes} must be >= 1")
        self.caches = caches
        self.page_size = page_size
        self.publish = publish
        self.max_chunk_bytes = max_chunk_bytes
        self.groups = layer_groups(len(caches), max_groups)
        self.page_bytes = caches[0][0].numel() * caches[0].element_size()
        device = caches[0].device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: dict[str, list[int]] = {}  # tracked request -> per group, its first page not yet packed

    # -- which requests (engine thread, between steps) --------------------------------------------------------

    def track(self, request_id: str, first_page: int = 0) -> None:
        """Export the request's pages from `first_page` on (pages before it are not sent)."""
        if first_page < 0:
            raise ValueError(f"first_page={first_page} must be >= 0")
        self._next[request_id] = [first_page] * len(self.groups)

    def forget(self, request_id: str) -> None:
        self._next.pop(request_id, None)

    def is_tracked(self, request_id: str) -> bool:
        return request_id in self._next

    # -- per forward (engine thread) --------------------------------------------------------------------------

    def order_before_forward(self) -> None:
        """The next forward's writes wait for every pack queued so far (they read pages it may reuse)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def begin(self, rows: Sequence[ExportRow]) -> ExportStep | None:
        """The pages this forward completes of the tracked requests among `rows`; None when there are none."""
        work = []
        for row in rows:
            starts = self._next.get(row.request_id)
            if starts is None:
                continue
            complete = row.end >= row.num_prompt_tokens
            end = -(-row.num_prompt_tokens // self.page_size) if complete else row.end // self.page_size
            end = min(end, len(row.page_ids))
            first = min(starts)
            if end <= first:
                if complete:  # nothing left to send (D had every page)
                    del self._next[row.request_id]
                continue
            ids = torch.tensor(list(row.page_ids[first:end]), dtype=torch.long)
            work.append(_Work(row.request_id, list(starts), end, ids, complete))
        if not work:
            return None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):  # uploads ordered before the packs that read them
                for w in work:
                    w.index = w.index.pin_memory().to(self.stream.device, non_blocking=True)
        return ExportStep(self, work)

    def _packed(self, w: _Work, group: int) -> None:
        starts = self._next.get(w.request_id)
        if starts is None:
            return
        starts[group] = max(starts[group], w.end)
        if w.complete and min(starts) >= w.end:
            del self._next[w.request_id]


class ExportStep:
    """One forward's exports: `layer_written(i)` after layer i's KV is in the cache, `finish()` after the
    forward was launched (packs the groups no layer signal packed: all of them for a decode-path forward).
    A forward that raises calls neither: its unpacked groups stay for the request's next forward."""

    def __init__(self, exporter: KvExporter, work: list[_Work]) -> None:
        self.exporter = exporter
        self.work = work
        self._last_layer = {g[-1]: gi for gi, g in enumerate(exporter.groups)}
        self._done = [False] * len(exporter.groups)

    def layer_written(self, layer: int) -> None:
        group = self._last_layer.get(layer)
        if group is not None and not self._done[group]:
            self._pack(group)

    def finish(self) -> None:
        for group in range(len(self._done)):
            if not self._done[group]:
                self._pack(group)

    def _pack(self, group: int) -> None:
        self._done[group] = True
        ex = self.exporter
        layers = ex.groups[group]
        caches = ex.caches[layers.start : layers.stop]
        max_pages = max(1, ex.max_chunk_bytes // (len(layers) * ex.page_bytes))
        stream = ex.stream
        if stream is not None:
            written = torch.cuda.Event()
            written.record()  # on the forward's stream, right after the layer group's KV write
            stream.wait_event(written)
        chunks = []
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for w in self.work:
                start = w.starts[group]
                if start >= w.end or not ex.is_tracked(w.request_id):
                    continue
                first = min(w.starts)  # w.index holds pages [first, end)
                for a in range(start, w.end, max_pages):
                    b = min(w.end, a + max_pages)
                    out = torch.empty(len(caches), b - a, *caches[0].shape[1:], dtype=caches[0].dtype,
                                      device=caches[0].device)  # fmt: skip
                    pack_kv(caches, w.index[a - first : b - first], out=out)
                    chunks.append(KvExportChunk(w.request_id, layers.start, len(layers), a, out, None))
                ex._packed(w, group)
            ready = None
            if stream is not None and chunks:
                # blocking: whoever waits for it (a thread of the worker's) sleeps rather than spins for the
                # rest of the forward — the chunk is out early, its wait may be long
                ready = torch.cuda.Event(blocking=True)
                ready.record(stream)
        if chunks:
            ex.publish([dataclasses.replace(c, ready=ready) for c in chunks])
