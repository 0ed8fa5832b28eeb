"""Process supervision for `moemesh up`: every role runs as its own child process
(`python -m moemesh.cli serve <role> ...`), the parent waits until all are healthy, prints
`ready on HOST:PORT`, and stops them all on SIGINT / SIGTERM / SIGHUP — leaving no orphans.

A child that exits while the mesh serves is handled as a cluster would: the parent says so, tells the gateway
to stop routing to it at once (`forget`), and starts it again after a backoff (`RestartPolicy`: 1 s, 2 s,
4 s, ..., at most `max_restarts` times in a row), while the rest keep serving. `fail_fast=True` (`up
--fail-fast`) stops the whole mesh instead, with exit status 1.

How no child outlives the parent:
* each child is the leader of its own process group, so a terminal's Ctrl-C reaches the parent only, and the
  parent stops children in order (front first) by signalling each group (the child and anything it spawned);
* a child given `--parent-pid` asks the kernel for SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG) and
  also polls its parent id, so even a SIGKILLed parent leaves nothing running;
* stop() sends SIGTERM, waits `stop_grace_s`, then SIGKILLs the group, and reaps every child.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from moemesh.config.devices import plan_devices
from moemesh.config.security import SecurityConfig, TlsFiles
from moemesh.console import Console, pump_lines
from moemesh.transport.channels import wait_until_serving

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """One role process. `serve_args` follow `python -m moemesh.cli serve`; `port` is its gRPC port."""

    name: str  # "gateway", "prefill-0", ...
    serve_args: tuple[str, ...]
    port: int
    host: str = "127.0.0.1"
    http_port: int = 0  # its HTTP port (/metrics; the gateway's also serves the OpenAI API); 0 = none
    env: tuple[tuple[str, str], ...] = ()  # set in the child's environment (CUDA_VISIBLE_DEVICES)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.http_port}/metrics" if self.http_port else None


@dataclass(frozen=True)
class RestartPolicy:
    """How a child that exited comes back: after `backoff_s`, doubling with each restart in a row up to
    `max_backoff_s`; after `max_restarts` restarts in a row it stays down (the mesh serves on without it). A
    child that ran `reset_after_s` since its last start begins a new row. max_restarts=0: never restart."""

    max_restarts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts} must be >= 0")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(f"backoff_s={self.backoff_s} must be in [0, max_backoff_s={self.max_backoff_s}]")

    def delay_s(self, restart: int) -> float:
        """The wait before restart number `restart` (1, 2, ...) of a row."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (restart - 1))


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    log_lines: list[str] = field(default_factory=list)
    started_s: float = field(default_factory=time.monotonic)
    restarts: int = 0  # restarts in the current row
    restart_at_s: float | None = None  # exited, to be started again at this time
    given_up: bool = False  # exited once too often: stays down
    serving: bool = True  # False from a restart until its health says SERVING

    @property
    def pid(self) -> int:
        return self.process.pid


class StartupError(RuntimeError):
    """A child exited or did not become healthy in time; the message names it and shows its last output."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (all held at once while choosing, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(host: str, port: int) -> bool:
    """True when a server could not listen on host:port now (SO_REUSEADDR as gRPC sets it, so sockets left in
    TIME_WAIT do not count). OSError for a host that does not resolve or is not this machine's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Called early in a child: SIGTERM to ourselves when `parent_pid` is gone. Uses PR_SET_PDEATHSIG where
    the kernel has it, plus a daemon thread that polls the parent id (covers the race where the parent died
    before we got here, and non-Linux systems)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        log.warning("parent %d is gone; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Supervisor:
    """Starts, health-checks and stops a set of role processes.

    Lifecycle: start() -> wait_ready() -> (serve) -> stop(). run() does all of it and blocks until a signal
    or an unexpected child exit. stop() is idempotent and always reaps every child.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        startup_timeout_s: float = 300.0,
        stop_grace_s: float = 10.0,
        python: str = sys.executable,
        out: TextIO | None = None,
        fail_fast: bool = False,
        restart: RestartPolicy | None = None,
        forget: Callable[[str], object] | None = None,
        tls: TlsFiles | None = None,
        console: Console | None = None,
        prefix_lines: bool = True,
    ) -> None:
        """fail_fast: any child's exit stops the mesh (exit 1). Otherwise a child that exits is reported,
        `forget(name)` is called for a worker (the gateway drops it from routing), and it is restarted under
        `restart` (default RestartPolicy()) while the others serve on.
        console: where the children's lines go, whole (default: stderr; the messages: `out`);
        prefix_lines: "[name] " before each child's line (not for JSON lines, which name their worker)."""
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be distinct, got {names}")
        self.specs = list(specs)
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.python = python
        self.out = out or sys.stdout
        self.fail_fast = fail_fast
        self.restart = restart or RestartPolicy()
        self.forget = forget
        self.tls = tls  # the health checks' client identity when the mesh runs mutual TLS
        self.console = console or Console(self.out, sys.stderr)
        self.prefix_lines = prefix_lines
        self.children: list[Child] = []
        self._stop = threading.Event()
        self._stop_signal: int | None = None

    def start(self) -> None:
        for spec in self.specs:
            self.children.append(self._spawn(spec))
            metrics = f" (metrics {spec.metrics_url})" if spec.metrics_url else ""
            self.console.say(f"started {spec.name} pid={self.children[-1].pid} on {spec.address}{metrics}")

    def _spawn(self, spec: ChildSpec) -> Child:
        argv = [
            self.python,
            "-m",
            "moemesh.cli",
            "serve",
            *spec.serve_args,
            "--parent-pid",
            str(os.getpid()),
        ]
        process = subprocess.Popen(
            argv,
            env={**os.environ, **dict(spec.env)} if spec.env else None,
            process_group=0,  # its own group: Ctrl-C on the terminal reaches the parent only
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        child = Child(spec, process)
        threading.Thread(target=self._pump, args=(child,), name=f"log-{spec.name}", daemon=True).start()
        return child

    def wait_ready(self) -> None:
        """Blocks until every child's health says SERVING; StartupError when one exits or time runs out."""
        deadline = time.monotonic() + self.startup_timeout_s
        for child in self.children:
            while not self._stop.is_set():
                self._raise_if_exited(child)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StartupError(
                        f"{child.spec.name} not healthy after {self.startup_timeout_s} s" + _tail(child)
                    )
                if wait_until_serving(child.spec.address, timeout_s=min(1.0, remaining), tls=self.tls):
                    break

    def stop(self) -> None:
        """SIGTERM each child's process group (front first), wait stop_grace_s, SIGKILL what is left, reap."""
        for child in self.children:
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %s s; killing it", child.spec.name, child.pid,
                            self.stop_grace_s)  # fmt: skip
        for child in self.children:
            _signal_group(child.process, signal.SIGKILL)  # also whatever the child left in its group
            child.process.wait()

    def run(self, ready_message: str, on_ready: Callable[[], None] | None = None) -> int:
        """start + wait_ready, print `ready_message`, serve until SIGINT/SIGTERM/SIGHUP or a child exits,
        then stop all. Returns 0 after a signal, 1 when a child failed. Call from the main thread.
        `on_ready()` runs once everything is healthy, in a daemon thread (`moemesh up --demo-prompt`)."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        try:
            self.start()
            self.wait_ready()
            if self._stop.is_set():
                return 0
            self.console.say(ready_message)
            if on_ready is not None:
                threading.Thread(target=on_ready, name="on-ready", daemon=True).start()
            return self._watch()
        except StartupError as err:
            self.console.line(f"error: {err}")
            return 1
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _watch(self) -> int:
        while not self._stop.wait(0.2):
            for i, child in enumerate(self.children):
                if child.given_up:
                    continue
                if child.restart_at_s is not None:
                    if time.monotonic() >= child.restart_at_s:
                        self.children[i] = self._restart(child)
                    continue
                code = child.process.poll()
                if code is None:
                    if not child.serving and wait_until_serving(
                        child.spec.address, timeout_s=0.1, tls=self.tls
                    ):
                        child.serving = True
                        self.console.say(f"{child.spec.name} is serving again")
                    continue
                if self.fail_fast:
                    self.console.line(f"error: {child.spec.name} (pid {child.pid}) exited with {code}; stopping "
                                      "the mesh (--fail-fast)" + _tail(child))  # fmt: skip
                    return 1
                if not self._schedule_restart(child, code) and child.spec.name == "gateway":
                    return 1  # no front door, nothing to serve
        self.console.say(f"stopping ({signal.Signals(self._stop_signal).name})")
        return 0

    def _schedule_restart(self, child: Child, code: int) -> bool:
        """Reports an exit, tells the gateway, and sets the restart time; False when the child stays down."""
        name = child.spec.name
        self.console.line(f"warning: {name} (pid {child.pid}) exited with {code}; the mesh serves on without it"
                          + _tail(child))  # fmt: skip
        if self.forget is not None and name != "gateway":
            self.forget(name)
        if time.monotonic() - child.started_s >= self.restart.reset_after_s:
            child.restarts = 0
        if child.restarts >= self.restart.max_restarts:
            child.given_up = True
            self.console.line(f"error: {name} exited after {child.restarts} restart(s) in a row (max_restarts="
                              f"{self.restart.max_restarts}); not restarting it")  # fmt: skip
            return False
        delay_s = self.restart.delay_s(child.restarts + 1)
        child.restart_at_s = time.monotonic() + delay_s
        self.console.say(f"restarting {name} in {delay_s:g} s (restart {child.restarts + 1} of "
                         f"{self.restart.max_restarts})")  # fmt: skip
        return True

    def _restart(self, old: Child) -> Child:
        child = self._spawn(old.spec)
        child.restarts, child.serving = old.restarts + 1, False
        self.console.say(f"restarted {old.spec.name} pid={child.pid} on {old.spec.address} (restart "
                         f"{child.restarts} of {self.restart.max_restarts})")  # fmt: skip
        return child

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum
        self._stop.set()

    def _raise_if_exited(self, child: Child) -> None:
        code = child.process.poll()
        if code is not None:
            raise StartupError(
                f"{child.spec.name} (pid {child.pid}) exited with {code} while starting" + _tail(child)
            )

    def _pump(self, child: Child) -> None:
        """Copies a child's output, prefixed by its name, and keeps the last lines for error messages."""
        assert child.process.stdout is not None

        def keep(line: str) -> None:
            child.log_lines = [*child.log_lines[-19:], line]

        prefix = f"[{child.spec.name}] " if self.prefix_lines else ""
        pump_lines(child.process.stdout, prefix, self.console, keep)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    if process.returncode is not None and signum == signal.SIGTERM:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _tail(child: Child) -> str:
    return ("; last output:\n  " + "\n  ".join(child.log_lines[-10:])) if child.log_lines else ""


TOPOLOGIES = ("colocated", "pd", "pd-experts")
METRICS_ROLES = ("prefill", "decode", "colocated", "expert")  # the roles that serve /metrics on --http-port


@dataclass(frozen=True)
class UpOptions:
    """What `moemesh up` starts: the gateway on `port`, then the workers of `topology` on free ports."""

    model: str = "demo"
    topology: str = "pd"
    num_prefill: int = 1
    num_decode: int = 1
    num_expert: int = 1
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000  # the gateway's; workers get free ports for their /metrics; 0: no HTTP anywhere
    torch_threads: int | None = None  # per worker; None: on CPU the cores split among the workers
    security: SecurityConfig = field(default_factory=SecurityConfig)  # mutual TLS, API keys
    # per role ("prefill" -> 0.3; moemesh/config/devices.py): its share of its GPU instead of an even split
    gpu_memory_fractions: tuple[tuple[str, float], ...] = ()
    child_args: tuple[str, ...] = ()  # flags every child gets (telemetry: TelemetryConfig.child_args())
    mesh_id: str = ""  # every child gets it; the gateway's registry admits only workers that name it

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [1, 65535]")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads} must be >= 1")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology={self.topology!r} must be one of {', '.join(TOPOLOGIES)}")
        for name in ("num_prefill", "num_decode", "num_expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port={self.http_port} must be in [0, 65535] (0 = no HTTP)")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device={self.device!r} must be 'cpu', 'cuda' or 'auto'")


def count_gpus() -> int:
    """GPUs this process may use (torch's count honours CUDA_VISIBLE_DEVICES; NVML, no CUDA context)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_children(options: UpOptions, num_gpus: int | None = None) -> list[ChildSpec]:
    """The role processes of one mesh, gateway first (so stop() closes the front door first). On CUDA each
    worker gets a GPU and a share of its memory (`plan_devices`); num_gpus None counts this machine's.
    ValueError when device='cuda' finds no GPU or the fractions overcommit one."""
    o = options
    gateway = f"{o.host}:{o.port}"
    roles: list[tuple[str, str]] = []  # (role, name)
    if o.topology == "colocated":
        roles += [("colocated", f"colocated-{i}") for i in range(o.num_decode)]
    else:
        roles += [("prefill", f"prefill-{i}") for i in range(o.num_prefill)]
        roles += [("decode", f"decode-{i}") for i in range(o.num_decode)]
    if o.topology == "pd-experts":
        roles += [("expert", f"expert-{i}") for i in range(o.num_expert)]
    chosen = free_ports(2 * len(roles), o.host)  # one call: gRPC and HTTP ports all distinct
    ports, http_ports = chosen[: len(roles)], (chosen[len(roles) :] if o.http_port else [0] * len(roles))
    if num_gpus is None:
        num_gpus = 0 if o.device == "cpu" else count_gpus()
    device = ("cuda" if num_gpus else "cpu") if o.device == "auto" else o.device
    common = ("--host", o.host, "--model", o.model, "--device", device)
    if o.security.tls_dir:
        common += ("--tls-dir", o.security.tls_dir)
    if o.mesh_id:
        common += ("--mesh-id", o.mesh_id)
    gateway_args = ("gateway", *common, "--port", str(o.port), "--http-port", str(o.http_port),
                    "--topology", o.topology)  # fmt: skip
    if o.security.api_keys_file:
        gateway_args += ("--api-keys", o.security.api_keys_file)
    specs = [ChildSpec("gateway", (*gateway_args, *o.child_args), o.port, o.host, o.http_port)]
    threads = o.torch_threads
    if threads is None and device == "cpu":  # OpenMP threads of several workers must not fight for cores
        threads = max(1, (os.cpu_count() or 1) // len(roles))
    num_expert = sum(role == "expert" for role, _ in roles)
    placements = plan_devices([role for role, _ in roles], device, num_gpus, dict(o.gpu_memory_fractions),
                              os.environ.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
    for (role, name), port, http_port, place in zip(roles, ports, http_ports, placements, strict=True):
        args = (role, *common, "--port", str(port), "--registry", gateway, "--worker-id", name, *o.child_args)
        if threads is not None:
            args += ("--torch-threads", str(threads))
        if role == "expert":  # expert-i hosts the i-th of N balanced shards of every MoE layer's experts
            args += ("--experts", f"{name.rpartition('-')[2]}/{num_expert}")
        elif o.topology == "pd-experts":
            args += ("--remote-experts",)
        if role not in METRICS_ROLES:
            http_port = 0
        if http_port:
            args += ("--http-port", str(http_port))
        args += place.serve_args  # an expert worker's share caps its allocator (its weights, its batches)
        specs.append(ChildSpec(name, args, port, o.host, http_port, place.env))
    return specs
