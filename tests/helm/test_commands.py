"""Every command the images and the chart run exists in the CLI: the Dockerfiles' ENTRYPOINT + CMD and each
rendered pod's command + args go through `moemesh.cli.build_parser()` and then through the role's own flag
parser (`serve <role>` hands the flags it does not know to the role), with the role's ConfigMap as its
environment. A flag the chart passes that the CLI lacks fails here, naming it."""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

from moemesh.cli import build_parser
from moemesh.config.mesh import GatewayConfig, WorkerConfig
from tests.helm.chart import NAME, ROOT, VALUE_SETS, rendered

POD_ENV = {"POD_IP": "10.1.2.3", "POD_NAME": "mm-moemesh-decode-7d9f-x2x"}  # what the downward API fills in


def _parse(parser: argparse.ArgumentParser, argv: list[str], known_only: bool = False):
    """parse_args / parse_known_args, turning argparse's exit into an assertion that carries its message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_known_args(argv) if known_only else (parser.parse_args(argv), [])
    except SystemExit:
        raise AssertionError(f"`moemesh {' '.join(argv)}`: {stderr.getvalue().strip()}") from None


def check_cli(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    """Parses argv as `moemesh` would, the role's own flags included; returns the role's config object."""
    parser = build_parser()
    if argv[:1] != ["serve"]:
        args, _ = _parse(parser, argv)
        return args
    args, extra = _parse(parser, argv, known_only=True)
    args.extra = extra
    role = args.role
    module = f"moemesh.services.{role}.main"
    try:  # found, not imported (that would import torch)
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    assert found, f"`moemesh serve {role}`: the role is not built ({module} is missing)"
    try:
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            if role == "gateway":
                return GatewayConfig.from_args(args, env=env)
            if role in ("prefill", "decode", "colocated"):
                return WorkerConfig.from_args(args, env=env)
    except SystemExit:
        raise AssertionError(f"`moemesh {' '.join(argv)}`: {stderr.getvalue().strip()}") from None
    assert not extra, f"`moemesh serve {role}` does not take {extra}"
    return args


def _expand(arg: str) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: POD_ENV[m.group(1)], arg)


def _mount_secrets(r, pod: dict, container: dict, root: Path) -> dict[str, str]:
    """Writes the Secrets the container mounts under `root`, as the kubelet would at their mount paths (the
    roles check that --tls-dir holds ca.crt, tls.crt, tls.key and that --api-keys is a file); returns
    mount path -> where it lies here."""
    secrets = {name: obj for name, obj in r.of("Secret").items()}
    volumes = {v["name"]: v for v in pod["volumes"]}
    moved = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        here = root / mount["mountPath"].lstrip("/")
        here.mkdir(parents=True)
        for key, data in secrets[secret["secretName"]]["data"].items():
            (here / key).write_bytes(base64.b64decode(data))
        moved[mount["mountPath"]] = str(here)
    return moved


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_pod_command_exists_in_the_cli(value_set, tmp_path):
    r = rendered(value_set)
    config_maps = {name: obj.get("data") or {} for name, obj in r.of("ConfigMap").items()}
    for name, deployment in r.of("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["moemesh"], name
        (source,) = container["envFrom"]
        env = config_maps[source["configMapRef"]["name"]]
        moved = _mount_secrets(r, pod, container, tmp_path / name)
        args = []
        for arg in container["args"]:
            for mount_path, here in moved.items():
                arg = arg.replace(mount_path, here) if arg.startswith(mount_path) else arg
            args.append(_expand(arg))
        check_cli(args, env)


def test_the_commands_say_what_each_role_does():
    r = rendered("tls-auth")
    gateway = r.container("gateway")["args"]
    assert gateway[:2] == ["serve", "gateway"]
    assert _pairs(gateway) >= {
        ("--host", "0.0.0.0"),
        ("--port", "50051"),
        ("--http-port", "8000"),
        ("--topology", "pd"),
        ("--model", "demo"),
        ("--tls-dir", "/etc/moemesh/tls"),
        ("--api-keys", "/etc/moemesh/auth/api-keys"),
        ("--otlp-endpoint", "http://otel-collector.observability:4317"),
    }
    decode = r.container("decode")["args"]
    assert decode[:2] == ["serve", "decode"]
    assert _pairs(decode) >= {
        ("--host", "$(POD_IP)"),
        ("--registry", f"{NAME}-gateway:50051"),
        ("--worker-id", "$(POD_NAME)"),
        ("--device", "cuda"),
        ("--http-port", "9400"),
        ("--tls-dir", "/etc/moemesh/tls"),
    }
    assert "--api-keys" not in decode
    assert _pairs(rendered("cpu-demo").container("prefill")["args"]) >= {("--device", "cpu")}
    assert rendered("gpu-colocated").container("colocated")["args"][:2] == ["serve", "colocated"]
    assert _pairs(rendered("gpu-colocated").container("colocated")["args"]) >= {("--model", "/models/model")}
    expert = rendered("pd-experts").container("expert")["args"]
    assert expert[:2] == ["serve", "expert"] and ("--registry", f"{NAME}-gateway:50051") in _pairs(expert)
    for value_set in VALUE_SETS:  # TLS, API keys, OTLP only when the values turn them on
        args = str([c["args"] for c in (rendered(value_set).container(role) for role in ("gateway",))])
        on = value_set == "tls-auth"
        assert ("--tls-dir" in args, "--api-keys" in args, "--otlp-endpoint" in args) == (on, on, on)


def test_config_maps_reach_the_config_the_roles_build():
    r = rendered("gpu-colocated")
    env = r.of("ConfigMap")[f"{NAME}-colocated"]["data"]
    config = check_cli([_expand(a) for a in r.container("colocated")["args"]], env)
    assert (config.engine.max_num_seqs, config.engine.kv_cache_memory_bytes, config.lease_ttl_s) == (
        32,
        2**34 + 2**32,
        20.0,
    )
    assert (config.ucx_transports, config.ucx_net_devices) == ("", "")  # UCX picks transports and NICs
    assert (config.host, config.worker_id, config.registry) == (
        "10.1.2.3",
        POD_ENV["POD_NAME"],
        f"{NAME}-gateway:50051",
    )
    gateway = check_cli(r.container("gateway")["args"], r.of("ConfigMap")[f"{NAME}-gateway"]["data"])
    assert (gateway.max_inflight, gateway.worker_timeout_s, gateway.topology) == (64, 10.0, "colocated")
    pd = rendered("pd")
    decode = check_cli(
        [_expand(a) for a in pd.container("decode")["args"]], pd.of("ConfigMap")[f"{NAME}-decode"]["data"]
    )
    assert (decode.engine.page_size, decode.kv_checksum, decode.ucx_net_devices) == (32, True, "mlx5_0:1")


def _dockerfile_command(path: str) -> list[str]:
    """ENTRYPOINT + CMD of the final stage (exec form)."""
    text = (ROOT / path).read_text()
    final = text.split("\nFROM ")[-1]
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", final, re.M).group(1))
    return entrypoint + cmd


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_the_images_default_command_exists_in_the_cli(dockerfile):
    argv = _dockerfile_command(dockerfile)
    assert argv[0] == "moemesh"
    args = check_cli(argv[1:], {})
    assert (args.command, args.model, args.host) == ("up", "demo", "0.0.0.0")
    assert args.device == ("cuda" if dockerfile == "Dockerfile" else "cpu")


def test_a_flag_the_cli_lacks_fails_naming_it():
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag"):
        check_cli(["serve", "decode", "--no-such-flag", "1"], {})
    with pytest.raises(AssertionError, match="invalid choice: 'router'"):
        check_cli(["serve", "router"], {})


def _pairs(args: list[str]) -> set[tuple[str, str]]:
    return set(zip(args, args[1:], strict=False))
