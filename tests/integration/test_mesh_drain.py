"""Workers leaving a running pd mesh (1 prefill, 2 decode) while requests stream, seen from the client:
* a decode worker that stops answering without closing its socket (SIGSTOP) has its requests migrated once
  it misses its heartbeats for `worker_timeout_s` (here 1.5 s), not when TCP keepalive gives up (30 s);
* a decode worker sent SIGTERM leaves the mesh, finishes or hands back its requests within its drain grace,
  and exits;
every stream completes with the tokens of in-process `LLM.generate`, and no worker holds a page afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from moemesh import SamplingParams
from moemesh.sdk import AsyncClient
from tests.integration.mesh_tiny import TINY_ENV, build_tiny, start_mesh
from tests.integration.test_mesh_generate import _reference_llm, mixed_prompts

WORKER_TIMEOUT_S = 1.5
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-drain"))


@pytest.fixture(scope="module")
def mesh(tiny_dir):
    knobs = {**TINY_ENV, "MOEMESH_WORKER_TIMEOUT_S": str(WORKER_TIMEOUT_S), "MOEMESH_DRAIN_GRACE_S": "20"}
    mesh = start_mesh(tiny_dir, "pd", num_decode=2, knobs=knobs, fail_fast=False, max_restarts=0)
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = _reference_llm(tiny_dir)
    work = [(ids[:40], MAX_TOKENS) for ids, _ in mixed_prompts(6, seed=5)]
    want = [
        llm.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids for ids, n in work
    ]
    torch.set_num_threads(threads)
    return work, want


async def _stream_all(address: str, work, started: asyncio.Event, arrivals: list[list[float]]):
    """Streams every request; `started` is set once each has its first tokens; `arrivals[i]` gets the
    time.monotonic() of each of request i's chunks."""
    first = 0

    async def one(client: AsyncClient, ids: list[int], n: int, times: list[float]) -> list[int]:
        nonlocal first
        tokens: list[int] = []
        async for chunk in client.generate(token_ids=ids, max_tokens=n, temperature=0, ignore_eos=True):
            times.append(time.monotonic())
            if not tokens:
                first += 1
                if first == len(work):
                    started.set()
            tokens += chunk.token_ids
        return tokens

    async with AsyncClient(address, timeout_s=120) as client:
        return await asyncio.gather(
            *(one(client, ids, n, t) for (ids, n), t in zip(work, arrivals, strict=True))
        )


def _run_with_fault(mesh, work, fault) -> tuple[list[list[int]], float]:
    """Streams `work`; once every request has tokens, calls `fault()`. Returns the tokens and the longest
    any stream waited for its next chunk after the fault (how long the fault stalled a client)."""

    async def run():
        started = asyncio.Event()
        arrivals: list[list[float]] = [[] for _ in work]
        streams = asyncio.ensure_future(_stream_all(mesh.address, work, started, arrivals))
        await asyncio.wait(
            {streams, asyncio.ensure_future(started.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        assert not streams.done(), "the requests ended before the fault: make them longer"
        t0 = time.monotonic()
        fault()
        got = await streams
        stalls = [
            b - max(a, t0) for times in arrivals for a, b in zip(times, times[1:], strict=False) if b > t0
        ]
        return got, max(stalls)

    return asyncio.run(run())


def test_a_stopped_decode_worker_has_its_requests_migrated_within_its_heartbeat_timeout(mesh, reference):
    work, want = reference
    pid = mesh.pids["decode-0"]
    try:
        got, stall_s = _run_with_fault(mesh, work, lambda: os.kill(pid, signal.SIGSTOP))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert got == want
    # The heartbeat timeout, a watch tick, and the new decode worker's prefill of prompt + tokens so far, on a
    # loaded 2-core box: far below the 30 s a keepalive would take.
    assert stall_s < WORKER_TIMEOUT_S + 8
    assert any("decode-0 left the membership with" in line for line in mesh.lines), "\n".join(
        mesh.lines[-20:]
    )
    # decode-0 woke up, found its session cancelled and freed everything; it registers again.
    assert mesh.wait_settled(timeout_s=30) == {"prefill-0": 0, "decode-0": 0, "decode-1": 0}


def test_sigterm_drains_a_decode_worker_without_losing_a_request(mesh, reference):
    work, want = reference
    pid = mesh.pids["decode-1"]
    got, seconds = _run_with_fault(mesh, work, lambda: os.kill(pid, signal.SIGTERM))
    assert got == want
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any("decode-1 drained" in line for line in mesh.lines) is False:
        time.sleep(0.1)
    assert any("decode-1 drained" in line for line in mesh.lines), "\n".join(mesh.lines[-20:])
    mesh.workers.pop("decode-1")
    assert mesh.wait_settled(timeout_s=30) == {"prefill-0": 0, "decode-0": 0}
