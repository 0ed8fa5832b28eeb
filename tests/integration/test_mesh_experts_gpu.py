"""Topology pd-experts on one GPU through real processes (`moemesh up --device cuda --topology pd-experts
--experts 2`: gateway, prefill, decode and two expert-pool workers sharing the card, each with its planned share;
expert tokens in device memory over UCX's CUDA transports) on a V2-Lite-shaped random checkpoint (4 layers, 64
routed experts, top-6, BF16): greedy output of concurrent ragged prompts through the SDK equals in-process
`LLM.generate` on the same GPU token for token, and both expert workers computed tokens of their own experts
only, every (token, slot) of every MoE layer at least once.

The oracle is `LLM` with its experts local, on the path the mesh's attention workers take — the fused one, the
CUDA default: P and D route with `moe_route`, the pool answers unweighted rows of `moe_fused.expert_rows` (the
fused path's GEMMs, kernel and tile picked by the whole layer's rows) and `moe_combine` sums them with the shared
experts as `fused_moe` does, so with BF16 tokens the block is the colocated one bit for bit
(tests/model/test_remote_expert_rows.py) — eager (a CUDA graph cannot span the round trip: `--remote-experts`
builds D without decode graphs; `up --topology colocated` would decode in graphs, another computation) and
without the prefix cache. Not the colocated mesh: its graph replays are not bit-exact against eager steps, and
it would cost another mesh start.

BF16 is what makes the pool exact (an fp32 model's hidden states go over the wire in BF16), and in BF16 a dense
GEMM's rows on CUDA depend on how many rows share it: a decode batch of other requests than in-process rounds
otherwise and flips random-weight near ties (test_mesh_gpu.py saw 1 in 16 prompts). So every worker runs one
request at a time (`MOEMESH_MAX_NUM_SEQS=1`, and the oracle the same) and prefills each prompt in one chunk: the
engines' shapes are the oracle's, while the requests are still concurrent through the gateway, and the pool
serves P's prefill batches and D's decode batches at once.

Run on a GPU machine: `python -m pytest tests/integration/test_mesh_experts_gpu.py -m gpu -x -q -s`."""

from __future__ import annotations

import gc
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from moemesh.engine.memory import bytes_per_page
from moemesh.make_checkpoint import shape_config, write_random_checkpoint
from moemesh.model.config import ModelConfig
from tests.integration.mesh_tiny import Mesh, wait_ready

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
NUM_EXPERT_WORKERS = 2
MAX_PROMPT = 300
KNOBS = {  # every worker: BF16, one request at a time, one prefill chunk per prompt (see the module docstring)
    "MOEMESH_DTYPE": "bfloat16",
    "MOEMESH_MAX_NUM_SEQS": "1",
    "MOEMESH_MAX_NUM_BATCHED_TOKENS": "512",
}
ORACLE = EngineConfig(max_num_seqs=1, max_num_batched_tokens=512, cuda_graph_batch_sizes=(),
                      enable_prefix_caching=False)  # fmt: skip


def ragged_prompts(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max tokens): short and long, across page (64) boundaries; ids inside the demo vocabulary."""
    rng = random.Random(seed)
    lengths = [3, 17, 64, 65, 130, MAX_PROMPT] + [rng.randint(2, MAX_PROMPT) for _ in range(count - 6)]
    return [([rng.randrange(1, 4096) for _ in range(n)], rng.randint(2, 16)) for n in lengths]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return write_random_checkpoint(shape_config("v2-lite", 4), tmp_path_factory.mktemp("v2lite-experts"),
                                   seed=7, device="cuda", log=lambda *_: None)  # fmt: skip


@pytest.fixture(scope="module")
def expected(model_dir):
    """In-process outputs on the same GPU, freed before the mesh starts (it plans from the card's memory)."""
    return oracle(model_dir, "cuda")


def oracle(model_dir: Path, device: str) -> list[tuple[list[int], int, list[int]]]:
    """(prompt, max tokens, greedy tokens) of `LLM` with its experts local, configured as the module says."""
    llm = LLM(model_dir, device=device, dtype="bfloat16", engine_config=ORACLE)
    work = ragged_prompts(8)
    outs = llm.generate(
        [p for p, _ in work], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in work]
    )
    result = [(p, n, list(o.token_ids)) for (p, n), o in zip(work, outs, strict=True)]
    del llm, outs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def start_up(model_dir: Path, device: str) -> Mesh:
    """`moemesh up --device DEVICE --topology pd-experts` with no UCX_* or MOEMESH_* of the caller's (the
    workers pick their transports by device), plus KNOBS; -> the Mesh (workers' gRPC addresses, pids, lines)."""
    from moemesh.supervisor import free_ports

    port, http_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEMESH_", "UCX_"))}
    argv = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model_dir), "--topology", "pd-experts",
            "--experts", str(NUM_EXPERT_WORKERS), "--device", device, "--port", str(port),
            "--http-port", str(http_port), "--fail-fast", "--startup-timeout", "240"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**env, **KNOBS}, cwd=ROOT, bufsize=1)  # fmt: skip
    return wait_ready(Mesh(process, f"127.0.0.1:{port}", {}, {}, http_port=http_port), 300)


def test_pd_experts_on_one_gpu_equals_llm_generate_and_the_pool_serves_every_slot(model_dir, expected):
    check_mesh(model_dir, expected, "cuda")


def check_mesh(model_dir: Path, expected: list[tuple[list[int], int, list[int]]], device: str) -> None:
    """Starts the mesh on `device`, checks it against `expected` (`oracle`), stops it: the test's body (a CPU
    run of it with the tiny shape is a dry run of the flow, not a test of CUDA)."""
    from moemesh.sdk import Client

    config = ModelConfig.from_file(model_dir / "config.json")
    total_bytes = torch.cuda.mem_get_info()[1] if device == "cuda" else 0
    mesh = start_up(model_dir, device)
    try:
        assert sorted(mesh.workers) == ["decode-0", "expert-0", "expert-1", "prefill-0"]
        with Client(mesh.address, timeout_s=300) as client:

            def one(item):
                prompt, n, _ = item
                return client.complete(token_ids=prompt, max_tokens=n, temperature=0, ignore_eos=True)

            with ThreadPoolExecutor(len(expected)) as pool:
                results = list(pool.map(one, expected))
        mismatched = [(i, len(p), n, r.token_ids, want)
                      for i, ((p, n, want), r) in enumerate(zip(expected, results, strict=True))
                      if r.token_ids != want]  # fmt: skip
        assert mismatched == [], (
            f"{len(mismatched)} of {len(expected)} differ (i, prompt len, max, got, want)"
        )
        assert [r.usage.cached_prompt_tokens for r in results] == [0] * len(results)  # one chunk per prompt

        # the pool computed every slot: (prompt + generated - 1) tokens x top-k per MoE layer, each on the worker
        # hosting its expert (`--experts i/2`: the first and the second half of the routed experts)
        moe_layers = set(range(config.first_k_dense_replace, config.num_hidden_layers))
        k, num = config.num_experts_per_tok, config.n_routed_experts
        slots = sum(len(p) + len(want) - 1 for p, _, want in expected) * k
        counted: dict[int, int] = {}
        for i in range(NUM_EXPERT_WORKERS):
            counts = [c for c in mesh.load(f"expert-{i}").expert_tokens if c.num_tokens > 0]
            own = range(i * num // NUM_EXPERT_WORKERS, (i + 1) * num // NUM_EXPERT_WORKERS)
            assert {c.layer for c in counts} == moe_layers, i
            assert all(c.expert_id in own for c in counts), (i, sorted({c.expert_id for c in counts}))
            for c in counts:
                counted[c.layer] = counted.get(c.layer, 0) + c.num_tokens
        assert all(counted[layer] >= slots for layer in moe_layers), (counted, slots)

        if device == "cuda":  # P and D planned their KV pools inside their quarter of the card (0.9 / 4)
            share = 0.9 / (2 + NUM_EXPERT_WORKERS) * total_bytes
            page = bytes_per_page(config.num_hidden_layers, 64, config.kv_cache_dim, 2)
            for name in ("prefill-0", "decode-0"):
                pages = mesh.load(name).num_total_pages
                kv_bytes = pages * page
                print(
                    f"{name}: {pages} KV pages, {kv_bytes / 2**30:.1f} GiB of a {share / 2**30:.1f} GiB share"
                )
                assert 0.6 * share < kv_bytes < share, (name, kv_bytes / 2**30, share / 2**30)
        assert mesh.wait_settled() == {name: 0 for name in mesh.workers}
        bad = [line for line in mesh.lines if re.search(r"UCX cannot|local-prefill fallback|dropping it from the "
                                                         r"pool|Traceback", line)]  # fmt: skip
        assert bad == []
    finally:  # with -s: what each worker planned and hosted, and any warning or error, pass or fail
        wanted = r"hosts \d+ of|expert pool:|WARNING|ERROR|Traceback"
        print("\n".join(line for line in mesh.lines if re.search(wanted, line)))
        code = mesh.stop()
        for pid in mesh.pids.values():  # every child reaped
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    assert code == 0, "\n".join(mesh.lines[-30:])
