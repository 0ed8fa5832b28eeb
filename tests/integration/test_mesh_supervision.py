"""What a user of `moemesh up` sees when things go wrong, on one real mesh (pd, one P, two D, the tiny checkpoint,
restarts on as by default): a second `up` on the same port fails fast and leaves this mesh alone; a worker of
another mesh cannot join; requests whose prompt plus max_tokens exceed the context are refused naming both; the
SDK's default temperature is greedy like `LLM`'s; and after a decode worker is SIGKILLed, new requests succeed
within seconds while `up` says so and restarts it. Every scenario ends with no page leased on any worker."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time

import grpc
import pytest

from moemesh import SamplingParams
from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.sdk import AsyncClient, Client, InvalidRequest
from moemesh.supervisor import free_ports
from tests.integration.mesh_tiny import ROOT, TINY_ENV, build_tiny, start_mesh
from tests.integration.test_mesh_generate import _reference_llm

pytest.importorskip("ucxx")

CONTEXT = 512  # the tiny checkpoint's max_position_embeddings
ENV = {**os.environ, "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", **TINY_ENV}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-supervision"))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return _reference_llm(tiny_dir)


@pytest.fixture(scope="module")
def mesh(tiny_dir):
    mesh = start_mesh(tiny_dir, "pd", num_decode=2, num_prefill=1, fail_fast=False, timeout_s=300)
    try:
        yield mesh
    finally:
        code = mesh.stop()
        assert code == 0, "\n".join(mesh.lines[-30:])
        for pid in mesh.pids.values():  # every child was reaped, the killed and restarted ones too
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 320) for _ in range(n)]


def _no_leases(mesh) -> None:
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}


def _cli(*argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.cli", *argv], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout_s)  # fmt: skip


def test_a_second_mesh_on_the_same_port_fails_fast_and_the_first_serves_on(mesh, tiny_dir, llm):
    port = mesh.address.rsplit(":", 1)[1]
    pids = dict(mesh.pids)
    second = _cli("up", "--model", str(tiny_dir), "--port", port, "--http-port", str(free_ports(1)[0]))
    assert second.returncode == 2
    assert second.stderr == f"error: port {port} is in use on 127.0.0.1 (another mesh? pick another --port)\n"
    assert "started" not in second.stdout  # nothing was started

    # A worker of another mesh (or of none) cannot take a name in this one: it exits, saying why.
    stray = _cli("serve", "decode", "--model", str(tiny_dir), "--port", str(free_ports(1)[0]),
                 "--registry", mesh.address, "--worker-id", "decode-0", "--mesh-id", "another")  # fmt: skip
    assert stray.returncode == 3, stray.stderr[-2000:]
    assert "decode-0 not admitted by" in stray.stderr
    assert "belongs to mesh_id='another', this registry to mesh_id=" in stray.stderr

    prompt = _prompt(1, 24)
    want = llm.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    with Client(mesh.address, timeout_s=60) as client:
        for _ in range(3):  # each decode worker gets some: none is a stray
            got = client.complete(token_ids=prompt, max_tokens=10, ignore_eos=True, temperature=0)
            assert got.token_ids == want
    assert mesh.pids == pids
    _no_leases(mesh)


def test_the_sdk_default_temperature_is_greedy_like_llm(mesh, llm):
    for seed in (2, 3):
        prompt = _prompt(seed, 16)
        want = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]  # LLM's defaults
        with Client(mesh.address, timeout_s=60) as client:
            got = client.complete(token_ids=prompt, max_tokens=12, ignore_eos=True)  # no temperature
        assert got.token_ids == want.token_ids


def test_a_prompt_plus_max_tokens_beyond_the_context_is_refused_everywhere(mesh, llm):
    prompt = _prompt(4, 20)
    message = (
        f"max_tokens=1000000000 does not fit: the prompt has 20 tokens and the context is {CONTEXT} tokens"
    )
    with Client(mesh.address, timeout_s=60) as client:
        with pytest.raises(InvalidRequest, match=message) as info:
            client.complete(token_ids=prompt, max_tokens=10**9)
        assert info.value.code == "INVALID_ARGUMENT"
        long = _prompt(5, CONTEXT - 12)
        with pytest.raises(
            InvalidRequest, match=f"max_tokens=32 does not fit: the prompt has {CONTEXT - 12} "
        ):
            client.complete(token_ids=long, max_tokens=32)  # was: 12 tokens and finish_reason "length"
        fits = client.complete(token_ids=long, max_tokens=12, ignore_eos=True)
        assert len(fits.token_ids) == 12 and fits.finish_reason == "length"

    # The decode worker applies the same rule to a request that reaches it directly.
    with grpc.insecure_channel(mesh.workers["decode-1"]) as channel:
        request = worker_pb2.DecodeRequest(request_id="direct", prompt_token_ids=prompt,
                                           sampling=common_pb2.SamplingParams(max_tokens=10**9))  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            list(worker_pb2_grpc.DecodeWorkerStub(channel).Generate(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()

    # And LLM, in process: generate refuses up front, score names the positions.
    before = llm.stats()
    with pytest.raises(ValueError, match=f"prompts\\[0\\]: {message}"):
        llm.generate([prompt], SamplingParams(max_tokens=10**9))
    assert llm.stats() == before  # nothing was queued or computed
    with pytest.raises(ValueError, match=f"token_ids has {CONTEXT + 1} tokens, more than the model's "
                       f"max_position_embeddings={CONTEXT}"):  # fmt: skip
        llm.score(_prompt(6, CONTEXT + 1))
    _no_leases(mesh)


def test_a_killed_decode_worker_new_requests_succeed_and_up_restarts_it(mesh, llm):
    prompt = _prompt(7, 24)
    want = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    old_pid = mesh.pids["decode-0"]
    mesh.kill("decode-0")
    killed_s = time.monotonic()
    with Client(mesh.address, timeout_s=30) as client:
        got = client.complete(token_ids=prompt, max_tokens=8, ignore_eos=True)
        first_s = time.monotonic() - killed_s
        assert got.token_ids == want
        for _ in range(3):  # and the next ones: none routed to the dead worker fails
            assert client.complete(token_ids=prompt, max_tokens=8, ignore_eos=True).token_ids == want
    assert first_s < 10, f"the first request after the death took {first_s:.1f} s"

    deadline = time.monotonic() + 90  # restarted after 1 s, then it loads and registers
    while not any(line == "decode-0 is serving again" for line in mesh.lines):
        assert time.monotonic() < deadline, "\n".join(mesh.lines[-40:])
        time.sleep(0.2)
    said = "\n".join(mesh.lines)
    assert f"warning: decode-0 (pid {old_pid}) exited with -9; the mesh serves on without it" in said
    assert "restarting decode-0 in 1 s (restart 1 of 3)" in said
    assert mesh.pids["decode-0"] != old_pid and "decode-0" in mesh.workers
    joined = [
        line
        for line in mesh.lines
        if line.startswith("[gateway]") and "worker decode-0 (decode) joined" in line
    ]
    deadline = time.monotonic() + 30
    while len(joined) < 2:  # the restarted worker registered again (it was forgotten when it died)
        assert time.monotonic() < deadline, "\n".join(mesh.lines[-40:])
        time.sleep(0.2)
        joined = [
            l for l in mesh.lines if l.startswith("[gateway]") and "worker decode-0 (decode) joined" in l
        ]

    # Two requests at once go to both decode workers (fewest in flight first): the restarted one serves again.
    results: list = []

    async def two():
        async with AsyncClient(mesh.address, timeout_s=60) as client:
            return await asyncio.gather(*(client.complete(token_ids=prompt, max_tokens=60, ignore_eos=True)
                                          for _ in range(2)))  # fmt: skip

    sender = threading.Thread(target=lambda: results.extend(asyncio.run(two())))
    sender.start()
    served = False
    while sender.is_alive() and not served:
        served = mesh.load("decode-0").num_running_requests > 0
        time.sleep(0.02)
    sender.join(60)
    assert served, "the restarted decode-0 got no request"
    long_want = llm.generate([prompt], SamplingParams(max_tokens=60, ignore_eos=True))[0].token_ids
    assert [r.token_ids for r in results] == [long_want, long_want]
    _no_leases(mesh)
