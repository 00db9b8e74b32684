"""Builds the Ray Serve application from a `ServeConfig`: for each served model, one deployment per
node of its family's graph (the text encoder, then its stages), each with its own pool, batching, queue
and autoscaling options, all composed under one HTTP ingress.

    serve run --name ifserve serve.app:app_builder config=deploy/local.yaml   # Ray's own CLI
    ifserve up --config deploy/local.yaml                          # ours: also starts a local Ray
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from serve.batch.runner import BatchRunner
from serve.config import FaultsConfig, ModelGraph, ServeConfig, load_config, where
from serve.deployments import Stage, TextEncoder
from serve.ingress import Ingress
from serve.tenancy.limits import TenantLimits
from stages.checkpoints import write_checkpoints
from stages.errors import CheckpointError

APP_NAME = "ifserve"

# Ray's own resource on the head node (Serve pins its controller with it). The front of the service
# (ingress, tenant limits, batch runner) asks for a sliver of it, so it runs on the head beside Serve's
# controller and proxy, where `serve/kuberay.py` sizes the head for it, and never on a pool's node: a
# pool's node going away then takes no HTTP request with it, only stage calls, which are retried.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# Serve's HTTP proxies run on the head only, for the same reason: every request goes to the ingress on
# the head anyway, and a proxy on a pool's node would drop the connections it holds when that node goes.
# (On KubeRay the worker pods then never pass its Serve readiness check; deploy/README.md.)
PROXY_LOCATION = "HeadOnly"


def on_the_head(num_cpus: float) -> dict[str, Any]:
    return {"num_cpus": num_cpus, "resources": {HEAD_NODE_RESOURCE: 0.001}}


def _model_options(graph: ModelGraph, node: str) -> dict[str, Any]:
    """What the replica of one node ("text_encoder", or a stage) needs to load its part of the model."""
    model = graph.model
    return dict(
        id=model.id,
        family=model.family,  # the name replicas resolve (registered, or an import path)
        checkpoints=str(graph.checkpoint_root()),  # absolute: replicas need not share our working directory
        device=model.device,
        dtype=model.dtype,
        text_encoder_dtype=model.encoder_dtype,
        variant=model.variant,
        batch_invariant=model.invariance(node),  # this node's mode: "split", "per_task" or "off"
        safety_checker=model.safety_checker,
    )


def build_graph(graph: ModelGraph, names: dict[str, str], faults: FaultsConfig) -> dict[str, Application]:
    """One model's deployments by node ("text_encoder", then each stage), each on its own pool."""
    enc = graph.encoder
    health = dict(
        health_check_period_s=faults.health_check_period_s, health_check_timeout_s=faults.health_check_timeout_s
    )
    faults_options = faults.model_dump()
    nodes = {
        "text_encoder": TextEncoder.options(name=names["text_encoder"], **enc.deployment_options(), **health).bind(
            model=_model_options(graph, "text_encoder"),
            max_batch_size=enc.max_batch_size,
            batch_wait_timeout_s=enc.batch_wait_timeout_s,
            cache_size=enc.cache_size,
            max_replicas=enc.autoscaling.max_replicas,
            faults=faults_options,
        )
    }
    for spec in graph.family.stages:
        stage = graph.stages[spec.name]
        nodes[spec.name] = Stage.options(name=names[spec.name], **stage.deployment_options(), **health).bind(
            model=_model_options(graph, spec.name),
            stage=spec.name,
            max_batch_size=stage.max_batch_size,
            mode=stage.mode,
            max_replicas=stage.autoscaling.max_replicas,
            cpu_offload=stage.cpu_offload,
            faults=faults_options,
        )
    return nodes


def build_app(config: ServeConfig) -> Application:
    """Every model's graph under one HTTP ingress, which routes a request by its `model` field."""
    graphs = {
        graph.model.id: build_graph(graph, names, config.faults)
        for graph, names in zip(config.graphs, config.deployment_names(), strict=True)
    }
    ingress = config.ingress
    # Edge admission's room per deployment (serve/admission.py StageRoom), less what batch lines may hold.
    rooms = {
        name: (replica.max_ongoing_requests, replica.max_queued_requests)
        for graph, names in zip(config.graphs, config.deployment_names(), strict=True)
        for name, (_, replica) in zip(names.values(), graph.replicas(), strict=True)
    }
    tenancy = config.tenancy
    limits = TenantLimits.options(name="TenantLimits", ray_actor_options=on_the_head(0)).bind(
        tenancy.top_tenants, tenancy.lease_s, rooms, config.batch_in_flight(), max_uploads=tenancy.max_uploads
    )
    # The batch runner calls the same graphs as the ingress (Serve deploys each bound deployment once).
    runner = BatchRunner.options(name="BatchRunner", ray_actor_options=on_the_head(config.batch.num_cpus)).bind(
        config.model_dump(mode="json"), graphs, limits
    )
    return Ingress.options(
        name="Ingress",
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        max_queued_requests=ingress.max_queued_requests,
        ray_actor_options=on_the_head(ingress.num_cpus),
        graceful_shutdown_timeout_s=config.ingress_drain_s(),
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(config.model_dump(mode="json"), graphs, limits, runner)


def ensure_checkpoints(config: ServeConfig, progress=print) -> list[Path]:
    """Write each model's preset into its checkpoint folder where none of its family's pipeline folders
    is there yet (models of different families may share a folder); a folder with only some of them is
    refused rather than overwritten."""
    roots = []
    for index, graph in enumerate(config.graphs):
        root, family, at = graph.checkpoint_root(), graph.family, where(index)
        roots.append(root)
        missing = [folder for folder in family.folders if not (root / folder).is_dir()]
        if not missing:
            continue
        if len(missing) < len(family.folders):
            raise CheckpointError(f"{at}model.checkpoints: {root} lacks {', '.join(missing)} of {family.name}")
        if graph.model.preset is None:
            missing_list = ", ".join(missing)
            raise CheckpointError(
                f"{at}model.checkpoints: {root} has no {missing_list}; set {at}model.preset to make it"
            )
        progress(f"writing the {graph.model.preset} checkpoints of {graph.model.id} to {root} ...")
        write_checkpoints(family, graph.model.preset, root)
    return roots


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run serve.app:app_builder config=FILE [checkpoints=DIR]` and Serve config files."""
    if "config" not in args:
        raise ValueError(
            "config: pass the serving config, e.g. `serve run serve.app:app_builder config=deploy/local.yaml`"
        )
    config = load_config(args["config"], **{"model.checkpoints": args.get("checkpoints")})
    config.check_can_serve()
    ensure_checkpoints(config)
    return build_app(config)


def ray_serve_config(config_path: str, config: ServeConfig) -> dict[str, Any]:
    """The Ray Serve config file (for `serve deploy` / KubeRay's RayService) that runs this
    application: the builder and our config file; every deployment option comes from that file."""
    return {
        "proxy_location": PROXY_LOCATION,
        "http_options": config.http_options(),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serve.app:app_builder",
                "args": {"config": config_path},
            }
        ],
    }
