"""The loop a worker runs its engine in, shared by the prefill, decode and colocated services.

The engine is single-threaded and its `step()` blocks for a whole forward. `EngineLoop.run()` (a TaskGroup
task) runs each step in a thread while holding `lock`; everything else that touches the engine
(`reserve_kv`, `add_request`, `abort`, ...) goes through `call()`, which takes the same lock, so it lands
between two steps. asyncio.Lock is fair, so a waiting call gets in before the next step.

Outputs go to per-request queues (`subscribe`); `on_step(outputs)` hooks run under the lock right after a
step, before anything else can touch the engine (the prefill worker packs newly computed pages there).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from moemesh.config.mesh import WorkerConfig
from moemesh.engine.engine import Engine, RequestOutput
from moemesh.model.checkpoint import load_model
from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import Tokenizer
from moemesh.transport.kv import Fingerprint, KvLayout
from moemesh.transport.ucx import UcxOptions, UcxRuntime

log = logging.getLogger(__name__)
T = TypeVar("T")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


_KV_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class LoadedModel:
    engine: Engine
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    model_id: str  # directory name + a hash of config.json: what P and D compare at handshake

    @property
    def kv_layout(self) -> KvLayout:
        e = self.engine
        cache = e.kv_caches[0]  # [num_pages, page_size, kv_lora_rank + qk_rope_head_dim]
        return KvLayout(_KV_DTYPES[cache.dtype], e.config.page_size, cache.shape[2] * cache.element_size(),
                        len(e.kv_caches))  # fmt: skip

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.model_id, self.kv_layout)


def load_engine(config: WorkerConfig) -> LoadedModel:
    """The checkpoint and an Engine over it, as `LLM` builds them (so greedy outputs are the same)."""
    model_dir = config.model_dir
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))  # fmt: skip
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[config.dtype]
    model_config = ModelConfig.from_file(model_dir / "config.json")
    model = load_model(model_dir, device, dtype, progress=False)
    tokenizer = Tokenizer(model_dir, model_config) if (model_dir / "tokenizer.json").is_file() else None
    eos = tokenizer.eos_token_ids if tokenizer else model_config.eos_token_id
    # No tokenizer in the engine: workers stream token ids; the gateway detokenizes and matches stop strings.
    engine = Engine(model, config.engine, None, tuple(eos))
    digest = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:12]
    return LoadedModel(engine, model_config, tokenizer, f"{model_dir.name}@{digest}")


def ucx_options(config: WorkerConfig) -> UcxOptions:
    """UCX progress in ucxx's own thread, requests completed by its notifier thread: nothing polls the event loop
    (the blocking / polling modes spin ~0.5 core per worker while a receive is pending, i.e. always)."""
    return UcxOptions(
        config.ucx_transports, config.ucx_net_devices, progress_mode="thread", notifier_thread=True
    )


def stop_ucx() -> None:
    """At exit, after every endpoint and listener closed: stops ucxx's notifier thread (the process would not
    exit while it runs) and shuts UCX down."""
    try:
        UcxRuntime.reset()
    except Exception as err:  # something still holds the context: the notifier thread stopped all the same
        log.info("UCX reset at exit: %s", str(err).splitlines()[0])


class EngineLoop:
    """Owns the engine's thread of control. Lifecycle: `run()` in a TaskGroup until cancelled."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = asyncio.Lock()
        self.on_step: list[Callable[[list[RequestOutput]], None]] = []
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wake = asyncio.Event()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs fn(*args) on the engine between two steps; wakes the loop (fn may have added work)."""
        async with self.lock:
            result = fn(*args, **kwargs)
        self._wake.set()
        return result

    def subscribe(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        """A queue of the request's outputs; subscribe before adding the request. unsubscribe when done."""
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
            async with self.lock:
                try:
                    outputs = await asyncio.to_thread(self.engine.step)
                except Exception as err:  # a failed step fails its requests, not the worker
                    log.exception("engine step failed")
                    self._fail_all(err)
                    continue
                for hook in self.on_step:
                    hook(outputs)
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            if not outputs and not self.engine.num_running:
                await asyncio.sleep(0.01)  # nothing admissible yet (pages short): let others free some

    def _fail_all(self, err: Exception) -> None:
        for rid, queue in list(self._queues.items()):
            queue.put_nowait(err)
            self.engine.abort(rid)
