"""`moemesh up | serve <role> | generate | rebalance | ...`: the command line. A composition root: it parses flags and
hands them to the module that does the work.

Each subcommand adds its own subparser through a `_add_<name>(subparsers)` function listed in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from moemesh import make_checkpoint, tls_certs

if TYPE_CHECKING:
    from moemesh.supervisor import UpOptions

from moemesh import rebalance_cli, trace_cli
from moemesh.config.telemetry import TelemetryConfig
from moemesh.config.telemetry import add_arguments as add_telemetry_arguments
from moemesh.console import Console

SERVE_ROLES = ("gateway", "prefill", "decode", "colocated", "expert", "health")


# --- up ---------------------------------------------------------------------------------------------------


def _add_up(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="start the whole mesh as child processes; Ctrl-C stops it",
        description="Start the whole mesh as child processes; Ctrl-C stops it. A worker that dies is "
        "reported, dropped from routing at once and restarted with a backoff (1 s, 2 s, 4 s, ...) at most "
        "--max-restarts times in a row, while the others keep serving; --fail-fast stops the mesh instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="demo", help="checkpoint directory, or 'demo' (the bundled model)")
    p.add_argument("--topology", default="pd", choices=("colocated", "pd", "pd-experts"),
                   help="which roles run: one worker does all, or prefill and decode apart (+ expert pool)")  # fmt: skip
    p.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill workers (pd topologies)")
    p.add_argument("--decode", type=int, default=1, metavar="N", help="decode (or colocated) workers")
    p.add_argument("--experts", type=int, default=1, metavar="N", help="expert-pool workers (pd-experts)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the workers run")
    p.add_argument("--host", default="127.0.0.1", help="the address every process listens on")
    p.add_argument("--port", type=int, default=50051,
                   help="the gateway's gRPC port (0: pick a free one and print it)")  # fmt: skip
    p.add_argument("--http-port", type=int, default=8000,
                   help="the gateway's HTTP port: OpenAI-compatible /v1 API, /metrics and /traces; each "
                   "worker serves /metrics on a free port, printed at start; 0 = no HTTP")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=300.0, metavar="S",
                   help="seconds every process gets to become healthy")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="torch threads per worker (None: on CPU, the cores split among the workers)")  # fmt: skip
    p.add_argument("--gpu-memory-fraction", action="append", default=[], metavar="[ROLE=]F",
                   help="CUDA: a worker's share of its GPU's memory, for every role or one (prefill=0.3); "
                   "none: 0.9 split evenly among the workers sharing a GPU")  # fmt: skip
    p.add_argument(
        "--demo-prompt",
        default="",
        metavar="TEXT",
        help="once ready, stream this prompt through the SDK (what `make run` does), then serve",
    )
    p.add_argument(
        "--demo-max-tokens", type=int, default=48, metavar="N", help="tokens the demo request asks for"
    )
    _add_security_flags(p, "every process of the mesh")
    p.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="restarts in a row of a worker that dies before it stays down (0: never)")  # fmt: skip
    p.add_argument("--fail-fast", action="store_true",
                   help="when any process dies, stop the whole mesh and exit 1 (tests)")  # fmt: skip
    add_telemetry_arguments(p, request_log_level="WARNING")  # per-request lines stay out of the console
    p.set_defaults(func=_cmd_up)


def _cmd_up(args: argparse.Namespace) -> int:
    """Validates everything it can before starting a child: a bad flag, a missing model, no CUDA device for
    --device cuda or a port in use is one line on stderr and exit status 2, with nothing started."""
    import secrets

    from moemesh.config.devices import parse_fractions
    from moemesh.config.mesh import resolve_model_dir
    from moemesh.config.security import SecurityConfig
    from moemesh.supervisor import (
        RestartPolicy,
        Supervisor,
        UpOptions,
        free_ports,
        plan_children,
        port_in_use,
    )

    port = args.port
    try:
        telemetry = TelemetryConfig.from_args(args)
        if port == 0:
            port = free_ports(1, args.host)[0]
            print(f"--port 0: the gateway listens on free port {port}", flush=True)
        options = UpOptions(
            model=args.model, topology=args.topology, num_prefill=args.prefill, num_decode=args.decode,
            num_expert=args.experts, device=args.device, host=args.host, port=port,
            http_port=args.http_port, torch_threads=args.torch_threads, mesh_id=secrets.token_hex(8),
            child_args=telemetry.child_args(),
            security=SecurityConfig.from_values(args.tls_dir, args.api_keys),
            gpu_memory_fractions=tuple(parse_fractions(args.gpu_memory_fraction).items()),
        )  # fmt: skip
        restart = RestartPolicy(max_restarts=args.max_restarts)
        if args.startup_timeout <= 0:
            raise ValueError(f"startup_timeout={args.startup_timeout} must be > 0")
        if args.demo_max_tokens < 1:
            raise ValueError(f"demo_max_tokens={args.demo_max_tokens} must be >= 1")
        try:
            resolve_model_dir(args.model)
        except FileNotFoundError as err:
            hint = " (train it: python tools/train_demo.py)" if args.model == "demo" else ""
            raise ValueError(f"{err}{hint}") from None
        for flag, value in (("--port", options.port), ("--http-port", options.http_port)):
            if value and port_in_use(options.host, value):  # 0: no HTTP
                raise ValueError(
                    f"port {value} is in use on {options.host} (another mesh? pick another {flag})"
                )
        specs = plan_children(options)  # ValueError for --device cuda without a GPU
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # port_in_use: a host that does not resolve, or is not this machine's
        print(f"error: host={args.host!r}: cannot listen there ({err.strerror or err})", file=sys.stderr)
        return 2
    target = f"{options.host}:{options.port}"
    tls = options.security.tls_files()
    from moemesh.transport.channels import forget_worker

    def forget(worker_id: str) -> None:  # the gateway stops routing to a worker that died, at once
        forget_worker(target, worker_id, options.mesh_id, tls=tls)

    supervisor = Supervisor(
        specs, startup_timeout_s=args.startup_timeout, fail_fast=args.fail_fast,
        restart=restart, forget=forget, tls=tls, prefix_lines=telemetry.log_format == "text",
    )  # fmt: skip
    ready = f"ready on {target}"
    if options.http_port:
        http = f"http://{options.host}:{options.http_port}"
        ready += f" (OpenAI-compatible HTTP on {http}/v1, metrics on {http}/metrics, traces on {http}/traces)"
    on_ready = None
    if args.demo_prompt:
        on_ready = functools.partial(
            _demo_request, target, args.demo_prompt, args.demo_max_tokens, options, supervisor.console
        )
    return supervisor.run(ready, on_ready)


def _demo_request(target: str, prompt: str, max_tokens: int, options: UpOptions, console: Console) -> None:
    """Streams one greedy request through the SDK, printing text as it arrives (`make run`), with the mesh's
    own certificate and first API key when those are on; the children's log lines wait until the text is done."""
    from moemesh.sdk import Client, MoemeshError, TlsOptions

    security = options.security
    keys = security.api_keys()
    tls = TlsOptions.from_dir(security.tls_dir) if security.tls_dir else None
    try:
        with (
            Client(target, timeout_s=300, api_key=keys[0] if keys else None, tls=tls) as client,
            console.stream() as write,
        ):
            write(f"\n--- demo request through the SDK ({target}):\n{prompt}")
            for chunk in client.generate(prompt=prompt, max_tokens=max_tokens, temperature=0):
                write(chunk.text)
            write(f"\n--- serving on {target} until Ctrl-C (moemesh generate --target {target} PROMPT)")
    except MoemeshError as err:
        console.line(f"error: demo request failed: {err}")


# --- serve ------------------------------------------------------------------------------------------------


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run one role in this process (what `up` and the Helm chart run)")
    p.add_argument("role", choices=SERVE_ROLES, help="'health' serves only gRPC health (tests, probes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--registry", default="", metavar="HOST:PORT", help="the gateway workers register with")
    p.add_argument("--worker-id", default="")
    p.add_argument("--http-port", type=int, default=0,
                   help="HTTP port: /metrics (the gateway's also serves the OpenAI-compatible /v1 API); 0 = off")  # fmt: skip
    p.add_argument("--topology", default="pd", help="gateway only")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process dies (set by `up`)")
    add_telemetry_arguments(p)
    _add_security_flags(p, "this process")
    p.set_defaults(func=_cmd_serve)


def _add_security_flags(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help=f"mutual TLS for {who}: DIR holds ca.crt, tls.crt, tls.key (moemesh make-certs; "
                        "env MOEMESH_TLS_DIR)")  # fmt: skip
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help="the gateway accepts only clients sending one of FILE's keys (one per line) as "
                        "'authorization: Bearer KEY' (env MOEMESH_API_KEYS_FILE)")  # fmt: skip


def _cmd_serve(args: argparse.Namespace) -> int:
    from moemesh.telemetry.logs import setup_logging

    try:
        telemetry = TelemetryConfig.from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(args.worker_id or args.role, level=telemetry.log_level, log_format=telemetry.log_format,
                  request_level=telemetry.request_log_level)  # fmt: skip
    if args.parent_pid:
        from moemesh.supervisor import die_with_parent

        die_with_parent(args.parent_pid)
    if args.role == "health":
        if args.extra:
            print(f"error: unrecognized arguments: {' '.join(args.extra)}", file=sys.stderr)
            return 2
        if args.http_port:
            print("error: --http-port: the health role serves gRPC health only", file=sys.stderr)
            return 2
        return asyncio.run(_serve_health_only(args.host, args.port))
    try:
        role_main = importlib.import_module(f"moemesh.services.{args.role}.main")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("moemesh.services"):
            raise
        print(f"error: role {args.role!r} is not built yet (moemesh.services.{args.role})", file=sys.stderr)
        return 2
    return int(role_main.main(args) or 0)  # main(args): the flags above, plus args.extra for its own


async def _serve_health_only(host: str, port: int) -> int:
    from moemesh.transport.server import MeshServer, ServerOptions, serve_until_signalled

    server = MeshServer(ServerOptions(host=host, port=port, grace_s=1.0))
    await server.start()
    await serve_until_signalled(server)
    return 0


# --- generate ---------------------------------------------------------------------------------------------


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text: from a running mesh (--target) or in-process")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", metavar="HOST:PORT", help="a running gateway (stream through the SDK)")
    where.add_argument("--model", metavar="DIR", help="run in this process on a checkpoint dir or 'demo'")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (the default everywhere: CLI, LLM, SDK, gateway) is greedy")  # fmt: skip
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="with --target: send FILE's first key (the --api-keys format) as the API key")  # fmt: skip
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="with --target: connect with TLS as the client of DIR (ca.crt, tls.crt, tls.key: "
                        "make-certs' DIR/client)")  # fmt: skip
    p.add_argument("prompt")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    sampling = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.target:
        from moemesh.config.security import SecurityConfig
        from moemesh.sdk import Client, InvalidRequest, MoemeshError, TlsOptions

        printed = False
        try:
            target = _check_target(args.target)
            api_key = (
                SecurityConfig(api_keys_file=args.api_key_file).api_keys()[0] if args.api_key_file else None
            )
            tls = TlsOptions.from_dir(args.tls_dir) if args.tls_dir else None
            with Client(target, api_key=api_key, tls=tls) as client:
                for chunk in client.generate(prompt=args.prompt, **sampling):
                    print(("" if printed else args.prompt) + chunk.text, end="", flush=True)
                    printed = True
            print()
        except (InvalidRequest, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except MoemeshError as err:  # unreachable, overloaded, deadline, a lost worker: one line, exit 1
            if printed:
                print()
            print(f"error: {args.target}: {err.code}: {err}", file=sys.stderr)
            return 1
        return 0
    from moemesh import LLM, SamplingParams

    try:
        params = SamplingParams(**sampling)
        llm = LLM(args.model or "demo", device=args.device, progress=sys.stderr.isatty())
        completion = llm.generate([args.prompt], params)[0]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + completion.text)
    print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]", file=sys.stderr)
    return 0


def _check_target(target: str) -> str:
    """HOST:PORT with a port in [1, 65535] (gRPC would otherwise quietly try 443)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--target={target!r} must be HOST:PORT with a port in [1, 65535]")
    return target


# --- main -------------------------------------------------------------------------------------------------


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from moemesh.benchmark.cli import add_parser

    add_parser(subparsers)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_up,
    _add_serve,
    _add_generate,
    tls_certs.add_parser,
    _add_bench,
    make_checkpoint.add_parser,
    trace_cli.add_parser,
    rebalance_cli.add_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemesh", description="serve DeepSeek-V3-family MoE models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `serve` leaves flags it does not know to the role (`args.extra`, parsed by the role's own main);
    # every other subcommand rejects them.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: no traceback, the shell's status for SIGINT
        print(file=sys.stderr)
        return 130


def entry() -> None:
    """The `moemesh` command (and `python -m moemesh.cli`): main(), then exit with its status. A `serve` process
    returns once its server stopped and its sockets, UCX endpoints and engine are closed; what is left is the
    interpreter's own shutdown, whose final garbage collection can block for many seconds on the finalizers of
    grpc.aio and ucxx objects (every stop overran `up`'s 10 s grace), so a role process skips it."""
    argv = sys.argv[1:]
    try:
        code = main(argv)
    except SystemExit as exit_:  # a bad flag, or a worker the registry refused (status 3): the same fast exit
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    if argv[:1] == ["serve"]:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
