"""Where `moemesh up` puts each worker on CUDA: which GPU (`CUDA_VISIBLE_DEVICES` per child) and what share of
that GPU's memory it may take (`--gpu-memory-fraction`, the engine's `gpu_memory_utilization`).

* As many GPUs as workers or more: one worker per GPU, each with the whole `DEFAULT_GPU_MEMORY_UTILIZATION`.
* Fewer GPUs: workers go round-robin and the ones sharing a GPU split it evenly
  (two on one card: 0.45 each), so the second worker no longer plans 0 KV pages.
* A per-role fraction (`moemesh up --gpu-memory-fraction prefill=0.3 --gpu-memory-fraction decode=0.6`, or
  one number for every role) replaces the even split; the fractions on one GPU must add up to at most 1.
* Prefill, decode and colocated workers plan their KV pools from their share; an expert-pool worker's share
  caps its allocator (`serve expert`'s `cap_device_memory`).

Pure: the GPU count and the parent's `CUDA_VISIBLE_DEVICES` are arguments (the supervisor reads the machine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # of one card, split among the workers that share it
WORKER_ROLES = ("prefill", "decode", "colocated", "expert")


@dataclass(frozen=True)
class Placement:
    """One worker's device: the environment and the extra `serve` flags its process gets."""

    gpu: int | None  # the physical GPU (an entry of the parent's CUDA_VISIBLE_DEVICES); None on CPU
    gpu_memory_fraction: float | None
    env: tuple[tuple[str, str], ...] = ()
    serve_args: tuple[str, ...] = ()


def parse_fractions(values: Sequence[str]) -> dict[str, float]:
    """`["0.4"]` -> every role 0.4; `["prefill=0.3", "decode=0.6"]` -> per role. ValueError names the value."""
    fractions: dict[str, float] = {}
    for value in values:
        role, _, number = value.rpartition("=")
        roles = [role] if role else list(WORKER_ROLES)
        if role and role not in WORKER_ROLES:
            raise ValueError(
                f"gpu_memory_fraction={value!r}: role {role!r} must be one of {', '.join(WORKER_ROLES)}"
            )
        try:
            fraction = float(number)
        except ValueError:
            raise ValueError(f"gpu_memory_fraction={value!r} must be F or ROLE=F with F in (0, 1]") from None
        if not 0 < fraction <= 1:
            raise ValueError(f"gpu_memory_fraction={value!r}: {fraction} must be in (0, 1]")
        fractions.update(dict.fromkeys(roles, fraction))
    return fractions


def plan_devices(
    roles: Sequence[str],
    device: str,
    num_gpus: int,
    fractions: Mapping[str, float] | None = None,
    visible_devices: str | None = None,
) -> list[Placement]:
    """One Placement per worker role in `roles` (in order). device 'cpu' places nothing; 'cuda' needs a GPU
    (ValueError otherwise); 'auto' is 'cuda' when there is one. `visible_devices`: the parent's
    CUDA_VISIBLE_DEVICES (its entries are what the children get), None = GPUs 0..num_gpus-1."""
    fractions = dict(fractions or {})
    if device == "cpu" or (device == "auto" and num_gpus == 0):
        return [Placement(None, None) for _ in roles]
    if num_gpus < 1:
        raise ValueError(f"device={device!r} but no CUDA GPU is visible (num_gpus={num_gpus})")
    ids = (
        [s.strip() for s in visible_devices.split(",")]
        if visible_devices
        else [str(i) for i in range(num_gpus)]
    )
    ids = ids[:num_gpus]
    gpu_of = [i % num_gpus for i in range(len(roles))]
    sharing = {g: gpu_of.count(g) for g in set(gpu_of)}
    plan = []
    for role, g in zip(roles, gpu_of, strict=True):
        fraction = fractions.get(role, round(DEFAULT_GPU_MEMORY_UTILIZATION / sharing[g], 4))
        plan.append(Placement(int(ids[g]) if ids[g].isdigit() else g, fraction,
                              (("CUDA_VISIBLE_DEVICES", ids[g]),), ("--gpu-memory-fraction", str(fraction))))  # fmt: skip
    for g in sharing:
        total = sum(p.gpu_memory_fraction or 0 for p, gg in zip(plan, gpu_of, strict=True) if gg == g)
        if total > 1 + 1e-9:
            on = [r for r, gg in zip(roles, gpu_of, strict=True) if gg == g]
            raise ValueError(f"gpu_memory_fraction: the workers on GPU {ids[g]} ({', '.join(on)}) would take "
                             f"{total:.2f} of it, more than 1")  # fmt: skip
    return plan
