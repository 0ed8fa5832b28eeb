"""The loop a worker runs its engine in, shared by the prefill, decode and colocated services.

The engine is single-threaded and its `step()` blocks for a whole forward. `EngineLoop.run()` (a TaskGroup
task) starts one engine thread that steps back to back while there is work; everything else that changes
the engine (`reserve_kv`, `add_request`, `abort`, ...) goes through `call()`, which queues it for that thread,
so it lands between two steps (every command waiting runs before the next step). A step's outputs are posted
to the event loop (per-request queues, `subscribe`), which streams them; on CPU the two take turns (see
`EngineLoop`).

`on_step(outputs)` hooks run in the event loop right after a step while the engine thread waits for them,
before anything else can touch the engine (the prefill worker packs newly computed pages there).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
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


def stop_ucx(reset: bool = True) -> None:
    """At exit, after every endpoint and listener closed: stops ucxx's notifier thread (the process would not
    exit while it runs) and, with `reset`, shuts UCX down. A role process skips the reset: ucxx's reset
    garbage-collects, which can block for many seconds on other objects' finalizers, and the process ends with
    os._exit right after (`moemesh.cli.entry`)."""
    if not reset:
        UcxRuntime.stop_notifier()
        return
    try:
        UcxRuntime.reset()
    except Exception as err:  # something still holds the context: the notifier thread stopped all the same
        log.info("UCX reset at exit: %s", str(err).splitlines()[0])


@dataclass
class _Command:
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    future: asyncio.Future
    started: bool = False
    done_s: float = 0.0  # time.monotonic() when fn returned on the engine thread


class EngineLoop:
    """Owns the engine's thread of control. Lifecycle: `run()` in a TaskGroup until cancelled.

    On CPU the engine thread and the event loop are both Python under one GIL, and every torch op of a step
    hands the GIL back and forth: event-loop work (gRPC streaming) done *during* a step cost the step 20-30 %
    more than the same work done between steps. So on CPU (the defaults follow the engine's device):
    * exclusive: the event loop is parked (blocked, GIL released) for the length of each step; gRPC's core
      threads keep the sockets moving meanwhile, and the loop catches up between steps. Not while
      `loop_needed()` says the loop has latency-bound work (a decode worker receiving KV: parking it would
      hold every chunk's completion for a step); a prefill worker is never exclusive (its loop sends each
      layer's KV while the forward goes on);
    * drain_s: after posting a step's outputs the engine thread waits up to this long for the event loop to
      stream them (`DRAIN_TURNS` turns of its own) before the next step, so tokens leave before it, not after.
    On CUDA neither (a step mostly waits for the device with the GIL released; the loop overlaps it)."""

    DRAIN_TURNS = 4

    def __init__(self, engine: Engine, drain_s: float | None = None, exclusive: bool | None = None) -> None:
        self.engine = engine
        on_cpu = engine.device.type != "cuda"
        self.drain_s = drain_s if drain_s is not None else (0.005 if on_cpu else 0.0)
        self.exclusive = exclusive if exclusive is not None else on_cpu
        self.loop_needed: Callable[[], bool] = lambda: False
        self.on_step: list[Callable[[list[RequestOutput]], None]] = []
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._commands: collections.deque[_Command] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._event_loop: asyncio.AbstractEventLoop | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs fn(*args) on the engine's thread between two steps (inline while `run()` is not running).
        A caller cancelled before fn started leaves it unrun; once it started, the caller gets its result and
        the cancellation is delivered at its next await (as if it came right after)."""
        result, _ = await self.call_at(fn, *args, **kwargs)
        return result

    async def call_at(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
        """`call`, and the time.monotonic() at which fn returned on the engine thread (the caller may resume
        a step later on CPU, where the event loop is parked while a step runs)."""
        if self._thread is None:
            return fn(*args, **kwargs), time.monotonic()
        command = _Command(fn, args, kwargs, self._loop().create_future())
        with self._cond:
            self._commands.append(command)
            self._cond.notify()
        try:
            return await asyncio.shield(command.future), command.done_s
        except asyncio.CancelledError:
            with self._cond:
                if not command.started:
                    self._commands.remove(command)
                    raise
            result = await command.future  # it ran or is running: its result must reach the caller
            task = asyncio.current_task()
            if task is not None:
                task.cancel()
            return result, command.done_s

    def subscribe(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        """A queue of the request's outputs; subscribe before adding the request. unsubscribe when done."""
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def run(self) -> None:
        """Starts the engine thread and returns only when cancelled (then stops the thread after its step)."""
        if self._thread is not None:
            raise RuntimeError("EngineLoop.run() is already running")
        self._event_loop = asyncio.get_running_loop()
        self._stopping = False
        ended: asyncio.Future[None] = self._event_loop.create_future()
        thread = threading.Thread(target=self._main, args=(ended,), name="engine", daemon=True)
        self._thread = thread
        thread.start()
        try:
            await asyncio.shield(ended)
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            await asyncio.to_thread(thread.join)
            self._thread = None
            with self._cond:
                leftover, self._commands = list(self._commands), collections.deque()
            for command in leftover:
                if not command.future.done():
                    command.future.set_exception(RuntimeError("the engine loop stopped"))

    # -- the engine thread --------------------------------------------------------------------------------------

    def _main(self, ended: asyncio.Future[None]) -> None:
        try:
            while self._turn():
                pass
        except BaseException as err:  # a bug in the loop itself: never leave run() waiting on a dead thread
            log.exception("the engine loop crashed")
            self._post(lambda err=err: ended.done() or ended.set_exception(err))
        else:
            self._post(lambda: ended.done() or ended.set_result(None))

    def _turn(self) -> bool:
        """The commands waiting, then one step if there is work. False once stopping."""
        with self._cond:
            while not self._stopping and not self._commands and not self.engine.has_unfinished():
                self._cond.wait()
            if self._stopping:
                return False
            commands, self._commands = list(self._commands), collections.deque()
            for command in commands:
                command.started = True
        for command in commands:
            self._run_command(command)
        if not self.engine.has_unfinished():
            return True
        resume = self._park_event_loop() if self.exclusive and not self.loop_needed() else None
        try:
            outputs = self.engine.step()
        except Exception as err:  # a failed step fails its requests, not the worker
            log.exception("engine step failed")
            self._post(lambda err=err: self._fail_all(err))
            return True
        finally:
            if resume is not None:
                resume.set()
        if self.on_step:  # the hooks run in the event loop, before anything else touches the engine
            self._wait(asyncio.run_coroutine_threadsafe(self._run_hooks(outputs), self._loop()), None)
        if outputs:
            drained = concurrent.futures.Future() if self.drain_s > 0 else None
            self._post(lambda: self._deliver(outputs, drained))
            if drained is not None:
                self._wait(drained, self.drain_s)
        elif not self.engine.num_running:  # nothing admissible yet (pages short): let others free some
            with self._cond:
                if not self._commands:
                    self._cond.wait(0.01)
        return True

    def _wait(self, future: concurrent.futures.Future, timeout_s: float | None) -> None:
        """Waits for a future the event loop completes, up to timeout_s (None: until done or stopping)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stopping:
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return
            try:
                future.result(timeout=left)
                return
            except concurrent.futures.TimeoutError:
                continue
            except Exception:
                log.exception("an on_step hook failed")
                return

    def _park_event_loop(self) -> threading.Event:
        """Has the event loop block (GIL released) until the returned event is set; waits up to drain_s for it
        to get there (a busy loop parks later, or finds the event set already)."""
        parked, resume = threading.Event(), threading.Event()

        def park() -> None:
            parked.set()
            resume.wait(timeout=5.0)

        self._post(park)
        parked.wait(timeout=max(self.drain_s, 0.001))
        return resume

    def _run_command(self, command: _Command) -> None:
        try:
            result = command.fn(*command.args, **command.kwargs)
            command.done_s = time.monotonic()
        except BaseException as err:
            self._post(lambda err=err: command.future.done() or command.future.set_exception(err))
        else:
            self._post(lambda: command.future.done() or command.future.set_result(result))

    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self._event_loop is not None
        return self._event_loop

    def _post(self, fn: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is left to tell
            self._loop().call_soon_threadsafe(fn)

    # -- the event loop -------------------------------------------------------------------------------------------

    async def _run_hooks(self, outputs: list[RequestOutput]) -> None:
        for hook in self.on_step:
            hook(outputs)

    def _deliver(self, outputs: list[RequestOutput], drained: concurrent.futures.Future | None) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        if drained is not None:
            asyncio.ensure_future(self._mark_drained(drained))

    async def _mark_drained(self, drained: concurrent.futures.Future) -> None:
        for _ in range(self.DRAIN_TURNS):  # the consumers woken above run, write, and see their writes done
            await asyncio.sleep(0)
        drained.set_result(None)

    def _fail_all(self, err: Exception) -> None:
        for rid, queue in list(self._queues.items()):
            queue.put_nowait(err)
            with self._cond:
                self._commands.append(_Command(self.engine.abort, (rid,), {}, self._loop().create_future()))
                self._cond.notify()
