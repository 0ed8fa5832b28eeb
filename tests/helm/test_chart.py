"""helm/moemesh rendered with real Helm for the default values and the value sets of chart.py: strict lint,
every object valid for a current Kubernetes, and what the objects say (workloads per topology, replicas, GPU
limits, probes on the gRPC health service, NetworkPolicy selectors, Secrets, config) and what the schema
refuses."""

from __future__ import annotations

import base64
import json

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest

from tests.helm.chart import (
    CHART,
    DEFAULT_COMMANDS,
    NAME,
    RELEASE,
    VALUE_SETS,
    chart,
    pod_commands,
    render,
    rendered,
    validate,
)

KUBERNETES = kubernetes_validate.latest_version()  # the newest Kubernetes the validator knows
TOP_LEVEL_KEYS = {
    "model",
    "topology",
    "gateway",
    "prefill",
    "decode",
    "expert",
    "networkPolicy",
    "tls",
    "auth",
    "telemetry",
    "ucx",
}
CRDS = {"ServiceMonitor"}  # the Prometheus Operator's, not Kubernetes': checked by content below


def test_the_validator_refuses_what_kubernetes_would():
    deployment = rendered("default").deployment("decode")
    bad = {**deployment, "spec": {**deployment["spec"], "replicas": "three"}}
    with pytest.raises(jsonschema.ValidationError, match="'three' is not of type 'integer'"):
        validate(bad, KUBERNETES)
    with pytest.raises(
        jsonschema.ValidationError, match="'gpus' was unexpected"
    ):  # strict: no unknown fields
        validate({**deployment, "spec": {**deployment["spec"], "gpus": 1}}, KUBERNETES)


def test_values_top_level_keys_and_role_keys():
    values = chart().values
    assert set(values) == TOP_LEVEL_KEYS
    for role in ("gateway", "prefill", "decode", "expert"):
        assert {"replicas", "resources", "nodeSelector", "tolerations"} <= set(values[role]), role


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_strict_lint_is_clean(value_set):
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2 = warning, 3 = error


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_object_is_valid_kubernetes(value_set):
    objects = rendered(value_set).objects
    assert len(objects) >= 8
    for obj in objects:
        if obj["kind"] in CRDS:
            continue
        validate(obj, KUBERNETES)  # raises ValidationError, naming the field


TOPOLOGY_ROLES = {
    "default": {"gateway", "prefill", "decode"},
    "cpu-demo": {"gateway", "prefill", "decode"},
    "gpu-colocated": {"gateway", "colocated"},
    "pd": {"gateway", "prefill", "decode"},
    "pd-experts": {"gateway", "prefill", "decode", "expert"},
    "tls-auth": {"gateway", "prefill", "decode"},
}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_each_topology_runs_its_roles_with_services_and_pdbs(value_set):
    r = rendered(value_set)
    roles = TOPOLOGY_ROLES[value_set]
    assert set(r.of("Deployment")) == {f"{NAME}-{role}" for role in roles}
    assert set(r.of("Service")) == {f"{NAME}-{role}" for role in roles}
    assert set(r.of("PodDisruptionBudget")) == {f"{NAME}-{role}" for role in roles}
    assert set(r.of("ConfigMap")) == {f"{NAME}-{role}" for role in roles}
    for role in roles - {"gateway"}:
        assert r.of("Service")[f"{NAME}-{role}"]["spec"]["clusterIP"] == "None"  # headless
        assert r.of("PodDisruptionBudget")[f"{NAME}-{role}"]["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": "moemesh",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": role,
        }


def test_replicas_are_independent_per_role():
    r = rendered("pd-experts")
    assert {
        role: r.deployment(role)["spec"].get("replicas")
        for role in ("gateway", "prefill", "decode", "expert")
    } == {"gateway": 1, "prefill": 1, "decode": 1, "expert": 4}
    r = rendered("pd")
    assert r.deployment("decode")["spec"]["replicas"] == 3
    assert "replicas" not in r.deployment("prefill")["spec"]  # the HPA owns it
    (hpa,) = r.of("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{NAME}-prefill"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "moemesh_queue_depth"


def test_gpu_limits_rdma_and_cpu_workers():
    r = rendered("pd")
    limits = r.container("prefill")["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2 and limits["rdma/rdma_shared_device_a"] == 1
    assert r.container("decode")["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert r.container("decode")["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert r.deployment("decode")["spec"]["template"]["spec"]["hostIPC"] is True
    assert "nvidia.com/gpu" not in str(r.container("gateway")["resources"])
    cpu = rendered("cpu-demo")
    for role in ("prefill", "decode"):
        assert "nvidia.com/gpu" not in str(cpu.container(role)["resources"])
        assert cpu.container(role)["image"] == "moemesh:0.1.0-cpu"
    assert rendered("default").container("decode")["image"] == "moemesh:0.1.0"
    assert rendered("default").container("gateway")["image"] == "moemesh:0.1.0-cpu"
    colocated = rendered("gpu-colocated").deployment("colocated")["spec"]["template"]["spec"]
    assert colocated["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert colocated["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_probes_drain_and_non_root(value_set):
    r = rendered(value_set)
    tls = value_set == "tls-auth"
    for name, deployment in r.of("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # the kubelet's gRPC probe asks grpc.health.v1.Health on the serving port; it speaks no TLS, so
            # with mTLS the port is checked instead
            expected = {"tcpSocket": {"port": "grpc"}} if tls else {"grpc": {"port": port}}
            assert {k: container[probe][k] for k in expected} == expected, (name, probe)
        assert (
            container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1200
        )
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
        assert pod["terminationGracePeriodSeconds"] >= 30
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_network_policy_admits_only_the_mesh_to_workers():
    r = rendered("pd")
    policies = r.of("NetworkPolicy")
    assert set(policies) == {f"{NAME}-gateway", f"{NAME}-prefill", f"{NAME}-decode"}
    mesh = {"app.kubernetes.io/name": "moemesh", "app.kubernetes.io/instance": RELEASE}
    for role in ("prefill", "decode"):
        spec = policies[f"{NAME}-{role}"]["spec"]
        assert spec["podSelector"]["matchLabels"] == {**mesh, "app.kubernetes.io/component": role}
        assert spec["policyTypes"] == ["Ingress"]
        mesh_rule, metrics_rule = spec["ingress"]
        assert mesh_rule == {"from": [{"podSelector": {"matchLabels": mesh}}]}  # every port, mesh pods only
        assert metrics_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
        assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    gateway = policies[f"{NAME}-gateway"]["spec"]
    assert gateway["ingress"][1] == {
        "ports": [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]
    }
    assert rendered("default").of("NetworkPolicy")  # on by default
    assert not rendered("cpu-demo").of("NetworkPolicy")


def test_model_sources_mount_the_checkpoint():
    pvc = rendered("gpu-colocated").deployment("colocated")["spec"]["template"]["spec"]
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "deepseek-v2-lite", "readOnly": True},
    } in pvc["volumes"]
    mount = next(m for m in pvc["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {
        "name": "model",
        "mountPath": "/models/model",
        "readOnly": True,
        "subPath": "DeepSeek-V2-Lite",
    }
    host = rendered("pd").deployment("decode")["spec"]["template"]["spec"]
    assert {"name": "model", "hostPath": {"path": "/data/models/deepseek-v3", "type": "Directory"}} in host[
        "volumes"
    ]
    init = rendered("pd-experts").deployment("expert")["spec"]["template"]["spec"]
    (fetch,) = init["initContainers"]
    assert fetch["image"] == "registry.example.com/fetch-model:1"
    assert {"name": "model", "mountPath": "/models/model"} in fetch["volumeMounts"]
    assert {"name": "model", "emptyDir": {}} in init["volumes"]
    demo = rendered("default").deployment("decode")["spec"]["template"]["spec"]
    assert not [v for v in demo["volumes"] if v["name"] == "model"]


def test_tls_auth_secrets_and_telemetry():
    r = rendered("tls-auth")
    secrets = r.of("Secret")
    tls = secrets[f"{NAME}-tls"]
    assert tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    assert base64.b64decode(secrets[f"{NAME}-auth"]["data"]["api-keys"]).decode() == "key-one\nkey-two\n"
    for role in ("gateway", "prefill", "decode"):
        mounts = {m["name"]: m["mountPath"] for m in r.container(role)["volumeMounts"]}
        assert mounts["tls"] == "/etc/moemesh/tls"
        assert ("auth" in mounts) == (role == "gateway")
    gateway_service = r.of("Service")[f"{NAME}-gateway"]["spec"]
    assert gateway_service["type"] == "LoadBalancer" and gateway_service["loadBalancerSourceRanges"] == [
        "10.0.0.0/8"
    ]
    (monitor,) = r.of("ServiceMonitor").values()
    assert (
        monitor["apiVersion"] == "monitoring.coreos.com/v1"
        and monitor["metadata"]["labels"]["release"] == "prom"
    )
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "moemesh",
        "app.kubernetes.io/instance": RELEASE,
    }
    for service in r.of("Service").values():  # what the ServiceMonitor scrapes: every role's http port
        assert "http" in [p["name"] for p in service["spec"]["ports"]]
    assert "exported to http://otel-collector.observability:4317" in r.notes
    assert not rendered("default").of("Secret")


def test_scrape_annotations_name_each_roles_metrics_port():
    r = rendered("default")
    for role, port in (("gateway", "8000"), ("prefill", "9400"), ("decode", "9400")):
        annotations = r.deployment(role)["spec"]["template"]["metadata"]["annotations"]
        assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", port)
        assert {"name": "http", "containerPort": int(port), "protocol": "TCP"} in r.container(role)["ports"]


def test_config_map_keys_mirror_the_config_fields():
    r = rendered("gpu-colocated")
    colocated = r.of("ConfigMap")[f"{NAME}-colocated"]["data"]
    assert colocated == {
        "MOEMESH_MAX_NUM_SEQS": "32",
        "MOEMESH_KV_CACHE_BYTES": "21474836480",
        "MOEMESH_LEASE_TTL_S": "20",
        "MOEMESH_UCX_TRANSPORTS": "",
        "MOEMESH_UCX_NET_DEVICES": "",
    }
    assert r.of("ConfigMap")[f"{NAME}-gateway"]["data"] == {
        "MOEMESH_MAX_INFLIGHT": "64",
        "MOEMESH_WORKER_TIMEOUT_S": "10",
    }
    assert rendered("pd").of("ConfigMap")[f"{NAME}-decode"]["data"] == {
        "MOEMESH_PAGE_SIZE": "32",
        "MOEMESH_KV_CHECKSUM": "true",
        "MOEMESH_UCX_TRANSPORTS": "rc,cuda_copy,tcp",
        "MOEMESH_UCX_NET_DEVICES": "mlx5_0:1",
        "UCX_IB_GID_INDEX": "3",
    }


def test_notes_tell_how_to_reach_the_gateway():
    notes = rendered("default").notes
    assert f"kubectl -n serving port-forward svc/{NAME}-gateway 50051:50051 8000:8000" in notes
    assert "moemesh generate --target $MOEMESH:50051" in notes
    assert "http://$MOEMESH:8000/v1/completions" in notes and "http://$MOEMESH:8000/metrics" in notes
    assert "http://$MOEMESH:8000/traces" in notes
    assert "jsonpath='{.status.loadBalancer.ingress[0].ip}'" in rendered("tls-auth").notes


BAD_VALUES = [
    ({"topology": "mesh"}, "at '/topology': value must be one of 'colocated', 'pd', 'pd-experts'"),
    ({"gateway": {"replicas": 2}}, "at '/gateway/replicas': value must be 1"),
    ({"decode": {"replicas": 0}}, "at '/decode/replicas': minimum: got 0, want 1"),
    ({"decode": {"gpus": -1}}, "at '/decode/gpus': minimum: got -1, want 0"),
    (
        {"decode": {"config": {"max_num_seq": 3}}},
        "at '/decode/config': additional properties 'max_num_seq' not allowed",
    ),
    (
        {"prefill": {"config": {"dtype": "fp16"}}},
        "at '/prefill/config/dtype': value must be one of 'auto', 'float32', 'bfloat16'",
    ),
    ({"model": {"source": "pvc"}}, "at '/model/pvc/claimName': minLength: got 0, want 1"),
    (
        {"model": {"source": "s3"}},
        "at '/model/source': value must be one of 'demo', 'pvc', 'hostPath', 'initContainer'",
    ),
    ({"tls": {"enabled": True}}, "at '/tls/cert': minLength: got 0, want 1"),
    ({"auth": {"enabled": True}}, "at '/auth/apiKeys': minItems: got 0, want 1"),
    ({"auth": {"enabled": True, "apiKeys": ["has space"]}}, "at '/auth/apiKeys/0'"),
    ({"telemetry": {"otlpEndpoint": "collector:4317"}}, "at '/telemetry/otlpEndpoint'"),
    (
        {"gateway": {"service": {"type": "NodePort"}}},
        "at '/gateway/service/type': value must be one of 'ClusterIP', 'LoadBalancer'",
    ),
    ({"ucx": {"env": {"PATH": "/x"}}}, "at '/ucx/env': additional properties 'PATH' not allowed"),
    ({"image": {"tag": "x"}}, "additional properties 'image' not allowed"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m.split("'")[1] for _, m in BAD_VALUES])
def test_the_schema_refuses_bad_values_naming_the_field(values, message):
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)


def test_default_commands_json_is_the_default_render():
    """The GPU test serves these commands (no Helm there); regenerate with `python -m tests.helm.chart`."""
    assert json.loads(DEFAULT_COMMANDS.read_text()) == pod_commands("default"), (
        "tests/helm/default_commands.json is stale: python -m tests.helm.chart"
    )
