"""On a CUDA machine: the default chart's pods, as processes on one host, serve. The gateway, prefill and decode
commands are those of the rendered Deployments (default_commands.json, which test_chart.py keeps equal to a
fresh render: the GPU machines have no Helm) (only the addresses change: every pod has its own IP there,
here they share 127.0.0.1 on free ports) with the prefill/decode ConfigMap as the environment — so UCX runs
with the chart's defaults (no transport or device restriction: UCX picks cuda_ipc / TCP itself) — and a greedy
request through the SDK returns the in-process engine's tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moemesh.supervisor import ChildSpec, Supervisor, free_ports

DEFAULT_COMMANDS = Path(__file__).with_name("default_commands.json")

pytestmark = pytest.mark.gpu
# longer than the decode worker's local_prefill_tokens (16), so the prefill pod computes it and sends the KV
PROMPT = (
    "To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name. "
    "In his eyes she eclipses and predominates the whole of her sex."
)


def _local(args: list[str], port: int, gateway: str, worker_id: str) -> tuple[str, ...]:
    """The pod's args with this host's addresses; the metrics port dropped (one per pod there)."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        previous = args[i - 1] if i else ""
        if arg == "--http-port" and args[0] != "gateway":
            skip = True
            continue
        if previous == "--port":
            arg = str(port)
        elif previous == "--registry":
            arg = gateway
        elif previous == "--host":
            arg = "127.0.0.1"
        elif previous == "--http-port":
            arg = str(free_ports(1)[0])
        out.append(re.sub(r"\$\(POD_NAME\)", worker_id, arg))
    return tuple(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_default_charts_commands_serve_on_a_gpu(monkeypatch):
    serve_the_charts_commands(json.loads(DEFAULT_COMMANDS.read_text()), "cuda", monkeypatch)


def serve_the_charts_commands(commands: dict[str, dict], device: str, monkeypatch) -> None:
    """commands: role -> {"args", "env"} (tests.helm.chart.pod_commands)."""
    from moemesh import LLM, SamplingParams
    from moemesh.sdk import Client

    for key, value in commands["decode"]["env"].items():
        monkeypatch.setenv(key, value)
    if device == "cuda":  # pods get a GPU each; here prefill and decode share one card
        monkeypatch.setenv("MOEMESH_GPU_MEMORY_FRACTION", "0.4")
    assert commands["prefill"]["env"] == commands["decode"]["env"]
    ports = dict(zip(("gateway", "prefill", "decode"), free_ports(3), strict=True))
    gateway = f"127.0.0.1:{ports['gateway']}"
    specs = []
    for role, port in ports.items():
        args = commands[role]["args"]
        pairs = set(zip(args, args[1:], strict=False))
        assert args[0] == "serve" and (role == "gateway" or ("--device", device) in pairs)
        specs.append(ChildSpec(role, _local(args[1:], port, gateway, f"{role}-0"), port))
    supervisor = Supervisor(specs, startup_timeout_s=300)
    try:
        supervisor.start()
        supervisor.wait_ready()
        with Client(gateway, timeout_s=120) as client:
            chunks = list(client.generate(prompt=PROMPT, max_tokens=16, temperature=0))
        expected = LLM("demo", device=device).generate([PROMPT], SamplingParams(max_tokens=16))[0]
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids
        assert chunks[-1].usage.ttft.remote_prefill  # the prompt went through the prefill pod's command
    finally:
        supervisor.stop()
