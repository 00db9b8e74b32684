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
from serve.kuberay import APP_LABEL, parse_resources_param, pool_deployments, rayservice
from tests.serving import ROOT

KUBERAY = ROOT / "deploy" / "kuberay"
# The operator's CRDs (see their SOURCE.md); another copy can be named by IFSERVE_KUBERAY_SCHEMAS.
SCHEMAS = Path(os.environ.get("IFSERVE_KUBERAY_SCHEMAS", ROOT.parent / "shared" / "schemas" / "kuberay"))


@pytest.fixture
def cluster_config(monkeypatch):
    monkeypatch.setenv("IFSERVE_API_KEYS_SHA256", hash_key("test-key"))
    return load_config(ROOT / "deploy" / "cluster.yaml")


@pytest.fixture
def manifest() -> dict:
    return yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())


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


def test_the_rayservice_is_generated_from_the_cluster_config(cluster_config, manifest):
    assert manifest == rayservice("deploy/cluster.yaml", cluster_config)
    printed = subprocess.run(
        [sys.executable, "-m", "serve.cli", "serve-config", "--config", "deploy/cluster.yaml", "--kuberay"],
        cwd=ROOT,
        env={**os.environ, "IFSERVE_API_KEYS_SHA256": hash_key("test-key")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed == (KUBERAY / "rayservice.yaml").read_text()  # regenerate it with that command


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


def test_every_pod_mounts_the_store_and_exposes_metrics_to_the_pod_monitor(cluster_config, manifest):
    monitor = yaml.safe_load((KUBERAY / "podmonitor.yaml").read_text())
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    cluster = manifest["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]
        assert selector.items() <= pod["metadata"]["labels"].items() == APP_LABEL.items()
        (container,) = pod["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"])
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert {cluster_config.storage.url, "/models"} <= mounts
    claims = [doc["metadata"]["name"] for doc in yaml.safe_load_all((KUBERAY / "storage.yaml").read_text())]
    assert sorted(claims) == sorted({cluster_config.kuberay.models_claim, cluster_config.kuberay.store_claim})
