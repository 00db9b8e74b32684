"""deploy/kuberay/: the RayService is what `ifserve serve-config --kuberay` prints for deploy/cluster.yaml,
the KubeRay operator's own CRD schema accepts it (no unknown field either, as `kubectl apply
--validate=strict` would check), Ray accepts its serveConfigV2, and every pool a deployment asks for is
offered by a worker group that can scale from zero. No Kubernetes needed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.config import hash_key, load_config
from serve.kuberay import (
    APP_LABEL,
    DASHBOARD_PORT,
    METRICS_PORT,
    ROLE,
    manifests,
    network_policies,
    parse_resources_param,
    pool_deployments,
    rayservice,
    secret_variables,
)
from tests.serving import ROOT

KUBERAY = ROOT / "deploy" / "kuberay"
# The operator's CRDs (see their SOURCE.md); another copy can be named by IFSERVE_KUBERAY_SCHEMAS.
SCHEMAS = Path(os.environ.get("IFSERVE_KUBERAY_SCHEMAS", ROOT.parent / "shared" / "schemas" / "kuberay"))


@pytest.fixture
def cluster_config(monkeypatch):
    monkeypatch.setenv("IFSERVE_API_KEYS_SHA256", hash_key("test-key"))
    return load_config(ROOT / "deploy" / "cluster.yaml")


# Ray's own ports: GCS, dashboard, Ray Client, dashboard agent (HTTP and gRPC), runtime-env agent.
RAY_PORTS = {6379, 8265, 10001, 52365, 8076, 8077}


@pytest.fixture
def documents() -> list[dict]:
    return list(yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()))


@pytest.fixture
def manifest(documents) -> dict:
    return documents[0]


def containers(manifest: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, container) of every container the RayService runs."""
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"], container) for name, group in groups
            for container in group["template"]["spec"]["containers"]]  # fmt: skip


def crd_schema(kind: str) -> dict:
    path = SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay's CRD schema is not here ({path}); set IFSERVE_KUBERAY_SCHEMAS to a copy")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, at: str = "") -> list[str]:
    """Fields the schema does not declare: Kubernetes would prune them silently (so a typo is lost)."""
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        known = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if known is not None and key in known:
                found += unknown_fields(item, known[key], f"{at}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{at}.{key}")
            elif known is not None and not schema.get("x-kubernetes-preserve-unknown-fields") and extra is not True:
                found.append(f"{at}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{at}[{index}]")
    return found


def test_the_rayservice_is_generated_from_the_cluster_config(cluster_config, documents):
    assert documents == manifests("deploy/cluster.yaml", cluster_config)
    assert documents[0] == rayservice("deploy/cluster.yaml", cluster_config)
    # Written where the service's secrets are not (issue 25, finding 13): no key digest in the environment.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IFSERVE_")}
    printed = subprocess.run(
        [sys.executable, "-m", "serve.cli", "serve-config", "--config", "deploy/cluster.yaml", "--kuberay"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == (KUBERAY / "rayservice.yaml").read_text()  # regenerate it with that command


def test_the_rayservice_validates_against_the_operators_crd(manifest):
    schema = crd_schema("RayService")
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []
    # ... and the check can fail: a misspelt field is caught.
    broken = yaml.safe_load(yaml.safe_dump(manifest))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert unknown_fields(broken, schema) == [".spec.rayClusterConfig.workerGroupSpecs[0].minReplica"]
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_its_serve_config_is_one_ray_accepts(manifest):
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray raises if its own schema rejects it
    (application,) = serve_config["applications"]
    assert application["import_path"] == "serve.app:app_builder"
    assert application["args"]["config"] == "/app/deploy/cluster.yaml"  # the image's copy of the same file


def test_every_pool_is_offered_by_a_worker_group_that_scales_from_zero(cluster_config, manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {}
    for group in cluster["workerGroupSpecs"]:
        offered = parse_resources_param(group["rayStartParams"]["resources"])
        for pool in offered:
            assert pool not in groups, f"{pool} is offered by two worker groups"  # one group, one pool
            groups[pool] = group
        assert group["minReplicas"] == 0
    deployments = pool_deployments(cluster_config)
    for pool, replicas in deployments.items():
        if pool is None:
            continue
        group = groups[pool]  # a replica asking for this pool fits a pod of this group and of no other
        params = group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        for replica in replicas:
            asked = replica.ray_actor_options()
            assert asked["resources"] == {pool: 1}
            assert float(params["num-cpus"]) >= asked["num_cpus"]
            assert float(params["num-gpus"]) >= asked["num_gpus"] == limits.get("nvidia.com/gpu", 0)
        # Enough pods for every deployment on the pool at its max_replicas.
        units = parse_resources_param(params["resources"])[pool]
        assert group["maxReplicas"] * units >= sum(r.autoscaling.max_replicas for r in replicas)
        assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"][
            "tolerations"
        ]
    assert set(groups) == {pool for pool in deployments if pool is not None}  # no group without a deployment
    # The head hosts what has no pool: the ingress replicas and the batch runner.
    head_cpus = float(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"])
    ingress = cluster_config.ingress
    assert head_cpus >= math.ceil(ingress.num_replicas * ingress.num_cpus + cluster_config.batch.num_cpus)


def published_ray_ports(manifest: dict) -> set[int]:
    """Ray's ports on a Service KubeRay makes for the RayService: the head Service lists the head
    container's ports (all of Ray's defaults when it lists none), the serve Service its own."""
    cluster = manifest["spec"]["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    head_ports = {port["containerPort"] for port in head.get("ports", [])} or {6379, 8265, 10001, 8000, 8080}
    serve_ports = {port["port"] for port in manifest["spec"].get("serveService", {}).get("spec", {}).get("ports", [])}
    return (head_ports | serve_ports) & RAY_PORTS


def test_token_auth_is_on_and_no_ray_port_is_on_a_service(manifest):
    """Issue 25, finding 12. KubeRay makes each Service from the head container's ports (all of them when
    none is listed), and the serve Service from those named serve; the head Service is headless, so it
    routes nothing. The dashboard's port must be on it (the operator finds the dashboard there), which
    token auth and the NetworkPolicy guard; no other Ray port is on any Service."""
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(n) for n in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # KubeRay's floor for tokens
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["headService"]["spec"]["clusterIP"] == "None"
    assert published_ray_ports(manifest) == {DASHBOARD_PORT}
    for _, _, one in containers(manifest):
        assert not {port["containerPort"] for port in one.get("ports", [])} & (RAY_PORTS - {DASHBOARD_PORT})
    # ... and the check can fail: a head publishing the GCS, or listing no port at all, is caught.
    publishing = yaml.safe_load(yaml.safe_dump(manifest))
    (container,) = publishing["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    container["ports"].append({"name": "gcs-server", "containerPort": 6379})
    assert published_ray_ports(publishing) == {DASHBOARD_PORT, 6379}
    container["ports"] = []
    assert published_ray_ports(publishing) == {DASHBOARD_PORT, 6379, 10001}


def test_no_container_runs_as_root_or_may_become_root(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    checked = [(name, pod.get("securityContext", {}), one.get("securityContext", {}))
               for name, pod, one in containers(manifest)]  # fmt: skip
    checked.append(("autoscaler", {}, cluster["autoscalerOptions"].get("securityContext", {})))
    for name, pod, container in checked:
        merged = {**pod, **container}  # a container's own settings win over its pod's
        assert merged.get("runAsNonRoot") is True and merged.get("runAsUser", 0) != 0, name
        assert container.get("allowPrivilegeEscalation") is False and container["capabilities"]["drop"] == ["ALL"]
        assert not container.get("privileged", False), name
    for _, pod, _ in containers(manifest):
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert [line for line in dockerfile.splitlines() if line.startswith("USER ")][-1] != "USER root"


def test_only_the_head_gets_the_secrets_each_one_required_and_workers_no_store(cluster_config, manifest):
    needed = secret_variables(cluster_config)
    assert set(needed) == {"IFSERVE_API_KEYS_SHA256", "IFSERVE_TENANCY_DATABASE", "IFSERVE_URL_SECRET"}
    for name, _, container in containers(manifest):
        assert "envFrom" not in container, name  # never a whole secret
        from_secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        if name == "head":
            assert set(from_secrets) == set(needed)
            assert all(ref["name"] == cluster_config.kuberay.secret and not ref.get("optional") for ref in
                       from_secrets.values())  # fmt: skip
            assert cluster_config.storage.url in mounts and not mounts[cluster_config.storage.url].get("readOnly")
        else:
            assert from_secrets == {}, name
            assert cluster_config.storage.url not in mounts, name
        assert mounts["/models"]["readOnly"] is True


def test_the_network_policies_let_only_the_operator_reach_the_dashboard(cluster_config, documents):
    policies = [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    assert policies == network_policies(cluster_config) and len(policies) == 4
    ingress_rules = []  # (pods selected, sources, ports)
    for policy in policies:
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert APP_LABEL.items() <= spec["podSelector"]["matchLabels"].items()
        for rule in spec["ingress"]:
            ports = {p["port"] for p in rule.get("ports", [])} or None  # None: every port
            ingress_rules.append((spec["podSelector"]["matchLabels"], rule.get("from"), ports))
    for selected, sources, ports in ingress_rules:
        reaches_ray = ports is None or ports & RAY_PORTS
        if not reaches_ray:
            continue
        if ports is None:  # every port: only the cluster's own pods
            assert sources == [{"podSelector": {"matchLabels": APP_LABEL}}]
        else:  # the dashboard: only the operator's pods, on the head
            assert ports & RAY_PORTS == {DASHBOARD_PORT} and selected.get(ROLE) == "head"
            assert sources == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
                "app.kubernetes.io/name": "kuberay-operator"}}}]  # fmt: skip
    anyone = [ports for _, sources, ports in ingress_rules if not sources]
    assert anyone == [{8000}]  # the API, and nothing else, is open to all
    metrics = [sources for _, sources, ports in ingress_rules if ports == {METRICS_PORT}]
    assert metrics == [[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]]


def test_the_head_mounts_the_store_and_every_pod_exposes_metrics_to_the_pod_monitor(cluster_config, manifest):
    monitor = yaml.safe_load((KUBERAY / "podmonitor.yaml").read_text())
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    cluster = manifest["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]
        assert selector.items() <= APP_LABEL.items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"])
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert ({cluster_config.storage.url} if group is cluster["headGroupSpec"] else set()) | {"/models"} <= mounts
    claims = [doc["metadata"]["name"] for doc in yaml.safe_load_all((KUBERAY / "storage.yaml").read_text())]
    assert sorted(claims) == sorted({cluster_config.kuberay.models_claim, cluster_config.kuberay.store_claim})
