"""Renders helm/moemesh with real Helm (helm-python-sdk embeds Helm 4: offline, no binary) for the value sets
the tests share, and parses what comes out."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "moemesh"
RELEASE = "mm"
NAME = "mm-moemesh"  # the chart's fullname for RELEASE

CPU = {"gpus": 0, "tolerations": [], "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

VALUE_SETS: dict[str, dict] = {
    "default": {},
    "cpu-demo": {"topology": "pd", "prefill": CPU, "decode": CPU, "networkPolicy": {"enabled": False}},
    "gpu-colocated": {
        "topology": "colocated",
        "model": {"source": "pvc", "pvc": {"claimName": "deepseek-v2-lite", "subPath": "DeepSeek-V2-Lite"}},
        "decode": {
            "gpus": 1,
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
            "config": {"max_num_seqs": 32, "kv_cache_bytes": 21474836480, "lease_ttl_s": 20.0},
        },
        "gateway": {"config": {"max_inflight": 64, "worker_timeout_s": 10.0}},
    },
    "pd": {
        "topology": "pd",
        "model": {"source": "hostPath", "hostPath": {"path": "/data/models/deepseek-v3"}},
        "prefill": {"replicas": 2, "gpus": 2, "autoscaling": {"enabled": True, "maxReplicas": 6}},
        "decode": {"replicas": 3, "gpus": 1, "config": {"page_size": 32, "kv_checksum": True}},
        "ucx": {
            "transports": "rc,cuda_copy,tcp",
            "netDevices": "mlx5_0:1",
            "env": {"UCX_IB_GID_INDEX": 3},
            "rdma": {"resourceName": "rdma/rdma_shared_device_a"},
            "hostIPC": True,
        },
        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
    },
    "pd-experts": {
        "topology": "pd-experts",
        "model": {
            "source": "initContainer",
            "initContainer": {
                "image": "registry.example.com/fetch-model:1",
                "command": ["sh", "-c", 'cp -r /weights/. "$MODEL_DIR"'],
            },
        },
        "expert": {"replicas": 4, "gpus": 1},
    },
    "tls-auth": {
        "topology": "pd",
        "tls": {"enabled": True, "ca": PEM, "cert": PEM, "key": "-----BEGIN PRIVATE KEY-----\nAA\n"},
        "auth": {"enabled": True, "apiKeys": ["key-one", "key-two"]},
        "telemetry": {
            "otlpEndpoint": "http://otel-collector.observability:4317",
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        },
        "gateway": {"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]}},
    },
}


@dataclass(frozen=True)
class Rendered:
    objects: list[dict]  # every Kubernetes object, in template order
    notes: str

    def of(self, kind: str) -> dict[str, dict]:
        """name -> object of one kind."""
        return {o["metadata"]["name"]: o for o in self.objects if o["kind"] == kind}

    def deployment(self, role: str) -> dict:
        return self.of("Deployment")[f"{NAME}-{role}"]

    def container(self, role: str) -> dict:
        (container,) = self.deployment(role)["spec"]["template"]["spec"]["containers"]
        return container


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict) -> Rendered:
    manifests = chart().render(values=values, name=RELEASE, namespace="serving", is_install=True)
    objects, notes = [], ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(objects, notes)


@functools.cache
def rendered(value_set: str) -> Rendered:
    return render(VALUE_SETS[value_set])


@functools.cache
def _validator(kind: str, api_version: str, kubernetes: str):
    """kubernetes-validate's strict schema for one kind, its definitions resolved once (its own validate() reads
    and resolves the 5 MB definitions file again for every object: seconds per value set)."""
    import re

    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{kubernetes}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
    schema = schema_contents(f"{folder}/{kind.lower()}-{group}.json", kubernetes)
    definitions = schema_contents(f"{folder}/_definitions.json", kubernetes)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate(obj: dict, kubernetes: str) -> None:
    """Raises jsonschema.ValidationError (naming the field) when `obj` is not a valid object of its kind."""
    _validator(obj["kind"], obj["apiVersion"], kubernetes).validate(obj)


DEFAULT_COMMANDS = Path(__file__).with_name("default_commands.json")


def pod_commands(value_set: str) -> dict[str, dict]:
    """role -> {"args": the container's args, "env": its ConfigMap}: what each pod of a value set runs."""
    r = rendered(value_set)
    config_maps = {name: obj.get("data") or {} for name, obj in r.of("ConfigMap").items()}
    out = {}
    for name, deployment in r.of("Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (source,) = container["envFrom"]
        role = name.removeprefix(f"{NAME}-")
        out[role] = {"args": container["args"], "env": config_maps[source["configMapRef"]["name"]]}
    return out


if __name__ == "__main__":  # python -m tests.helm.chart: rewrite default_commands.json (the GPU test's input)
    import json

    DEFAULT_COMMANDS.write_text(json.dumps(pod_commands("default"), indent=2, sort_keys=True) + "\n")
    print(f"wrote {DEFAULT_COMMANDS}")
