"""The KubeRay `RayService` that runs a serving config on Kubernetes (`ifserve serve-config --kuberay`).

Its `serveConfigV2` is `ray_serve_config` (serve/app.py), the same file `serve deploy` takes, pointing at
the config inside the image. Its `rayClusterConfig` has a head for what no pool holds (the ingress, the
tenant limits, the batch runner, Serve's controller and proxy) and one worker group per pool:

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

METRICS_PORT = 8080
APP_LABEL = {"app.kubernetes.io/name": "ifserve"}  # every pod; deploy/kuberay/podmonitor.yaml selects it
GPU_TAINT = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


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


def _volumes(config: ServeConfig) -> tuple[list[dict], list[dict]]:
    """The checkpoints' and the store's claims, and where every container mounts them."""
    kube = config.kuberay
    mounts = {}
    for graph in config.graphs:
        checkpoints = PurePosixPath(graph.model.checkpoints)
        if checkpoints.is_absolute():
            mounts[str(checkpoints.parent)] = kube.models_claim
    if "://" not in config.storage.url:
        mounts[config.storage.url] = kube.store_claim
    claims = sorted(set(mounts.values()))
    volumes = [{"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in claims]
    volume_mounts = [{"name": claim, "mountPath": path} for path, claim in sorted(mounts.items())]
    return volumes, volume_mounts


def _container(config: ServeConfig, name: str, cpus: float, gpus: int, memory: str, ports: dict[str, int]) -> dict:
    kube = config.kuberay
    limits: dict[str, Any] = {"cpu": _quantity(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    _, mounts = _volumes(config)
    return {
        "name": name,
        "image": kube.image,
        "workingDir": kube.app_dir,
        "envFrom": [{"secretRef": {"name": kube.secret, "optional": True}}],
        "ports": [{"name": port, "containerPort": number} for port, number in ports.items()],
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": mounts,
    }


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


def _pod(config: ServeConfig, container: dict, pool: KubePool | None = None, gpus: int = 0) -> dict:
    volumes, _ = _volumes(config)
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
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
    return {"metadata": {"labels": dict(APP_LABEL)}, "spec": spec}


def head_group(config: ServeConfig) -> dict:
    """The head: Serve's controller and proxy, the ingress replicas, tenant limits and the batch runner,
    and any deployment without a pool."""
    unpooled = sum(r.num_cpus for r in pool_deployments(config).get(None, []))
    cpus = math.ceil(config.ingress.num_replicas * config.ingress.num_cpus + config.batch.num_cpus + unpooled) + 1
    ports = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": config.http.port, "metrics": METRICS_PORT}
    container = _container(config, "ray-head", cpus, 0, config.kuberay.head_memory, ports)
    return {
        "rayStartParams": {
            "dashboard-host": "0.0.0.0",
            "num-cpus": str(cpus),
            "num-gpus": "0",
            "metrics-export-port": str(METRICS_PORT),
        },
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
    container = _container(config, "ray-worker", cpus, gpus, pool.memory, {"metrics": METRICS_PORT})
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
            "rayClusterConfig": {
                "rayVersion": kube.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": kube.idle_timeout_s},
                "headGroupSpec": head_group(config),
                "workerGroupSpecs": [worker_group(config, pool, groups[pool]) for pool in sorted(groups)],
            },
        },
    }


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML as Kubernetes manifests are written: no anchors, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ManifestDumper.add_representer(str, _string)


def manifest_yaml(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_ManifestDumper, sort_keys=False, width=120)
