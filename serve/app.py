"""Builds the Ray Serve application from a `ServeConfig`: one deployment per node of the family's
graph (the text encoder, then its stages), each with its own pool, batching, queue and autoscaling
options, composed under the HTTP ingress.

    serve run serve.app:app_builder config=deploy/local.yaml      # Ray's own CLI
    ifserve up --config deploy/local.yaml                          # ours: also starts a local Ray
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from serve.config import ServeConfig, load_config
from serve.deployments import Stage, TextEncoder
from serve.ingress import Ingress
from stages.checkpoints import write_checkpoints
from stages.errors import CheckpointError

APP_NAME = "ifserve"


def build_app(config: ServeConfig) -> Application:
    family = config.family
    model = dict(
        family=config.model.family,  # the name replicas resolve (registered, or an import path)
        checkpoints=str(config.checkpoint_root()),  # absolute: replicas need not share our working directory
        device=config.model.device,
        dtype=config.model.dtype,
        variant=config.model.variant,
        batch_invariant=config.model.batch_invariant,
        safety_checker=config.model.safety_checker,
        text_encoder_8bit=config.model.text_encoder_8bit,
    )
    enc = config.encoder
    encoder = TextEncoder.options(name="TextEncoder", **enc.deployment_options()).bind(
        model=model,
        max_batch_size=enc.max_batch_size,
        batch_wait_timeout_s=enc.batch_wait_timeout_s,
        cache_size=enc.cache_size,
        max_replicas=enc.autoscaling.max_replicas,
    )
    stages = {}
    for spec in family.stages:
        stage = config.stages[spec.name]
        stages[spec.name] = Stage.options(name=spec.title, **stage.deployment_options()).bind(
            model=model,
            stage=spec.name,
            max_batch_size=stage.max_batch_size,
            mode=stage.mode,
            max_replicas=stage.autoscaling.max_replicas,
            cpu_offload=stage.cpu_offload,
        )
    ingress = config.ingress
    return Ingress.options(
        name="Ingress",
        num_replicas=ingress.num_replicas,
        max_ongoing_requests=ingress.max_ongoing_requests,
        max_queued_requests=ingress.max_queued_requests,
        ray_actor_options={"num_cpus": ingress.num_cpus},
    ).bind(config.model_dump(mode="json"), encoder, stages)


def ensure_checkpoints(config: ServeConfig, progress=print) -> Path:
    """Write the configured preset into the checkpoint folder when that folder is missing or empty."""
    root = config.checkpoint_root()
    if root.is_dir() and any(root.iterdir()):
        return root
    if config.model.preset is None:
        raise CheckpointError(f"model.checkpoints: {root} is empty and model.preset is not set to make one")
    progress(f"writing the {config.model.preset} checkpoints to {root} ...")
    write_checkpoints(config.family, config.model.preset, root)
    return root


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run serve.app:app_builder config=FILE [checkpoints=DIR]` and Serve config files."""
    if "config" not in args:
        raise ValueError(
            "config: pass the serving config, e.g. `serve run serve.app:app_builder config=deploy/local.yaml`"
        )
    config = load_config(args["config"], **{"model.checkpoints": args.get("checkpoints")})
    ensure_checkpoints(config)
    return build_app(config)


def ray_serve_config(config_path: str, config: ServeConfig) -> dict[str, Any]:
    """The Ray Serve config file (for `serve deploy` / KubeRay's RayService) that runs this
    application: the builder and our config file; every deployment option comes from that file."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.http.host, "port": config.http.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serve.app:app_builder",
                "args": {"config": config_path},
            }
        ],
    }
