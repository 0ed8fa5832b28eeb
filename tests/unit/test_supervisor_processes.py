"""`moemesh up`'s supervisor with trivial health-only children: it reports ready only when every child is
SERVING, and however the parent goes (SIGTERM, a terminal's Ctrl-C, SIGKILL, a failed child), no child
process is left."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moemesh.supervisor import UpOptions, free_ports, plan_children

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import sys
from moemesh.supervisor import ChildSpec, RestartPolicy, Supervisor, free_ports
mode = sys.argv[1]
ports = free_ports(3)
specs = [ChildSpec(f"h{i}", ("health", "--port", str(p)), p) for i, p in enumerate(ports)]
if mode == "bad":
    specs[2] = ChildSpec("h2", ("health", "--port", "not-a-port"), ports[2])
supervisor = Supervisor(specs, startup_timeout_s=60, stop_grace_s=5, fail_fast=mode == "failfast",
                        restart=RestartPolicy(max_restarts=1, backoff_s=0.2), forget=lambda name: print("forget", name))
sys.exit(supervisor.run(f"ready on 127.0.0.1:{ports[0]}"))
"""


class Mesh:
    """The driver process plus what it printed: child pids and ports."""

    def __init__(self, mode: str = "good") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, mode],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            process_group=0,  # like a shell job: its own group, which a terminal's Ctrl-C signals
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.children: dict[str, tuple[int, int]] = {}  # name -> (pid, port)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip())
        self.lines.put("<eof>")

    def wait_for(self, pattern: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            started = re.match(r"(?:re)?started (\S+) pid=(\d+) on [\d.]+:(\d+)", line)
            if started:
                self.children[started[1]] = (int(started[2]), int(started[3]))
            if re.search(pattern, line) or line == "<eof>":
                return line

    def child_pids(self) -> list[int]:
        return [pid for pid, _ in self.children.values()]

    def cleanup(self) -> None:
        for pid in [self.process.pid, *self.child_pids()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)


def alive(pid: int) -> bool:
    """True while pid runs (a zombie awaiting its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def all_gone(pids: list[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def port_free(port: int) -> bool:
    """A new server could listen there (SO_REUSEADDR as gRPC sets it: TIME_WAIT leftovers do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


@pytest.fixture
def mesh():
    meshes: list[Mesh] = []

    def start(mode: str = "good") -> Mesh:
        meshes.append(Mesh(mode))
        return meshes[-1]

    yield start
    for m in meshes:
        m.cleanup()


def _ready(m: Mesh) -> list[int]:
    line = m.wait_for(r"^ready on ")
    assert line.startswith("ready on 127.0.0.1:"), line
    pids = m.child_pids()
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    return pids


def _health_of(port: int) -> str:
    from moemesh.transport.channels import health_status, insecure_channel

    with insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_status(channel, timeout_s=2)


def test_ready_only_when_every_child_serves_then_sigterm_to_the_parent_stops_all(mesh):
    m = mesh()
    pids = _ready(m)
    assert [_health_of(port) for _, port in m.children.values()] == ["SERVING"] * 3
    os.kill(m.process.pid, signal.SIGTERM)  # the parent alone
    assert m.process.wait(15) == 0
    assert all_gone(pids), [pid for pid in pids if alive(pid)]
    assert all(port_free(port) for _, port in m.children.values())


def test_terminal_ctrl_c_reaches_the_parent_and_it_stops_every_child(mesh):
    m = mesh()
    pids = _ready(m)
    os.killpg(m.process.pid, signal.SIGINT)  # what a terminal does: SIGINT to the foreground group
    assert m.process.wait(15) == 0
    assert all_gone(pids)


def test_children_exit_when_the_parent_is_killed_outright(mesh):
    m = mesh()
    pids = _ready(m)
    os.kill(m.process.pid, signal.SIGKILL)  # no handler runs: the children must notice by themselves
    m.process.wait(5)
    assert all_gone(pids, timeout_s=10), [pid for pid in pids if alive(pid)]


def test_with_fail_fast_a_child_that_dies_takes_the_mesh_down(mesh):
    m = mesh("failfast")
    pids = _ready(m)
    os.kill(pids[1], signal.SIGKILL)
    assert "exited with -9; stopping the mesh (--fail-fast)" in m.wait_for(r"^error: h1")
    assert m.process.wait(15) == 1
    assert all_gone(pids)


def test_a_child_that_dies_is_forgotten_and_restarted_then_left_down_past_its_limit(mesh):
    m = mesh()
    pids = _ready(m)
    port = m.children["h1"][1]
    os.kill(pids[1], signal.SIGKILL)
    assert m.wait_for(r"^forget h1") == "forget h1"  # the front stops routing to it at once
    assert m.wait_for(r"^restarting h1") == "restarting h1 in 0.2 s (restart 1 of 1)"
    line = m.wait_for(r"^restarted h1")
    assert re.fullmatch(rf"restarted h1 pid=(\d+) on 127.0.0.1:{port} \(restart 1 of 1\)", line), line
    new_pid = int(line.split("pid=")[1].split()[0])
    assert new_pid != pids[1] and alive(new_pid)
    assert m.wait_for(r"serving again") == "h1 is serving again"
    assert _health_of(port) == "SERVING"

    os.kill(new_pid, signal.SIGKILL)  # the second death in a row: past max_restarts=1, it stays down
    assert m.wait_for(r"not restarting") == (
        "error: h1 exited after 1 restart(s) in a row (max_restarts=1); not restarting it"
    )
    time.sleep(0.5)
    assert m.process.poll() is None and alive(pids[0]) and alive(pids[2])  # the others serve on
    assert _health_of(m.children["h2"][1]) == "SERVING"
    os.kill(m.process.pid, signal.SIGTERM)
    assert m.process.wait(15) == 0
    assert all_gone([pids[0], pids[2], new_pid])


def test_a_child_that_fails_to_start_is_reported_and_nothing_is_left(mesh):
    m = mesh("bad")
    m.wait_for(r"<eof>")
    assert m.process.wait(15) == 1
    assert len(m.children) == 3
    assert all_gone(m.child_pids())


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(port_free(p) for p in ports)


def test_plan_children_puts_the_gateway_first_and_points_workers_at_it():
    specs = plan_children(UpOptions(topology="pd", num_prefill=2, num_decode=1, port=50123))
    assert [s.name for s in specs] == ["gateway", "prefill-0", "prefill-1", "decode-0"]
    assert specs[0].port == 50123 and specs[0].serve_args[0] == "gateway"
    for spec in specs[1:]:
        args = list(spec.serve_args)
        assert args[args.index("--registry") + 1] == "127.0.0.1:50123"
        assert args[args.index("--port") + 1] == str(spec.port)
    assert len({s.port for s in specs}) == 4
    colocated = plan_children(UpOptions(topology="colocated", num_decode=2, port=50124))
    assert [s.serve_args[0] for s in colocated] == ["gateway", "colocated", "colocated"]
    with pytest.raises(ValueError, match="topology='ring' must be one of"):
        UpOptions(topology="ring")


def test_plan_children_gives_every_worker_an_http_port_for_its_metrics():
    specs = plan_children(
        UpOptions(topology="pd-experts", num_prefill=1, num_decode=2, port=50125, http_port=8123)
    )
    by_name = {s.name: s for s in specs}
    assert by_name["gateway"].metrics_url == "http://127.0.0.1:8123/metrics"
    workers = [by_name[n] for n in ("prefill-0", "decode-0", "decode-1", "expert-0")]
    for spec in workers:
        args = list(spec.serve_args)
        assert args[args.index("--http-port") + 1] == str(spec.http_port) != "0"
    ports = [s.port for s in specs] + [s.http_port for s in specs]
    assert len(set(ports)) == len(ports)  # all distinct
    assert by_name["expert-0"].metrics_url == f"http://127.0.0.1:{by_name['expert-0'].http_port}/metrics"
    off = plan_children(UpOptions(topology="pd", port=50126, http_port=0))
    assert [s.metrics_url for s in off] == [None, None, None]
    assert [s.serve_args.count("--http-port") for s in off] == [1, 0, 0]  # the gateway's "--http-port 0"
    with pytest.raises(ValueError, match="http_port=70000 must be in"):
        UpOptions(http_port=70000)
