"""The serving benchmark's peer: moemesh's engine in this process (`Engine.step()` as `LLM.generate` drives it)
behind the same Backend interface as a live endpoint, so one arrival schedule drives both.

One thread owns the engine: between steps it admits what the event loop queued, then hands each step's new
tokens back to the waiting streams (loop.call_soon_threadsafe). No gRPC, no detokenization at a gateway, no
process hop: what is left is the engine's own scheduling and compute (and the client's event loop sharing this
process's GIL with the engine thread, which the mesh's client does not)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moemesh.benchmark.backends import StreamEvent
from moemesh.benchmark.workload import RequestSpec


@dataclass(frozen=True)
class _Admit:
    prompt_ids: list[int]
    output_len: int
    tokens: asyncio.Queue  # (num_tokens, finished) per step
    loop: asyncio.AbstractEventLoop


class InProcessBackend:
    name = "in-process"

    def __init__(self, llm) -> None:
        self.llm = llm
        self._inbox: queue.SimpleQueue[_Admit] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    async def vocab_size(self) -> int:
        return self.llm.config.vocab_size

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        if spec.prompt_token_ids is None:
            raise ValueError("the in-process peer takes token-id prompts only")
        if self._error is not None:
            raise RuntimeError(f"the engine thread failed: {self._error!r}")
        tokens: asyncio.Queue = asyncio.Queue()
        self._inbox.put(
            _Admit(list(spec.prompt_token_ids), spec.output_len, tokens, asyncio.get_running_loop())
        )
        while True:
            item = await tokens.get()
            if isinstance(item, BaseException):
                raise RuntimeError(f"the engine thread failed: {item!r}")
            num_tokens, finished = item
            yield StreamEvent(num_tokens)
            if finished:
                return

    async def aclose(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)

    def _loop(self) -> None:
        from moemesh import SamplingParams

        engine = self.llm.engine
        streams: dict[str, _Admit] = {}
        try:
            while not self._stop.is_set():
                try:  # block briefly when idle, never while requests run
                    item = self._inbox.get(timeout=0.05) if not streams else self._inbox.get_nowait()
                except queue.Empty:
                    item = None
                while item is not None:
                    params = SamplingParams(max_tokens=item.output_len, temperature=0, ignore_eos=True)
                    streams[engine.add_request(item.prompt_ids, params)] = item
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if not streams:
                    continue
                for out in engine.step():
                    admit = streams[out.request_id]
                    admit.loop.call_soon_threadsafe(
                        admit.tokens.put_nowait, (len(out.new_token_ids), out.finished)
                    )
                    if out.finished:
                        del streams[out.request_id]
        except BaseException as err:  # noqa: BLE001 - handed to every waiting stream, then re-raised
            self._error = err
            for admit in streams.values():
                admit.loop.call_soon_threadsafe(admit.tokens.put_nowait, err)
            raise
