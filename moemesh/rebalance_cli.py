"""`moemesh rebalance --target HOST:PORT`: asks the gateway to place the routed experts over the expert-pool
workers by their measured load (EPLB: replicate the hottest, pack by load) and to apply the placement without
dropping a request (docs/experts.md); prints the old and new placement and their balance. `--dry-run` only
prints. Light to import: grpc and the generated stubs."""

from __future__ import annotations

import argparse
import sys

import grpc

from moemesh._proto.v1 import expert_pb2, expert_pb2_grpc


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rebalance",
        help="re-place the routed experts over the expert pool by their measured load",
        description="Reads every expert worker's per-expert token counts through the gateway, computes an "
        "EPLB placement (replicas for the hottest experts, replicas packed by load) and applies it: each "
        "worker loads its new experts from the checkpoint before any drops its old ones, and requests in "
        "flight keep running.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="the gateway's gRPC address"
    )
    p.add_argument("--slots-per-worker", type=int, default=0, metavar="N",
                   help="experts each worker hosts afterwards; beyond an even share, the spare slots hold "
                   "replicas of the hottest experts (0: as many as the fullest worker hosts now)")  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true", help="print the placement it would apply; change nothing"
    )
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="a mesh with mutual TLS: the mesh's own certificate directory (the services' "
                   "tls.crt/tls.key, as --tls-dir of `up`): rebalancing is a mesh service, not a client one")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="seconds to wait (loading experts from a large checkpoint takes a while)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moemesh.config.security import SecurityConfig
    from moemesh.transport.channels import MeshChannels

    host, sep, port = args.target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        print(f"error: --target={args.target!r} must be HOST:PORT with a port in [1, 65535]", file=sys.stderr)
        return 2
    if args.slots_per_worker < 0:
        print(f"error: --slots-per-worker={args.slots_per_worker} must be >= 0", file=sys.stderr)
        return 2
    try:
        tls = SecurityConfig(tls_dir=args.tls_dir or "").tls_files()
    except (ValueError, OSError) as err:
        print(f"error: --tls-dir: {err}", file=sys.stderr)
        return 2
    request = expert_pb2.RebalanceRequest(dry_run=args.dry_run, slots_per_worker=args.slots_per_worker)
    try:
        with MeshChannels(tls).sync(args.target) as channel:
            reply = expert_pb2_grpc.ExpertAdminStub(channel).Rebalance(request, timeout=args.timeout)
    except grpc.RpcError as err:
        code = err.code()
        detail = err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and "expert worker" not in detail:
            detail = f"cannot reach the gateway ({detail})"
        print(f"error: {args.target}: {code.name}: {detail}", file=sys.stderr)
        return 1
    print(render(reply, args.dry_run))
    return 0


def render(reply: expert_pb2.RebalanceResponse, dry_run: bool) -> str:
    total = sum(reply.expert_load)
    lines = [f"expert load (token slots the pool computed, all MoE layers): {total}"]
    hottest = sorted(range(len(reply.expert_load)), key=lambda e: -reply.expert_load[e])[:8]
    lines.append("  hottest: " + ", ".join(f"{e}: {reply.expert_load[e] / total:.0%}" for e in hottest))
    for title, workers, balance in (("before", reply.before, reply.balance_before),
                                    ("after", reply.after, reply.balance_after)):  # fmt: skip
        lines.append(f"{title}: max/mean load per worker {balance:.2f}")
        for w in workers:
            lines.append(f"  {w.worker_id:<12} experts {_ranges(w.expert_ids):<24} load {w.load:.0f}")
    if reply.applied:
        lines.append(
            f"applied: {reply.experts_loaded} experts loaded from the checkpoint; the pool serves the new placement"
        )
    elif dry_run:
        lines.append(f"dry run: nothing changed ({reply.experts_loaded} experts would load)")
    else:
        lines.append("nothing to change: the pool already has this placement")
    return "\n".join(lines)


def _ranges(ids) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts: list[list[int]] = []
    for expert in sorted(ids):
        if parts and parts[-1][1] == expert - 1:
            parts[-1][1] = expert
        else:
            parts.append([expert, expert])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)
