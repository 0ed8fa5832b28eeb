"""A pd mesh with mutual TLS and API keys (`moemesh up --tls-dir DIR --api-keys FILE`), tried from a client's
side: the right key and certificate get the same tokens as in-process `LLM.generate`; a missing or wrong key is
UNAUTHENTICATED; no certificate, a foreign CA's certificate or plaintext cannot connect; a client certificate
cannot call a worker (mesh peers only), nor `moemesh rebalance`; and no key or private key ever reaches a log
line."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from moemesh import SamplingParams
from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc
from moemesh.sdk import AsyncClient, Client, TlsOptions, Unauthenticated, Unavailable
from moemesh.tls_certs import write_mesh_certs
from tests.integration.mesh_tiny import build_tiny, start_mesh
from tests.integration.test_mesh_generate import _reference_llm, mixed_prompts

KEYS = ("mm-key-alpha-5d1c0f7e2b", "mm-key-beta-93aa41e6c8")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-secure"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    write_mesh_certs(out)
    foreign = tmp_path_factory.mktemp("foreign-certs")
    write_mesh_certs(foreign)
    keys = out / "api-keys.txt"
    keys.write_text(f"# mesh keys\n{KEYS[0]}\n\n{KEYS[1]}\n")
    return out, foreign, keys


@pytest.fixture(scope="module")
def mesh(tiny_dir, certs):
    out, _, keys = certs
    mesh = start_mesh(tiny_dir, "pd", tls_dir=str(out), api_keys_file=str(keys))
    try:
        yield mesh
    finally:
        assert mesh.stop() == 0, "\n".join(mesh.lines[-30:])


def test_the_right_key_and_certificate_get_llm_generate_tokens(mesh, certs, tiny_dir):
    out, _, _ = certs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = _reference_llm(tiny_dir)
        work = mixed_prompts(6, seed=21)

        async def run():
            tls = TlsOptions.from_dir(out / "client")
            async with AsyncClient(mesh.address, timeout_s=120, api_key=KEYS[1], tls=tls) as client:
                return await asyncio.gather(
                    *(client.complete(token_ids=ids, max_tokens=n, temperature=0) for ids, n in work)
                )

        for (ids, n), got in zip(work, asyncio.run(run()), strict=True):
            assert got.token_ids == llm.generate([ids], SamplingParams(max_tokens=n))[0].token_ids
        assert mesh.wait_settled() == {"prefill-0": 0, "decode-0": 0}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("key", [None, "not-a-key", KEYS[0] + "x"])
def test_a_missing_or_wrong_key_is_unauthenticated_without_echoing_it(mesh, certs, key):
    out, _, _ = certs
    with Client(mesh.address, timeout_s=30, api_key=key, tls=TlsOptions.from_dir(out / "client")) as client:
        with pytest.raises(Unauthenticated) as err:
            client.complete(prompt="To Sherlock Holmes", max_tokens=4)
        assert err.value.code == "UNAUTHENTICATED"
        assert "authorization: Bearer" in str(err.value)
        assert key is None or key not in str(err.value)
        with pytest.raises(Unauthenticated):
            client.tokenize("hello")


def test_without_a_mesh_ca_certificate_nothing_connects(mesh, certs):
    out, foreign, _ = certs
    ca_only = TlsOptions((out / "ca.crt").read_bytes())  # verifies the server, presents no certificate
    for tls in (ca_only, TlsOptions.from_dir(foreign / "client")):
        with (
            Client(mesh.address, timeout_s=5, api_key=KEYS[0], tls=tls) as client,
            pytest.raises(Unavailable),
        ):
            client.complete(prompt="To Sherlock Holmes", max_tokens=4)
    with Client(mesh.address, timeout_s=5, api_key=KEYS[0]) as plaintext, pytest.raises(Unavailable):
        plaintext.complete(prompt="To Sherlock Holmes", max_tokens=4)


def test_workers_take_calls_from_mesh_peers_only(mesh, certs):
    out, _, _ = certs
    client = TlsOptions.from_dir(out / "client", server_name="moemesh")
    address = mesh.workers["decode-0"]
    with grpc.secure_channel(address, client.credentials(), options=client.channel_options()) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "mesh peers only" in err.value.details()
    assert mesh.load("decode-0").num_total_pages > 0  # the mesh's own certificate is let in


def test_no_secret_in_any_log_line(mesh, certs):
    out, _, _ = certs
    logs = "\n".join(mesh.lines)
    for key in KEYS:
        assert key not in logs
    for secret in (out / "tls.key", out / "client" / "tls.key", out / "ca.key"):
        body = "".join(secret.read_text().splitlines()[1:-1])
        assert body[:40] not in logs.replace("\n", "")
    assert "PRIVATE KEY" not in logs


def test_the_cli_generates_with_a_key_file_and_a_client_certificate(mesh, certs):
    import subprocess
    import sys

    out, _, keys = certs
    base = [sys.executable, "-m", "moemesh.cli", "generate", "--target", mesh.address, "--max-tokens", "4"]
    ok = subprocess.run([*base, "--api-key-file", str(keys), "--tls-dir", str(out / "client"), "To Sherlock"],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("To Sherlock") and len(ok.stdout.strip()) > len("To Sherlock")
    refused = subprocess.run([*base, "--tls-dir", str(out / "client"), "To Sherlock"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr and KEYS[0] not in refused.stderr


def test_rebalance_takes_the_mesh_certificate_only(mesh, certs, capsys):
    """`moemesh rebalance` is a mesh service on the gateway: the services' certificate gets through (this pd
    mesh then has no expert worker to place), a client certificate is refused."""
    from moemesh.cli import build_parser

    out, _, _ = certs
    for tls_dir, expected in ((out, "FAILED_PRECONDITION: no expert workers in the mesh"),
                              (out / "client", "PERMISSION_DENIED: /moemesh.v1.ExpertAdmin/Rebalance is for mesh peers only")):  # fmt: skip
        args = build_parser().parse_args(["rebalance", "--target", mesh.address, "--tls-dir", str(tls_dir)])
        assert args.func(args) == 1
        assert capsys.readouterr().err.strip().startswith(f"error: {mesh.address}: {expected}")
