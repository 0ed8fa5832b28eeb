"""`moemesh rebalance`: one-line errors (bad target, unreachable gateway, a mesh without expert workers, the
gateway's own refusal) and the printed placement."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from moemesh._proto.v1 import expert_pb2, expert_pb2_grpc
from moemesh.cli import build_parser
from moemesh.rebalance_cli import render
from moemesh.services.gateway.rebalance import Rebalancer
from moemesh.services.gateway.servicer import ExpertAdminServicer
from moemesh.supervisor import free_ports
from moemesh.transport.channels import aio_channel
from moemesh.transport.registry import Membership


def _run(*argv: str) -> int:
    args = build_parser().parse_args(["rebalance", *argv])
    return args.func(args)


def test_a_bad_target_or_slot_count_is_a_usage_error(capsys):
    assert _run("--target", "nope") == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --target='nope' must be HOST:PORT with a port in [1, 65535]"
    )
    assert _run("--target", "127.0.0.1:1", "--slots-per-worker", "-1") == 2
    assert "--slots-per-worker=-1 must be >= 0" in capsys.readouterr().err


def test_an_unreachable_gateway_is_one_line(capsys):
    (port,) = free_ports(1)
    assert _run("--target", f"127.0.0.1:{port}", "--timeout", "10") == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"error: 127.0.0.1:{port}: UNAVAILABLE: cannot reach the gateway") and "\n" not in err
    )


@pytest.fixture
def gateway_without_experts():
    """The gateway's ExpertAdmin over a membership with no expert worker, on a loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        admin = ExpertAdminServicer(Rebalancer(Membership(), aio_channel))
        expert_pb2_grpc.add_ExpertAdminServicer_to_server(admin, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_mesh_without_expert_workers_is_named(gateway_without_experts, capsys):
    assert _run("--target", gateway_without_experts, "--dry-run") == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {gateway_without_experts}: FAILED_PRECONDITION: no expert workers in the mesh "
        "(topology pd-experts starts them)"
    )


def test_the_placements_print_with_their_balance():
    reply = expert_pb2.RebalanceResponse(
        expert_load=[60, 20, 10, 10],
        before=[expert_pb2.WorkerExperts(worker_id="expert-0", expert_ids=[0, 1], load=80),
                expert_pb2.WorkerExperts(worker_id="expert-1", expert_ids=[2, 3], load=20)],
        after=[expert_pb2.WorkerExperts(worker_id="expert-0", expert_ids=[0, 2, 3], load=50),
               expert_pb2.WorkerExperts(worker_id="expert-1", expert_ids=[0, 1], load=50)],
        balance_before=1.6, balance_after=1.0, applied=True, experts_loaded=3,
    )  # fmt: skip
    lines = render(reply, dry_run=False).splitlines()
    assert lines[0] == "expert load (token slots the pool computed, all MoE layers): 100"
    assert lines[1] == "  hottest: 0: 60%, 1: 20%, 2: 10%, 3: 10%"
    assert lines[2] == "before: max/mean load per worker 1.60"
    assert lines[3].split() == ["expert-0", "experts", "0-1", "load", "80"]
    assert lines[5] == "after: max/mean load per worker 1.00"
    assert lines[6].split() == ["expert-0", "experts", "0,2-3", "load", "50"]
    assert lines[-1] == "applied: 3 experts loaded from the checkpoint; the pool serves the new placement"
    reply.applied = False
    assert render(reply, dry_run=True).splitlines()[-1] == "dry run: nothing changed (3 experts would load)"
