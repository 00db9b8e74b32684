"""The KubeRay `RayService` that runs a serving config on Kubernetes (`ifserve serve-config --kuberay`).

Its `serveConfigV2` is `ray_serve_config` (serve/app.py), the same file `serve deploy` takes, pointing at
the config inside the image. Its `rayClusterConfig` has a head for what no pool holds (the ingress, the
tenant limits, the batch runner, Serve's controller and proxy) and one worker group per pool. Nobody
reaches the Ray cluster without its token:

- Ray's token authentication is on (`authOptions: {mode: token}`: KubeRay makes the token, a secret of
  the cluster's, gives it to every Ray container and sends it with its own dashboard calls);
- the NetworkPolicies (`network_policies`) let only the cluster's own pods reach any Ray port, only the
  KubeRay operator reach the dashboard (it submits the Serve config there), only Prometheus the metrics
  port, and anyone the serve port (the API, which asks for API keys beyond loopback);
- no Ray port is published: the Ray Client's port is not a container port, the head's Service is
  headless (DNS for the operator and the workers, no virtual IP; KubeRay puts the dashboard port there,
  which the operator needs) and the serve Service carries the serve port alone;
- every container runs as Ray's image user (uid 1000), never root, without privilege escalation or
  capabilities; the head alone gets the secrets (each one the config names, required, so a missing one
  stops the pod instead of falling back to a local SQLite file) and the read-write store; workers get
  neither, and the checkpoints read-only.

Each worker group:

- each pod offers its pool as a custom resource in `rayStartParams` (`replicas_per_node` units), which is
  what lets the in-tree autoscaler scale a group up from zero: KubeRay tells it what a group's pod would
  offer before any exists, and a pending replica asking for `pool_stage3` can only fit that group;
- `minReplicas: 0` and `maxReplicas` enough for the pool's deployments at their `max_replicas`, so Serve's
  autoscaling (per deployment) drives the pods, and an idle group scales away after `idle_timeout_s`;
- the GPU product as a node selector, the `nvidia.com/gpu` taint tolerated, CPUs, GPUs and memory per pod;
- the metrics port (8080) named `metrics` on every pod, for deploy/kuberay/podmonitor.yaml;
- the checkpoints' and the image store's volumes, shared by every pod.
"""

from __future__ import annotations

import json
import math
from pathlib import PurePosixPath
from typing import Any

import yaml

from serve.app import ray_serve_config
from serve.config import KubePool, KubeRayConfig, Replica, ServeConfig
from serve.proxy_files import CALLBACK, ENV

METRICS_PORT = 8080
DASHBOARD_PORT = 8265
APP_LABEL = {"app.kubernetes.io/name": "ifserve"}  # every pod; deploy/kuberay/podmonitor.yaml selects it
ROLE = "ifserve.io/role"  # "head" or "worker": what the NetworkPolicies tell apart
GPU_TAINT = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
RAY_UID, RAY_GID = 1000, 100  # the `ray` user and `users` group of Ray's images (deploy/kuberay/Dockerfile)
# Every container: not root, no privilege escalation (the image's user may sudo), no capabilities.
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
                      "runAsUser": RAY_UID, "runAsGroup": RAY_GID}  # fmt: skip
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
                "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def pool_deployments(config: ServeConfig) -> dict[str | None, list[Replica]]:
    """Every deployment's replica config by pool (None: no pool, so the head)."""
    found: dict[str | None, list[Replica]] = {}
    for graph in config.graphs:
        for _, replica in graph.replicas():
            found.setdefault(replica.pool, []).append(replica)
    return found


def ray_resources_param(resources: dict[str, float]) -> str:
    """`rayStartParams.resources` as KubeRay passes it to `ray start --resources=...` through a shell."""
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def parse_resources_param(value: str) -> dict[str, float]:
    """The inverse of `ray_resources_param`."""
    return json.loads(value.strip().strip('"').replace('\\"', '"'))


def _volumes(config: ServeConfig, head: bool) -> tuple[list[dict], list[dict]]:
    """The checkpoints' claim (read-only) and, on the head, the store's, and where they are mounted."""
    kube = config.kuberay
    mounts: dict[str, tuple[str, bool]] = {}  # path -> (claim, read-only)
    for graph in config.graphs:
        checkpoints = PurePosixPath(graph.model.checkpoints)
        if checkpoints.is_absolute():
            mounts[str(checkpoints.parent)] = (kube.models_claim, True)
    if head and "://" not in config.storage.url:
        mounts[config.storage.url] = (kube.store_claim, False)
    claims = sorted({claim for claim, _ in mounts.values()})
    volumes = [{"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in claims]
    volume_mounts = [{"name": claim, "mountPath": path, **({"readOnly": True} if read_only else {})}
                     for path, (claim, read_only) in sorted(mounts.items())]  # fmt: skip
    return volumes, volume_mounts


def secret_variables(config: ServeConfig) -> list[str]:
    """The environment variables the config reads its secrets from: what the head needs, and nothing else."""
    named = (config.auth.api_key_sha256_env, config.tenancy.database_env, config.storage.url_secret_env)
    return [name for name in named if name]


def _container(config: ServeConfig, name: str, cpus: float, gpus: int, memory: str, ports: dict[str, int],
               head: bool) -> dict:  # fmt: skip
    kube = config.kuberay
    limits: dict[str, Any] = {"cpu": _quantity(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    _, mounts = _volumes(config, head)
    container: dict[str, Any] = {"name": name, "image": kube.image, "workingDir": kube.app_dir}
    if head:  # each secret required: a missing one keeps the pod from starting rather than changing its meaning
        container["env"] = [{"name": variable, "valueFrom": {"secretKeyRef": {"name": kube.secret, "key": variable}}}
                            for variable in secret_variables(config)]  # fmt: skip
        container["env"].append({"name": ENV, "value": CALLBACK})  # Serve's proxy: uploads and downloads on disk
    return {
        **container,
        "ports": [{"name": port, "containerPort": number} for port, number in ports.items()],
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": mounts,
        "securityContext": dict(CONTAINER_SECURITY),
    }


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


def _pod(config: ServeConfig, container: dict, pool: KubePool | None = None, gpus: int = 0) -> dict:
    volumes, _ = _volumes(config, head=pool is None)
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes, "securityContext": dict(POD_SECURITY)}
    if pool is not None:
        selector = {**({"nvidia.com/gpu.product": pool.accelerator} if pool.accelerator else {}), **pool.node_selector}
        if selector:
            spec["nodeSelector"] = selector
        tolerations = pool.tolerations if pool.tolerations is not None else (GPU_TAINT if gpus else [])
        if tolerations:
            spec["tolerations"] = [dict(toleration) for toleration in tolerations]
        # The autoscaler (v1 and v2) reclaims idle workers only if Kubernetes never restarts them.
        spec["restartPolicy"] = "Never"
    # Longer than the ingress's drain (which outlasts every stage's), so Kubernetes does not cut it short.
    spec["terminationGracePeriodSeconds"] = math.ceil(config.ingress_drain_s()) + 30
    role = "head" if pool is None else "worker"
    return {"metadata": {"labels": {**APP_LABEL, ROLE: role}}, "spec": spec}


def head_group(config: ServeConfig) -> dict:
    """The head: Serve's controller and proxy, the ingress replicas, tenant limits and the batch runner,
    and any deployment without a pool."""
    unpooled = sum(r.num_cpus for r in pool_deployments(config).get(None, []))
    cpus = math.ceil(config.ingress.num_replicas * config.ingress.num_cpus + config.batch.num_cpus + unpooled) + 1
    # What the head's Service lists (KubeRay takes these ports): the dashboard, which the operator calls,
    # the API and the metrics. Workers reach the GCS at the head pod's address, which the headless Service
    # resolves to; the Ray Client's port is published nowhere.
    ports = {"dashboard": DASHBOARD_PORT, "serve": config.http.port, "metrics": METRICS_PORT}
    container = _container(config, "ray-head", cpus, 0, config.kuberay.head_memory, ports, head=True)
    return {
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",  # the operator calls it from its own pod; token and NetworkPolicy guard it
            "num-cpus": str(cpus),
            "num-gpus": "0",
            "metrics-export-port": str(METRICS_PORT),
        },
        "serviceType": "ClusterIP",
        "headService": {"spec": {"clusterIP": "None"}},  # headless: a name for the head pod, no virtual IP
        "template": _pod(config, container),
    }


def worker_group(config: ServeConfig, pool_name: str, replicas: list[Replica]) -> dict:
    """One pool's worker group: pods that each host `replicas_per_node` replicas of the pool's deployments."""
    pool = config.kuberay.pools.get(pool_name, KubePool())
    per_node = pool.replicas_per_node
    cpus = per_node * max(r.num_cpus for r in replicas)
    gpus = math.ceil(per_node * max(r.num_gpus for r in replicas))
    most = sum(r.autoscaling.max_replicas for r in replicas)
    max_nodes = pool.max_nodes or math.ceil(most / per_node)
    container = _container(config, "ray-worker", cpus, gpus, pool.memory, {"metrics": METRICS_PORT}, head=False)
    return {
        "groupName": pool_name.replace("_", "-"),
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": max_nodes,
        "rayStartParams": {
            "resources": ray_resources_param({pool_name: per_node}),
            "num-cpus": _quantity(math.ceil(cpus)),
            "num-gpus": str(gpus),
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": _pod(config, container, pool, gpus),
    }


def rayservice(config_path: str, config: ServeConfig) -> dict[str, Any]:
    """The RayService manifest: `config_path` is the config file relative to the repository root, as
    the image holds it under `kuberay.app_dir`."""
    kube: KubeRayConfig = config.kuberay
    serve_config = ray_serve_config(str(PurePosixPath(kube.app_dir) / config_path), config)
    groups = {pool: replicas for pool, replicas in pool_deployments(config).items() if pool is not None}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": kube.name, "labels": dict(APP_LABEL)},
        "spec": {
            # A change to rayClusterConfig brings up a new cluster and moves traffic once it serves; a
            # change to serveConfigV2 alone updates the running application in place.
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            # The serve Service carries the API alone.
            "serveService": {"spec": {"type": "ClusterIP", "ports": [{"name": "serve", "port": config.http.port}]}},
            "rayClusterConfig": {
                "rayVersion": kube.ray_version,
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": kube.idle_timeout_s,
                    "securityContext": dict(CONTAINER_SECURITY),
                },
                "headGroupSpec": head_group(config),
                "workerGroupSpecs": [worker_group(config, pool, groups[pool]) for pool in sorted(groups)],
            },
        },
    }


def network_policies(config: ServeConfig) -> list[dict[str, Any]]:
    """Who may reach the RayService's pods (an allow-list: a pod any policy selects takes nothing else):
    the cluster's own pods reach every port of each other (Ray talks between pods on many ports); the
    KubeRay operator reaches the head's dashboard and serve port (it submits the Serve config and checks
    the proxy's health); anyone reaches the serve port (the API, behind API keys); Prometheus reaches the
    metrics port."""
    kube = config.kuberay

    def policy(name: str, role: str | None, sources: list[dict], ports: list[int] | None = None) -> dict:
        selector = {**APP_LABEL, **({ROLE: role} if role else {})}
        rule: dict[str, Any] = {"from": sources} if sources else {}
        if ports:
            rule["ports"] = [{"protocol": "TCP", "port": port} for port in ports]
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": f"{kube.name}-{name}", "labels": dict(APP_LABEL)},
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"], "ingress": [rule]},
        }

    def namespace(name: str | None) -> dict:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}} if name else {}}

    operator = {**namespace(kube.operator_namespace), "podSelector": {"matchLabels": dict(kube.operator_labels)}}
    monitoring = namespace(kube.monitoring_namespace) if kube.monitoring_namespace else {"namespaceSelector": {}}
    return [
        policy("ray-internal", None, [{"podSelector": {"matchLabels": dict(APP_LABEL)}}]),
        policy("operator", "head", [operator], [DASHBOARD_PORT, config.http.port]),
        policy("api", "head", [], [config.http.port]),
        policy("metrics", None, [monitoring], [METRICS_PORT]),
    ]


def manifests(config_path: str, config: ServeConfig) -> list[dict[str, Any]]:
    """Everything `kubectl apply` needs for the service: the RayService, then its NetworkPolicies."""
    return [rayservice(config_path, config), *network_policies(config)]


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML as Kubernetes manifests are written: no anchors, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ManifestDumper.add_representer(str, _string)


def manifest_yaml(documents: dict[str, Any] | list[dict[str, Any]]) -> str:
    """One document, or several separated by `---`."""
    if isinstance(documents, dict):
        documents = [documents]
    several = len(documents) > 1
    return yaml.dump_all(documents, Dumper=_ManifestDumper, sort_keys=False, width=120, explicit_start=several)
