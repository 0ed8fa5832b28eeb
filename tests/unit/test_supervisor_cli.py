"""`moemesh up` and `moemesh serve` flag handling: serve hands unknown flags to the role's main."""

from __future__ import annotations

import sys
import types

import pytest

from moemesh import cli


def test_serve_passes_role_specific_flags_to_the_role_main(monkeypatch):
    seen = {}

    def role_main(args):
        seen["args"] = args
        return 0

    fake = types.ModuleType("moemesh.services.expert.main")
    fake.main = role_main
    monkeypatch.setitem(sys.modules, "moemesh.services.expert.main", fake)
    assert cli.main(["serve", "expert", "--port", "5", "--registry", "h:1", "--num-experts", "8"]) == 0
    args = seen["args"]
    assert (args.role, args.port, args.registry, args.extra) == ("expert", 5, "h:1", ["--num-experts", "8"])


def test_other_subcommands_reject_unknown_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["up", "--bogus", "1"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


def test_up_rejects_a_bad_worker_count_with_the_field_named(capsys):
    assert cli.main(["up", "--decode", "0"]) == 2
    assert "num_decode=0 must be >= 1" in capsys.readouterr().err


# --- every CLI failure is one line on stderr and a non-zero status, before anything starts ---------------


def _refuses_up(capsys, monkeypatch, argv: list[str], message: str) -> None:
    """`up argv` exits 2 with exactly `error: message`, having started no process."""
    from moemesh import supervisor

    monkeypatch.setattr(supervisor.Supervisor, "run", lambda *a, **k: pytest.fail("a child was started"))
    assert cli.main(["up", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n"
    assert "started" not in captured.out


def test_up_validates_ports_and_device_before_starting_anything(capsys, monkeypatch):
    import socket

    import torch

    _refuses_up(capsys, monkeypatch, ["--port", "70000"], "port=70000 must be in [1, 65535]")
    _refuses_up(
        capsys, monkeypatch, ["--http-port", "-1"], "http_port=-1 must be in [0, 65535] (0 = no HTTP)"
    )
    _refuses_up(capsys, monkeypatch, ["--max-restarts", "-1"], "max_restarts=-1 must be >= 0")
    _refuses_up(capsys, monkeypatch, ["--startup-timeout", "0"], "startup_timeout=0.0 must be > 0")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        _refuses_up(capsys, monkeypatch, ["--port", str(port)],
                    f"port {port} is in use on 127.0.0.1 (another mesh? pick another --port)")  # fmt: skip
        _refuses_up(capsys, monkeypatch, ["--port", "0", "--http-port", str(port)],
                    f"port {port} is in use on 127.0.0.1 (another mesh? pick another --http-port)")  # fmt: skip
    _refuses_up(capsys, monkeypatch, ["--host", "192.0.2.1", "--port", "50999"],
                "host='192.0.2.1': cannot listen there (Cannot assign requested address)")  # fmt: skip
    if not torch.cuda.is_available():
        _refuses_up(capsys, monkeypatch, ["--device", "cuda"],
                    "device='cuda' but no CUDA GPU is visible (num_gpus=0)")  # fmt: skip


def test_up_port_0_picks_a_free_port_says_it_and_gives_every_child_the_mesh_id(capsys, monkeypatch):
    from moemesh import supervisor

    seen = {}

    def run(self, ready_message, on_ready=None):
        seen["specs"], seen["ready"] = self.specs, ready_message
        return 0

    monkeypatch.setattr(supervisor.Supervisor, "run", run)
    assert cli.main(["up", "--port", "0", "--decode", "2"]) == 0
    gateway = seen["specs"][0]
    assert gateway.name == "gateway" and gateway.port != 0
    assert f"--port 0: the gateway listens on free port {gateway.port}" in capsys.readouterr().out
    assert seen["ready"].startswith(f"ready on 127.0.0.1:{gateway.port} ")
    mesh_ids = {spec.serve_args[spec.serve_args.index("--mesh-id") + 1] for spec in seen["specs"]}
    assert len(mesh_ids) == 1 and len(mesh_ids.pop()) == 16  # one fresh id, shared by the gateway and workers
    for spec in seen["specs"][1:]:
        assert spec.serve_args[spec.serve_args.index("--registry") + 1] == f"127.0.0.1:{gateway.port}"


def test_generate_target_errors_are_one_line(capsys):
    from moemesh.supervisor import free_ports

    assert cli.main(["generate", "--target", "localhost", "hi"]) == 2
    assert (
        capsys.readouterr().err == "error: --target='localhost' must be HOST:PORT with a port in [1, 65535]\n"
    )
    assert cli.main(["generate", "--target", "127.0.0.1:99999", "hi"]) == 2
    capsys.readouterr()
    port = free_ports(1)[0]  # nothing listens there
    assert cli.main(["generate", "--target", f"127.0.0.1:{port}", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: 127.0.0.1:{port}: UNAVAILABLE: ") and err.count("\n") == 1, err
    assert cli.main(["generate", "--target", f"127.0.0.1:{port}", "--max-tokens", "0", "hi"]) == 2
    assert capsys.readouterr().err == "error: max_tokens=0 must be >= 1\n"


def test_ctrl_c_during_generate_in_a_real_process_exits_130_without_a_traceback(tmp_path):
    import signal
    import socket
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as silent:  # accepts connections, never answers: the request waits
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen([sys.executable, "-m", "moemesh.cli", "generate", "--target", target, "hi"],
                                   cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            silent.settimeout(60)
            connection, _ = silent.accept()  # the client connected: it waits inside the call now
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
            connection.close()
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
