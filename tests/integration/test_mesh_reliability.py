"""Losing a worker mid-request, in real processes (`moemesh up --max-restarts 0`: a killed worker stays down and
the rest serve on; real gRPC and UCX over loopback)
on the tiny checkpoint: a decode worker SIGKILLed while it streams → the gateway migrates the request to the
other D and the client's tokens equal `LLM.generate`'s; a prefill worker SIGKILLed while it prefills → D
retries the other P. Every page on the surviving workers comes back, and no process is left behind."""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
import time

import pytest

from moemesh import SamplingParams
from moemesh.sdk import AsyncClient, Client, Unavailable
from tests.integration.mesh_tiny import build_tiny, start_mesh
from tests.integration.test_mesh_generate import _reference_llm

pytest.importorskip("ucxx")

MIGRATED = re.compile(r"(?P<rid>\S+): decode worker (?P<lost>decode-\d) lost after (?P<tokens>\d+) tokens")
RETRIED = re.compile(r"prefill worker prefill-0 unavailable for (?P<rid>\S+) .*; retrying on prefill-1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-reliability"))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return _reference_llm(tiny_dir)


def _mesh(tiny_dir, num_prefill: int):
    mesh = start_mesh(tiny_dir, "pd", num_decode=2, num_prefill=num_prefill, fail_fast=False, max_restarts=0)
    try:
        yield mesh
    finally:
        code = mesh.stop()
        assert code == 0, "\n".join(mesh.lines[-30:])
        for pid in mesh.pids.values():  # every child was reaped, the killed one too
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.fixture
def mesh_2d(tiny_dir):
    yield from _mesh(tiny_dir, num_prefill=1)


@pytest.fixture
def mesh_2p_2d(tiny_dir):
    yield from _mesh(tiny_dir, num_prefill=2)


def _busy_decode(mesh) -> str:
    busy = [n for n in mesh.workers if n.startswith("decode") and mesh.load(n).num_running_requests > 0]
    assert len(busy) == 1, busy
    return busy[0]


def test_lost_decode_worker_request_migrates_with_the_same_tokens(mesh_2d, llm):
    mesh = mesh_2d
    prompt = [random.Random(5).randrange(1, 320) for _ in range(40)]
    params = dict(max_tokens=200, temperature=0, ignore_eos=True)
    want = llm.generate([prompt], SamplingParams(max_tokens=200, ignore_eos=True))[0]
    got, killed = [], None
    with Client(mesh.address, timeout_s=60) as client:
        for chunk in client.generate(token_ids=prompt, **params):
            got += chunk.token_ids
            if killed is None and len(got) >= 8:  # mid-stream: the D that streams it dies
                killed = _busy_decode(mesh)
                mesh.kill(killed)
        assert chunk.finish_reason == "length"
    assert killed is not None
    assert got == want.token_ids  # no gap, no duplicate, the same greedy tokens
    migrations = [m for line in mesh.lines if (m := MIGRATED.search(line))]
    assert [m["lost"] for m in migrations] == [killed], migrations
    assert 8 <= int(migrations[0]["tokens"]) < 200
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}  # the survivors hold no page

    # The last decode worker lost too: nowhere to migrate, UNAVAILABLE naming what was lost.
    with Client(mesh.address, timeout_s=60) as client:
        stream = client.generate(token_ids=prompt, **params)
        with pytest.raises(
            Unavailable, match=r"lost decode worker\(s\) decode-\d and no other is registered"
        ):
            for i, _ in enumerate(stream):
                if i == 3:
                    mesh.kill(_busy_decode(mesh))
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}


def test_lost_prefill_worker_d_retries_the_other_one(mesh_2p_2d, llm):
    mesh = mesh_2p_2d
    rng = random.Random(9)
    work = [[rng.randrange(1, 320) for _ in range(300)] for _ in range(8)]  # long prompts keep both Ps busy
    results: list = []

    async def complete_all():
        async with AsyncClient(mesh.address, timeout_s=60) as client:
            return await asyncio.gather(
                *(client.complete(token_ids=ids, max_tokens=6, temperature=0) for ids in work)
            )

    deadline = time.monotonic() + 30  # every D handshaken with both Ps: a retry has somewhere to go
    pairs = [(f"[prefill-{p}]", f"handshake with decode-{d} accepted") for p in (0, 1) for d in (0, 1)]
    while not all(any(who in line and what in line for line in mesh.lines) for who, what in pairs):
        assert time.monotonic() < deadline, "the decode workers never handshook both prefill workers"
        time.sleep(0.05)
    sender = threading.Thread(target=lambda: results.extend(asyncio.run(complete_all())))
    sender.start()
    deadline = time.monotonic() + 20
    while mesh.load("prefill-0").num_queued_requests == 0:  # prefill-0 is prefilling some of them
        assert time.monotonic() < deadline and sender.is_alive(), "prefill-0 never got a request"
        time.sleep(0.01)
    mesh.kill("prefill-0")
    sender.join(timeout=60)
    assert not sender.is_alive() and len(results) == len(work)
    for i, (ids, got) in enumerate(zip(work, results, strict=True)):
        want = llm.generate([ids], SamplingParams(max_tokens=6))[0]
        assert got.token_ids == want.token_ids, f"request {i}"
    retried = [m["rid"] for line in mesh.lines if (m := RETRIED.search(line))]
    assert retried, "no request was retried on prefill-1:\n" + "\n".join(mesh.lines[-30:])
    assert not any("prefilling it here" in line for line in mesh.lines)  # prefill-1 took every retry
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}
