"""Deploy knobs of the mesh services: frozen dataclasses, and the one place that reads their flags and the
environment. `moemesh serve <role>` hands its parsed flags (and the flags it did not know, `args.extra`) to
`WorkerConfig.from_args` / `GatewayConfig.from_args`; every knob also has a `MOEMESH_*` environment variable
(so `moemesh up` passes knobs to all of its children at once). A flag wins over the environment.

    knob                           flag                          environment
    engine page size               --page-size                   MOEMESH_PAGE_SIZE
    KV pages (exact count)         --num-kv-pages                MOEMESH_NUM_KV_PAGES
    KV pool bytes                  --kv-cache-bytes              MOEMESH_KV_CACHE_BYTES
    requests per step              --max-num-seqs                MOEMESH_MAX_NUM_SEQS
    tokens per step                --max-num-batched-tokens      MOEMESH_MAX_NUM_BATCHED_TOKENS
    dtype                          --dtype                       MOEMESH_DTYPE
    local prefill threshold        --local-prefill-tokens        MOEMESH_LOCAL_PREFILL_TOKENS
    lease time to live             --lease-ttl-s                 MOEMESH_LEASE_TTL_S
    KV crc32 per chunk             --kv-checksum                 MOEMESH_KV_CHECKSUM
    heartbeat interval             --heartbeat-s                 MOEMESH_HEARTBEAT_S
    worker silent this long dropped --worker-timeout-s (gateway)    MOEMESH_WORKER_TIMEOUT_S
    moves after a lost decode      --max-migrations (gateway)    MOEMESH_MAX_MIGRATIONS
    torch intra-op threads         --torch-threads               MOEMESH_TORCH_THREADS
    share of the GPU's memory      --gpu-memory-fraction         MOEMESH_GPU_MEMORY_FRACTION
    UCX transports ("" = any)      --ucx-transports              MOEMESH_UCX_TRANSPORTS
    UCX network devices ("" = all) --ucx-net-devices             MOEMESH_UCX_NET_DEVICES
    routed experts in the pool     --remote-experts              MOEMESH_REMOTE_EXPERTS
    expert wire token format       --expert-token-format         MOEMESH_EXPERT_TOKEN_FORMAT
    expert round-trip limit        --expert-timeout-s            MOEMESH_EXPERT_TIMEOUT_S
    experts an expert worker hosts --experts (expert role)       (none: per worker)
    ping-pong decode micro-batches --pingpong                    MOEMESH_PINGPONG
    gateway in-flight limit        --max-inflight                MOEMESH_MAX_INFLIGHT
    drain on SIGTERM, at most      --drain-grace-s               MOEMESH_DRAIN_GRACE_S
    mesh this process belongs to   --mesh-id                     MOEMESH_MESH_ID
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.config.engine import EngineConfig
from moemesh.config.security import SecurityConfig

# The demo checkpoint: `models/demo` in a source checkout (and an editable install); the data-only package
# `moemesh.demo` in an installed wheel (setup.py ships it there).
DEMO_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "demo"
WHEEL_DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
DTYPES = ("auto", "float32", "bfloat16")
# UCX_TLS by device: TCP on loopback moves host memory; on CUDA, cuda_copy / cuda_ipc move device memory
# (between processes on one GPU or NVLink peers) and sm carries the small headers and acks.
CPU_UCX_TRANSPORTS = "tcp,self"
CUDA_UCX_TRANSPORTS = "tcp,self,sm,cuda_copy,cuda_ipc"
EXPERT_TOKEN_FORMATS = ("bf16", "fp8")


def parse_expert_set(spec: str, num_experts: int) -> tuple[int, ...]:
    """The routed experts an expert-pool worker hosts, ascending. spec: "all"; "i/N" (the i-th of N
    contiguous, balanced shards); or ids and ranges, "0-7,12". Raises ValueError naming the spec."""
    spec = spec.strip()
    if spec == "all":
        return tuple(range(num_experts))
    if "/" in spec:
        index, _, count = spec.partition("/")
        if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count) <= num_experts:
            raise ValueError(f"experts={spec!r} must be 'i/N' with 0 <= i < N <= {num_experts}")
        i, n = int(index), int(count)
        return tuple(range(i * num_experts // n, (i + 1) * num_experts // n))
    ids: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"experts={spec!r} must be 'all', 'i/N' or ids and ranges like '0-7,12'")
        ids.update(range(int(first), int(last or first) + 1))
    if not ids or max(ids) >= num_experts:
        raise ValueError(f"experts={spec!r} names experts outside 0..{num_experts - 1}")
    return tuple(sorted(ids))


def demo_dir() -> Path:
    """Where the demo checkpoint lies: the source checkout's when there is one, else the installed wheel's."""
    return DEMO_DIR if (DEMO_DIR / "config.json").is_file() else WHEEL_DEMO_DIR


def resolve_model_dir(model: str | Path) -> Path:
    """'demo' is the bundled checkpoint; anything else is a directory with a config.json."""
    path = demo_dir() if str(model) == "demo" else Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return path


def _check(checks: list[tuple[str, bool, str]], obj: object) -> None:
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(obj, name)!r} {rule}")


@dataclass(frozen=True)
class WorkerConfig:
    """A prefill, decode or colocated worker.

    * local_prefill_tokens: D prefills a prompt itself when at most this many of its tokens are not in D's
      prefix cache (conditional disaggregation); 0 = always on a prefill worker when one is ready.
    * force_local_prefill: the colocated role (no prefill workers at all).
    * lease_ttl_s: how long a KV lease accepts writes; the reaper ends leases past it.
    * kv_checksum: crc32 per KV chunk, checked by the receiver (tests; costs a pass over the bytes).
    * torch_threads: torch's intra-op threads in this process; 0 = torch's default (every core). On a CPU box
      `moemesh up` gives each worker its share of the cores: oversubscribed OpenMP threads spin and a step
      can get several times slower.
    """

    role: str
    worker_id: str
    host: str = "127.0.0.1"
    port: int = 0
    model: str = "demo"
    device: str = "cpu"
    dtype: str = "auto"
    registry: str = ""
    engine: EngineConfig = field(default_factory=EngineConfig)
    local_prefill_tokens: int = 16
    force_local_prefill: bool = False
    lease_ttl_s: float = 30.0
    reaper_interval_s: float = 0.5
    kv_checksum: bool = False
    heartbeat_s: float = 0.5
    torch_threads: int = 0
    ucx_transports: str = CPU_UCX_TRANSPORTS  # UCX_TLS; "" lets UCX pick. from_args: by device
    ucx_net_devices: str = "lo"  # UCX_NET_DEVICES; "" = all
    drain_grace_s: float = 30.0  # on SIGTERM: leave the mesh, then let requests finish this long at most
    security: SecurityConfig = field(default_factory=SecurityConfig)  # mutual TLS (docs/security.md)
    http_port: int = 0  # /metrics; 0 = no HTTP
    mesh_id: str = ""  # sent with its registration; the registry refuses another mesh's workers
    remote_experts: bool = False  # the routed experts run in the expert pool (topology pd-experts)
    expert_token_format: str = "bf16"
    expert_timeout_s: float = 10.0  # one MoE layer's round trip; also how long a call waits for the pool
    experts: str = "all"  # expert role: which routed experts it hosts (see parse_expert_set)

    def __post_init__(self) -> None:
        _check(
            [
                ("http_port", 0 <= self.http_port <= 65535, "must be in [0, 65535] (0 = off)"),
                ("torch_threads", self.torch_threads >= 0, "must be >= 0 (0 = torch's default)"),
                (
                    "role",
                    self.role in ("prefill", "decode", "colocated", "expert"),
                    "must be prefill, decode, colocated or expert",
                ),
                (
                    "expert_token_format",
                    self.expert_token_format in EXPERT_TOKEN_FORMATS,
                    f"must be one of {', '.join(EXPERT_TOKEN_FORMATS)}",
                ),
                ("expert_timeout_s", self.expert_timeout_s > 0, "must be > 0"),
                (
                    "remote_experts",
                    not (self.remote_experts and self.role == "expert"),
                    "is for attention workers",
                ),
                ("worker_id", bool(self.worker_id), "must be non-empty"),
                ("dtype", self.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}"),
                ("local_prefill_tokens", self.local_prefill_tokens >= 0, "must be >= 0"),
                ("lease_ttl_s", self.lease_ttl_s > 0, "must be > 0"),
                ("reaper_interval_s", self.reaper_interval_s > 0, "must be > 0"),
                ("heartbeat_s", self.heartbeat_s > 0, "must be > 0"),
                ("drain_grace_s", self.drain_grace_s >= 0, "must be >= 0"),
            ],
            self,
        )

    @property
    def model_dir(self) -> Path:
        return resolve_model_dir(self.model)

    @property
    def ucx_moves_device_memory(self) -> bool:
        """Whether the UCX transports named can move CUDA memory ("" lets UCX pick: assumed yes)."""
        names = {t.strip() for t in self.ucx_transports.split(",")}
        return not self.ucx_transports or bool(names & {"cuda_copy", "cuda_ipc", "cuda", "rc", "rc_x", "dc"})

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> WorkerConfig:
        """From `moemesh serve <role>`'s flags; `args.extra` holds the worker flags of the table above."""
        env = os.environ if env is None else env
        extra = _worker_parser(env).parse_args(list(getattr(args, "extra", []) or []))
        engine = EngineConfig(
            page_size=extra.page_size,
            max_num_seqs=extra.max_num_seqs,
            max_num_batched_tokens=extra.max_num_batched_tokens,
            num_kv_pages=extra.num_kv_pages,
            kv_cache_memory_bytes=extra.kv_cache_bytes,
            gpu_memory_utilization=extra.gpu_memory_fraction,
            pingpong=extra.pingpong,
        )
        transports = extra.ucx_transports
        if transports is None:
            # "auto" by hand keeps TCP; `moemesh up` resolves auto to cuda or cpu before starting workers
            transports = CUDA_UCX_TRANSPORTS if args.device == "cuda" else CPU_UCX_TRANSPORTS
        return cls(
            role=args.role,
            worker_id=args.worker_id or f"{args.role}-{args.port}",
            host=args.host,
            port=args.port,
            model=args.model,
            device=args.device,
            dtype=extra.dtype,
            registry=args.registry,
            engine=engine,
            local_prefill_tokens=extra.local_prefill_tokens,
            force_local_prefill=args.role == "colocated",
            lease_ttl_s=extra.lease_ttl_s,
            kv_checksum=extra.kv_checksum,
            heartbeat_s=extra.heartbeat_s,
            torch_threads=extra.torch_threads,
            ucx_transports=transports,
            ucx_net_devices=extra.ucx_net_devices,
            drain_grace_s=extra.drain_grace_s,
            security=security_from_args(args, env),
            http_port=getattr(args, "http_port", 0) or 0,
            mesh_id=extra.mesh_id,
            remote_experts=extra.remote_experts,
            expert_token_format=extra.expert_token_format,
            expert_timeout_s=extra.expert_timeout_s,
            experts=extra.experts,
        )


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway. max_inflight: requests in flight at once; beyond it Generate is RESOURCE_EXHAUSTED."""

    host: str = "127.0.0.1"
    port: int = 50051
    model: str = "demo"
    topology: str = "pd"
    max_inflight: int = 256
    heartbeat_s: float = 0.5
    pick_timeout_s: float = 10.0  # how long Generate waits for a decode worker to register
    # A worker silent this long is dropped. Generous: a worker's heartbeat can wait behind a long engine step
    # on a busy CPU, and dropping a live worker strands its requests' routing.
    worker_timeout_s: float = 5.0
    max_migrations: int = 2  # decode workers a request may move to after the first one is lost
    security: SecurityConfig = field(default_factory=SecurityConfig)  # mutual TLS, API keys
    http_port: int = 0  # OpenAI-compatible HTTP and /metrics; 0 = no HTTP
    mesh_id: str = ""  # the registry admits only workers that name this mesh

    def __post_init__(self) -> None:
        _check(
            [
                ("http_port", 0 <= self.http_port <= 65535, "must be in [0, 65535] (0 = off)"),
                ("max_inflight", self.max_inflight >= 1, "must be >= 1"),
                ("max_migrations", self.max_migrations >= 0, "must be >= 0"),
                ("heartbeat_s", self.heartbeat_s > 0, "must be > 0"),
                ("worker_timeout_s", self.worker_timeout_s >= self.heartbeat_s, "must be >= heartbeat_s"),
                ("pick_timeout_s", self.pick_timeout_s >= 0, "must be >= 0"),
            ],
            self,
        )

    @property
    def model_dir(self) -> Path:
        return resolve_model_dir(self.model)

    @property
    def model_id(self) -> str:
        return Path(self.model).name if self.model != "demo" else "demo"

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> GatewayConfig:
        env = os.environ if env is None else env
        p = argparse.ArgumentParser(prog="moemesh serve gateway", add_help=False)
        p.add_argument("--max-inflight", type=int, default=int(env.get("MOEMESH_MAX_INFLIGHT", 256)))
        p.add_argument("--heartbeat-s", type=float, default=float(env.get("MOEMESH_HEARTBEAT_S", 0.5)))
        p.add_argument(
            "--worker-timeout-s", type=float, default=float(env.get("MOEMESH_WORKER_TIMEOUT_S", 5.0))
        )
        p.add_argument("--max-migrations", type=int, default=int(env.get("MOEMESH_MAX_MIGRATIONS", 2)))
        p.add_argument("--mesh-id", default=env.get("MOEMESH_MESH_ID", ""))
        extra = p.parse_args(list(getattr(args, "extra", []) or []))
        return cls(
            host=args.host, port=args.port, model=args.model, topology=args.topology,
            max_inflight=extra.max_inflight, heartbeat_s=extra.heartbeat_s,
            worker_timeout_s=extra.worker_timeout_s, max_migrations=extra.max_migrations,
            security=security_from_args(args, env),
            http_port=getattr(args, "http_port", 0) or 0,
            mesh_id=extra.mesh_id,
        )  # fmt: skip


def security_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> SecurityConfig:
    """`serve`'s --tls-dir / --api-keys over MOEMESH_TLS_DIR / MOEMESH_API_KEYS_FILE."""
    return SecurityConfig.from_values(getattr(args, "tls_dir", None), getattr(args, "api_keys", None), env)


def _optional_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _worker_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moemesh serve <worker role>", add_help=False)
    p.add_argument("--page-size", type=int, default=int(env.get("MOEMESH_PAGE_SIZE", 64)))
    p.add_argument("--num-kv-pages", type=int, default=_optional_int(env.get("MOEMESH_NUM_KV_PAGES")))
    p.add_argument("--kv-cache-bytes", type=int, default=_optional_int(env.get("MOEMESH_KV_CACHE_BYTES")))
    p.add_argument("--max-num-seqs", type=int, default=int(env.get("MOEMESH_MAX_NUM_SEQS", 64)))
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=int(env.get("MOEMESH_MAX_NUM_BATCHED_TOKENS", 2048))
    )
    p.add_argument("--dtype", default=env.get("MOEMESH_DTYPE", "auto"))
    p.add_argument(
        "--local-prefill-tokens", type=int, default=int(env.get("MOEMESH_LOCAL_PREFILL_TOKENS", 16))
    )
    p.add_argument("--lease-ttl-s", type=float, default=float(env.get("MOEMESH_LEASE_TTL_S", 30.0)))
    p.add_argument(
        "--kv-checksum", action="store_true", default=env.get("MOEMESH_KV_CHECKSUM", "") in ("1", "true")
    )
    p.add_argument("--heartbeat-s", type=float, default=float(env.get("MOEMESH_HEARTBEAT_S", 0.5)))
    p.add_argument("--torch-threads", type=int, default=int(env.get("MOEMESH_TORCH_THREADS", 0)))
    p.add_argument(
        "--gpu-memory-fraction", type=float, default=float(env.get("MOEMESH_GPU_MEMORY_FRACTION", 0.9))
    )
    p.add_argument("--ucx-transports", default=env.get("MOEMESH_UCX_TRANSPORTS"))  # None: by device
    p.add_argument("--ucx-net-devices", default=env.get("MOEMESH_UCX_NET_DEVICES", "lo"))
    p.add_argument("--drain-grace-s", type=float, default=float(env.get("MOEMESH_DRAIN_GRACE_S", 30.0)))
    p.add_argument("--mesh-id", default=env.get("MOEMESH_MESH_ID", ""))
    p.add_argument(
        "--remote-experts", action="store_true",
        default=env.get("MOEMESH_REMOTE_EXPERTS", "") in ("1", "true"),
    )  # fmt: skip
    p.add_argument("--expert-token-format", default=env.get("MOEMESH_EXPERT_TOKEN_FORMAT", "bf16"))
    p.add_argument("--expert-timeout-s", type=float, default=float(env.get("MOEMESH_EXPERT_TIMEOUT_S", 10.0)))
    p.add_argument("--experts", default="all")
    p.add_argument(
        "--pingpong", action="store_true", default=env.get("MOEMESH_PINGPONG", "") in ("1", "true")
    )
    return p
