"""`moemesh up --device cuda`: the GPU and memory share each child gets, planned on CPU for 1, 2 and 4 GPUs."""

from __future__ import annotations

import argparse

import pytest

from moemesh.config.devices import parse_fractions, plan_devices
from moemesh.config.mesh import CPU_UCX_TRANSPORTS, CUDA_UCX_TRANSPORTS, WorkerConfig
from moemesh.supervisor import UpOptions, plan_children


def worker_env(specs) -> dict[str, tuple[dict[str, str], str | None]]:
    """child name -> (its env, its --gpu-memory-fraction)."""
    out = {}
    for spec in specs[1:]:
        args = list(spec.serve_args)
        fraction = args[args.index("--gpu-memory-fraction") + 1] if "--gpu-memory-fraction" in args else None
        out[spec.name] = (dict(spec.env), fraction)
    return out


def test_one_gpu_is_split_between_prefill_and_decode():
    specs = plan_children(UpOptions(topology="pd", device="cuda", port=50200), num_gpus=1)
    assert specs[0].env == () and "--gpu-memory-fraction" not in specs[0].serve_args  # the gateway
    assert worker_env(specs) == {
        "prefill-0": ({"CUDA_VISIBLE_DEVICES": "0"}, "0.45"),
        "decode-0": ({"CUDA_VISIBLE_DEVICES": "0"}, "0.45"),
    }
    assert all("--torch-threads" not in s.serve_args for s in specs)  # the CPU split is for CPUs only
    colocated = plan_children(UpOptions(topology="colocated", device="cuda", port=50201), num_gpus=1)
    assert worker_env(colocated) == {"colocated-0": ({"CUDA_VISIBLE_DEVICES": "0"}, "0.9")}


def test_two_and_four_gpus_give_each_worker_its_own():
    two = plan_children(UpOptions(topology="pd", device="cuda", port=50202), num_gpus=2)
    assert worker_env(two) == {
        "prefill-0": ({"CUDA_VISIBLE_DEVICES": "0"}, "0.9"),
        "decode-0": ({"CUDA_VISIBLE_DEVICES": "1"}, "0.9"),
    }
    four = plan_children(UpOptions(topology="pd", num_prefill=2, num_decode=4, device="cuda", port=50203),
                         num_gpus=4)  # fmt: skip
    env = worker_env(four)
    # six workers on four GPUs: round-robin, the two GPUs holding two workers split them
    assert [env[n][0]["CUDA_VISIBLE_DEVICES"] for n in env] == ["0", "1", "2", "3", "0", "1"]
    assert [env[n][1] for n in env] == ["0.45", "0.45", "0.9", "0.9", "0.45", "0.45"]


def test_per_role_fractions_and_the_parents_visible_devices():
    fractions = parse_fractions(["prefill=0.3", "decode=0.6"])
    plan = plan_devices(["prefill", "decode"], "cuda", 1, fractions, visible_devices="5,7")
    assert [(p.env, p.gpu_memory_fraction) for p in plan] == [
        ((("CUDA_VISIBLE_DEVICES", "5"),), 0.3),
        ((("CUDA_VISIBLE_DEVICES", "5"),), 0.6),
    ]
    assert parse_fractions(["0.4"])["decode"] == 0.4
    with pytest.raises(ValueError, match="GPU 0 \\(prefill, decode\\) would take 1.40 of it"):
        plan_devices(["prefill", "decode"], "cuda", 1, parse_fractions(["0.7"]))
    with pytest.raises(ValueError, match="role 'gateway' must be one of"):
        parse_fractions(["gateway=0.5"])
    with pytest.raises(ValueError, match="1.5 must be in \\(0, 1\\]"):
        parse_fractions(["1.5"])
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        plan_children(UpOptions(topology="pd", device="cuda", port=50204), num_gpus=0)
    auto = plan_children(UpOptions(topology="pd", device="auto", port=50205), num_gpus=0)
    assert all(s.env == () and s.serve_args[s.serve_args.index("--device") + 1] == "cpu" for s in auto)


def test_worker_takes_its_fraction_and_ucx_transports_by_device():
    def args(device: str, *extra: str) -> argparse.Namespace:
        return argparse.Namespace(role="decode", worker_id="d", host="127.0.0.1", port=1, model="demo",
                                  device=device, registry="", topology="pd", extra=list(extra))  # fmt: skip

    cuda = WorkerConfig.from_args(args("cuda", "--gpu-memory-fraction", "0.45"), {})
    assert cuda.engine.gpu_memory_utilization == 0.45
    assert cuda.ucx_transports == CUDA_UCX_TRANSPORTS and cuda.ucx_moves_device_memory
    cpu = WorkerConfig.from_args(args("cpu"), {})
    assert cpu.ucx_transports == CPU_UCX_TRANSPORTS and not cpu.ucx_moves_device_memory
    assert cpu.engine.gpu_memory_utilization == 0.9
    forced = WorkerConfig.from_args(args("cuda"), {"MOEMESH_UCX_TRANSPORTS": "tcp,self"})
    assert forced.ucx_transports == "tcp,self" and not forced.ucx_moves_device_memory
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.0 must be in"):
        WorkerConfig.from_args(args("cuda", "--gpu-memory-fraction", "0"), {})


def serve_config(spec) -> WorkerConfig:
    """What the child's `moemesh serve ...` builds from its flags and the env `up` gives it (no MOEMESH_*)."""
    from moemesh.cli import build_parser

    args, extra = build_parser().parse_known_args(["serve", *spec.serve_args])
    args.extra = extra
    return WorkerConfig.from_args(args, {})


@pytest.mark.parametrize("num_gpus", [1, 2])
def test_pd_experts_on_cuda_gives_every_process_its_share_and_the_cuda_transports(num_gpus):
    """`up --device cuda --topology pd-experts --experts 2`: P, D and both expert workers split the card(s);
    the expert workers' shares are passed too (they cap their allocators); every worker moves expert tokens in
    device memory over UCX's CUDA transports."""
    import torch

    from moemesh.services.remote_experts import wire_device

    specs = plan_children(UpOptions(topology="pd-experts", num_expert=2, device="cuda", port=50206),
                          num_gpus=num_gpus)  # fmt: skip
    assert specs[0].env == () and "--gpu-memory-fraction" not in specs[0].serve_args  # the gateway
    share = {1: "0.225", 2: "0.45"}[num_gpus]  # 4 workers: all on one card, or two on each of two
    gpus = {1: ["0", "0", "0", "0"], 2: ["0", "1", "0", "1"]}[num_gpus]
    assert worker_env(specs) == {
        name: ({"CUDA_VISIBLE_DEVICES": gpu}, share)
        for name, gpu in zip(["prefill-0", "decode-0", "expert-0", "expert-1"], gpus, strict=True)
    }
    configs = {spec.name: serve_config(spec) for spec in specs[1:]}
    for name, config in configs.items():
        assert (config.role, config.device) == (name.rpartition("-")[0], "cuda")
        assert config.engine.gpu_memory_utilization == float(share)
        assert config.ucx_transports == CUDA_UCX_TRANSPORTS and config.ucx_moves_device_memory
        assert wire_device(config, torch.device("cuda")) == torch.device("cuda")  # no host staging
        assert config.remote_experts == (config.role != "expert"), name
    assert [configs[f"expert-{i}"].experts for i in (0, 1)] == ["0/2", "1/2"]
    by_role = plan_children(UpOptions(topology="pd-experts", num_expert=2, device="cuda", port=50207,
                                      gpu_memory_fractions=(("expert", 0.1), ("decode", 0.5))), num_gpus=1)  # fmt: skip
    assert [v[1] for v in worker_env(by_role).values()] == ["0.225", "0.5", "0.1", "0.1"]
    with pytest.raises(ValueError, match=r"GPU 0 \(prefill, decode, expert, expert\) would take 1.10 of it"):
        plan_children(UpOptions(topology="pd-experts", num_expert=2, device="cuda", port=50208,
                                gpu_memory_fractions=(("prefill", 0.3), ("decode", 0.4), ("expert", 0.2))),
                      num_gpus=1)  # fmt: skip
    staged = serve_config(specs[-1])
    staged = WorkerConfig(**{**staged.__dict__, "ucx_transports": "tcp,self"})
    assert wire_device(staged, torch.device("cuda")) == torch.device("cpu")  # without CUDA transports: host


def test_an_expert_worker_caps_its_allocator_at_its_share(monkeypatch):
    import torch
    from torch.cuda._utils import _get_device_index

    from moemesh.config.engine import EngineConfig
    from moemesh.services.expert.main import cap_device_memory

    calls = []

    def fake(fraction, device=None):  # what torch's checks its arguments against, without a GPU
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        calls.append((fraction, _get_device_index(0 if device is None else device)))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fake)
    config = WorkerConfig(role="expert", worker_id="e", engine=EngineConfig(gpu_memory_utilization=0.225))
    for device in ("cuda", "cuda:1", "cpu"):
        cap_device_memory(config, torch.device(device))
    assert calls == [(0.225, 0), (0.225, 1)]
