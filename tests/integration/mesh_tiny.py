"""A tiny DeepSeek-V3 checkpoint with a byte-level BPE tokenizer, and a `moemesh up` mesh in child processes —
shared by tests/integration/test_mesh_*.py and bench/bench_mesh.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from moemesh._proto.v1 import expert_pb2_grpc, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
EOS = "<|eos|>"
TINY_ENV = {  # small engines: pages of 8 tokens, chunked prefill, a KV crc32 per chunk
    "MOEMESH_PAGE_SIZE": "8",
    "MOEMESH_NUM_KV_PAGES": "256",
    "MOEMESH_MAX_NUM_SEQS": "32",
    "MOEMESH_MAX_NUM_BATCHED_TOKENS": "64",
    "MOEMESH_DTYPE": "float32",
    "MOEMESH_LOCAL_PREFILL_TOKENS": "0",
    "MOEMESH_KV_CHECKSUM": "1",
    "MOEMESH_HEARTBEAT_S": "0.2",
}


def build_tiny(directory: Path, vocab_size: int = 320, seed: int = 11) -> Path:
    """A random tiny DeepseekV3 (tests/model/tiny.py) and a BPE tokenizer trained on part of the demo corpus;
    id 0 is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.model.tiny import build_hf, save_hf

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    text = (ROOT / "models" / "demo" / "corpus" / "heldout.txt").read_text()[:20000]
    tok.train_from_iterator([text], trainer)
    tok.save(str(directory / "tokenizer.json"))
    save_hf(build_hf("v3", seed=seed, vocab_size=vocab_size, eos_token_id=0, bos_token_id=0), directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    return directory


@dataclass
class Mesh:
    """`python -m moemesh.cli up ...` as a child; `workers` maps child names to their gRPC addresses."""

    process: subprocess.Popen
    address: str
    workers: dict[str, str]
    pids: dict[str, int]
    lines: list[str] = field(default_factory=list)
    tls_dir: str | None = None  # a mutual-TLS mesh: asks the workers with the mesh's own certificate
    http_port: int = 0  # the gateway's HTTP port

    def load(self, name: str) -> worker_pb2.LoadReport:
        from moemesh.config.security import SecurityConfig
        from moemesh.transport.channels import MeshChannels

        tls = SecurityConfig(tls_dir=self.tls_dir or "").tls_files()
        with MeshChannels(tls).sync(self.workers[name]) as channel:
            stub = (worker_pb2_grpc.PrefillWorkerStub if name.startswith("prefill")
                    else expert_pb2_grpc.ExpertPoolStub if name.startswith("expert")
                    else worker_pb2_grpc.DecodeWorkerStub)(channel)  # fmt: skip
            return stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)

    def leased_pages(self) -> dict[str, int]:
        loads = {name: self.load(name) for name in self.workers}
        return {name: r.num_total_pages - r.num_free_pages for name, r in loads.items()}

    def wait_settled(self, timeout_s: float = 10.0) -> dict[str, int]:
        """Polls until no worker holds a page; returns the last leased-page counts."""
        deadline = time.monotonic() + timeout_s
        while True:
            leased = self.leased_pages()
            if not any(leased.values()) or time.monotonic() > deadline:
                return leased
            time.sleep(0.1)

    def kill(self, name: str, timeout_s: float = 10.0) -> None:
        """SIGKILLs one worker (a mesh started with fail_fast=False serves on) and waits until `up` reaped it;
        it leaves `workers` (until `up` restarts it), so `leased_pages` / `wait_settled` ask only the survivors."""
        pid = self.pids[name]
        os.kill(pid, signal.SIGKILL)
        self.workers.pop(name, None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} (pid {pid}) was not reaped in {timeout_s} s")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_mesh(model_dir: Path | str, topology: str, *, num_decode: int = 1, num_prefill: int = 1,
               knobs: dict[str, str] | None = None, torch_threads: int | None = None,
               timeout_s: float = 120.0, fail_fast: bool = True, max_restarts: int = 3,
               tls_dir: str | None = None, api_keys_file: str | None = None, device: str = "cpu",
               up_args: tuple[str, ...] = (), num_expert: int = 1) -> Mesh:  # fmt: skip
    """Starts `moemesh up` and waits for `ready on`. knobs: MOEMESH_* environment (default TINY_ENV);
    fail_fast: `up --fail-fast` (a test's mesh stops when a worker crashes); with False a killed worker is
    restarted up to `max_restarts` times (0: it stays down) and the rest serve on; tls_dir / api_keys_file:
    `up --tls-dir` / `--api-keys`; device: `up --device`; up_args: more flags for `up`. Per-request log lines
    are shown (`--request-log-level INFO`): tests read them."""
    from moemesh.supervisor import free_ports

    port, http_port = free_ports(2)
    argv = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model_dir), "--topology", topology,
            "--decode", str(num_decode), "--prefill", str(num_prefill), "--port", str(port),
            "--http-port", str(http_port), "--startup-timeout", str(timeout_s), "--device", device,
            "--experts", str(num_expert)]  # fmt: skip
    if torch_threads is not None:
        argv += ["--torch-threads", str(torch_threads)]
    argv += ["--fail-fast"] if fail_fast else ["--max-restarts", str(max_restarts)]
    if tls_dir:
        argv += ["--tls-dir", tls_dir]
    if api_keys_file:
        argv += ["--api-keys", api_keys_file]
    argv += ["--request-log-level", "INFO", *up_args]
    full_env = {
        **os.environ,
        "UCX_TLS": "tcp,self",
        "UCX_NET_DEVICES": "lo",
        **(TINY_ENV if knobs is None else knobs),
    }
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                               cwd=ROOT, bufsize=1)  # fmt: skip
    mesh = Mesh(process, f"127.0.0.1:{port}", {}, {}, tls_dir=tls_dir, http_port=http_port)
    return wait_ready(mesh, timeout_s)


def wait_ready(mesh: Mesh, timeout_s: float) -> Mesh:
    """Follows `moemesh up`'s output into `mesh` (its lines; each worker's pid and address as it starts or
    restarts) and returns it once `ready on` is printed; stops it and raises with its last lines when it exits
    or takes longer than timeout_s."""
    process, ready = mesh.process, threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            mesh.lines.append(line.rstrip())
            started = re.match(r"(?:re)?started (\S+) pid=(\d+) on (\S+)", line)
            if started:
                name, pid, address = started.groups()
                mesh.pids[name] = int(pid)
                if name != "gateway":
                    mesh.workers[name] = address
            if line.startswith("ready on"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            mesh.stop()
            raise RuntimeError("mesh did not start:\n" + "\n".join(mesh.lines[-60:]))
    return mesh
