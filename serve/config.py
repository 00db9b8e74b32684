"""The serving config: one YAML file, validated by this schema, says which models and checkpoints,
which pool each stage runs on, and each stage's batching, queue limits and autoscaling.

    model:    {id, family, checkpoints, preset, device, dtype, text_encoder_dtype, variant, batch_invariance,
               safety_checker}
    cluster:  the logical resources `ifserve up` declares when it starts a local Ray
    http:     {host, port}                 auth: {api_key_sha256: [...], api_key_sha256_env, require_key}
    tenancy:  {database, database_env, refresh_s, top_tenants, lease_s, max_uploads}   (`ifserve tenants`, `keys`)
    ingress:  {num_cpus, num_replicas, max_ongoing_requests, max_queued_requests, max_body_bytes,
               max_upload_bytes, body_timeout_s, max_image_pixels, max_images_in_flight, interactive_reserve}
    storage:  {url, url_ttl_s, url_secret_env, public_url, sweep_s}   `url` images and batch files (fsspec)
    batch:    {max_file_bytes, max_lines, max_batch_bytes, max_in_flight, max_in_flight_per_tenant,
               max_tenant_bytes, output_ttl_s, retry_for_s, lease_s, poll_s, num_cpus}   (OpenAI's Batch API)
    faults:   {timeout_s, max_attempts, retry_backoff_s, health_check_period_s, health_check_timeout_s,
               stall_factor, min_stall_s, fault_hooks}           deadlines, retries, health checks
    kuberay:  {name, image, app_dir, ray_version, head_memory, idle_timeout_s, secret, models_claim,
               store_claim, pools: {<pool>: {accelerator, node_selector, tolerations, replicas_per_node,
               memory, max_nodes}}}                    the RayService of `ifserve serve-config --kuberay`
    encoder:  {pool, num_cpus, num_gpus, max_batch_size, batch_wait_timeout_s, cache_size, ...}
    stages:   {<stage of the family>: {pool, num_cpus, num_gpus, max_batch_size, mode, cpu_offload, autoscaling, ...}}
    models:   [{model, encoder, stages}, ...]   more models served beside the first, each on its own pools

Every field has a default except the model; errors name the field (`stages.stage1.max_batch_size`,
`models.0.stages.denoiser.pool`). A key that was renamed or removed is refused, naming it and showing
what to write instead (`model.batch_invariant`, `model.text_encoder_8bit`): a config that means
something else than it says is worse than one that does not load.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.errors import InvalidParameter
from stages.families import DEFAULT_FAMILY, get_family
from stages.family import ModelFamily
from stages.params import invalid_parameter

Pool = Annotated[str, Field(pattern=r"^pool_[a-z0-9_]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    """Passed to Ray Serve's `autoscaling_config` (same field names); validated by Ray as well."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    def ray_config(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Replica(_Strict):
    """Where a deployment's replicas run and how much they take in."""

    pool: Pool | None = None  # custom Ray resource of this deployment's pool (1 unit per replica)
    num_cpus: float = Field(1.0, gt=0)  # also the replica's torch thread count (at least 1)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # beyond this the caller gets 503 + Retry-After; -1: no limit
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    # How long one of its requests stays in a replica at the planned load (queue and run); the drain bound
    # below is derived from it.
    expected_residence_s: float | None = Field(None, gt=0)
    # How long a stopping replica (downscale, redeploy, SIGTERM) lets its requests finish before Ray kills
    # it and the orchestrator retries them elsewhere. Unset: 3 x expected_residence_s + 5 s, or 60 s.
    graceful_shutdown_timeout_s: float | None = Field(None, gt=0)

    def drain_s(self) -> float:
        if self.graceful_shutdown_timeout_s is not None:
            return self.graceful_shutdown_timeout_s
        return 60.0 if self.expected_residence_s is None else 3 * self.expected_residence_s + 5

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.pool:
            options["resources"] = {self.pool: 1}
        return options

    def deployment_options(self) -> dict[str, Any]:
        return dict(
            ray_actor_options=self.ray_actor_options(),
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            autoscaling_config=self.autoscaling.ray_config(),
            graceful_shutdown_timeout_s=self.drain_s(),
            graceful_shutdown_wait_loop_s=0.5,  # how often a stopping replica looks whether it is idle yet
        )


class BatchingReplica(Replica):
    max_batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _ongoing_covers_batch(self) -> BatchingReplica:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self


class EncoderConfig(BatchingReplica):
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a batch waits to fill
    cache_size: int = Field(256, ge=0)  # prompt embeddings kept (LRU); 0 turns the cache off


class StageConfig(BatchingReplica):
    mode: Literal["step", "request"] = "step"  # step-level (continuous) or request-level batching
    # The stage's models stay in CPU memory and move to the GPU only while they run (needs a GPU).
    cpu_offload: bool = False


class IngressConfig(_Strict):
    num_cpus: float = Field(0.1, ge=0)
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)
    max_body_bytes: int = Field(1 << 20, ge=1024)  # a larger request body is refused with 413
    max_upload_bytes: int = Field(16 << 20, ge=1024)  # ... and a larger edit upload (image + mask + fields)
    # A request's whole body must arrive within this (408 past it), so slow uploads cannot hold the slots.
    body_timeout_s: float = Field(120.0, gt=0)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)  # an uploaded picture with more is refused (400)
    # Images in the stages at once, per ingress replica; the rest wait at the ingress in arrival order.
    # None: no limit. On a CPU box the planner sets it to what keeps every core busy.
    max_images_in_flight: int | None = Field(None, ge=1)
    # ... and interactive images may take this many more, so that one need not wait for a batch image to
    # finish when batch work holds every slot.
    interactive_reserve: int = Field(1, ge=0)


Dtype = Literal["float32", "float16", "bfloat16"]
# How a deployment keeps each task's result independent of its batch-mates (stages/batch_invariance.py):
# "split" (batch-sensitive ops per task: bit for bit the reference), "per_task" (one model call per task:
# bit for bit, no batching gain), "off" (one plain batched call: within ~1e-3 of the reference).
Invariance = Literal["split", "per_task", "off"]
INVARIANCE_MODES = ("split", "per_task", "off")
ENCODER_NODE = "text_encoder"  # the text encoder's key wherever deployments are named by node

# Keys that no longer exist: each refused with what to write instead (the old value shown where it matters).
_REPLACED_MODEL_KEYS = {
    "batch_invariant": lambda old: (
        "renamed to model.batch_invariance, one mode for every deployment or a mapping by deployment: "
        f"write `batch_invariance: {'off' if old is False else 'split'}`"
        + (" (false was one plain batched call)" if old is False else " (true was the split kernels)")
        + ", or e.g. `batch_invariance: {stage1: split, stage3: off}`; modes split, per_task, off"
    ),
    "text_encoder_8bit": lambda old: (
        "removed: 8-bit T5 ran on the CPU and its outlier columns depended on the batch-mates; "
        "write `text_encoder_dtype: bfloat16` (T5 in bfloat16 on the GPU, ~9.5 GB; float16 keeps T5's "
        "`wo` layers in float32, ~11.5 GB)"
    ),
}


class ModelConfig(_Strict):
    id: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")]  # the `model` clients name
    family: str = DEFAULT_FAMILY  # a registered family, or `package.module:ATTRIBUTE` (stages/families)
    checkpoints: str  # folder with the family's pipeline folders (relative paths: to the working directory)
    preset: str | None = None  # `ifserve up` writes this preset of the family if the folder is empty
    device: str = "cpu"  # "cpu", or "cuda": then every deployment needs num_gpus > 0
    dtype: Dtype = "float32"
    # The text encoder's own dtype (None: `dtype`), e.g. T5 in bfloat16 beside float16 stages: under
    # float16 transformers keeps T5's `wo` layers in float32 (T5's `_keep_in_fp32_modules`), under
    # bfloat16 it keeps nothing back. T5-v1.1-XXL's encoder: ~11.5 GB in float16, ~9.5 GB in bfloat16.
    text_encoder_dtype: Dtype | None = None
    variant: str | None = None  # e.g. "fp16" weight files
    # Each request's image equals what it would be alone, whatever shared its batches: one mode for every
    # deployment, or a mapping deployment node ("text_encoder", or a stage of the family) -> mode, the
    # nodes left out "split".
    batch_invariance: Invariance | dict[str, Invariance] = "split"
    # Final images pass the family's safety checker and watermark (IF's, from IF-I's folder); a flagged
    # image is blacked out and the response says so.
    safety_checker: bool = False

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, advice in _REPLACED_MODEL_KEYS.items():
                if key in data:
                    raise ValueError(f"{key}: {advice(data[key])}")
        return data

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        get_family(value)
        return value

    @field_validator("batch_invariance", mode="before")
    @classmethod
    def _modes(cls, value: Any) -> Any:
        """YAML reads an unquoted `off` as false (and `on` as true): those are "off" (and "split")."""

        def mode(item: Any) -> Any:
            item = {False: "off", True: "split"}.get(item, item) if isinstance(item, bool) else item
            if item not in INVARIANCE_MODES:
                modes = ", ".join(INVARIANCE_MODES)
                raise ValueError(f"must be one of {modes}, or a mapping deployment -> one of them, got {item!r}")
            return item

        return {node: mode(item) for node, item in value.items()} if isinstance(value, dict) else mode(value)

    def invariance(self, node: str) -> str:
        """The batch-invariance mode of one deployment: ENCODER_NODE or a stage's name."""
        modes = self.batch_invariance
        return modes if isinstance(modes, str) else modes.get(node, "split")

    @property
    def encoder_dtype(self) -> str:
        return self.text_encoder_dtype or self.dtype

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


class ClusterConfig(_Strict):
    """What `ifserve up` declares when it starts a local Ray (CPUs and GPUs may be logical)."""

    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    resources: dict[Pool, float] = Field(default_factory=dict)


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AuthConfig(_Strict):
    # SHA-256 hex digests of the accepted API keys (`ifserve hash-key KEY`); the keys are never stored.
    api_key_sha256: list[Sha256] = Field(default_factory=list)
    # Also read digests (comma-separated) from this environment variable when the config loads, e.g.
    # from a Kubernetes secret; they join the list above.
    api_key_sha256_env: str | None = None
    # Every request needs a key, even while neither the list above nor the tenants' database holds one
    # (without it such a service is open, which only loopback allows).
    require_key: bool = False

    @model_validator(mode="after")
    def _digests_from_environment(self) -> AuthConfig:
        if self.api_key_sha256_env:
            found = [d.strip() for d in os.environ.get(self.api_key_sha256_env, "").split(",") if d.strip()]
            for digest in found:
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ValueError(f"{self.api_key_sha256_env} must hold SHA-256 hex digests, comma-separated")
            self.api_key_sha256 = sorted({*self.api_key_sha256, *found})
        return self

    def accepts(self, key: str | None) -> bool:
        if not key:
            return False
        digest = hash_key(key)
        return any(hmac.compare_digest(digest, known) for known in self.api_key_sha256)


class TenancyConfig(_Strict):
    # The tenants-and-keys database (serve/tenancy), an SQLAlchemy URL: an SQLite file, or PostgreSQL
    # (postgresql+psycopg://user:password@host/db) where replicas on several machines share it.
    database: str = Field("sqlite:///out/tenants.db", validate_default=True)
    refresh_s: float = Field(2.0, gt=0)  # how often each ingress replica reloads the keys and tenants
    top_tenants: int = Field(10, ge=0)  # tenants named in metrics (by images requested); the rest are `other`
    # A request's concurrency slot (and its stage room) is freed when it ends; its holder (an ingress
    # replica, the batch runner) renews it every quarter of this, so one whose holder died is freed after it.
    lease_s: float = Field(6.0, gt=0)
    # Uploads (files, edits' pictures) one tenant may be sending at once, over every ingress replica.
    max_uploads: int = Field(2, ge=1)
    # Read the database URL from this environment variable when the config loads and it is set (a URL with
    # a password belongs in a secret, not in the file); `database` otherwise.
    database_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _database_from_environment(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("database_env") and os.environ.get(data["database_env"]):
            data = {**data, "database": os.environ[data["database_env"]]}
        return data

    @field_validator("database")
    @classmethod
    def _absolute_sqlite_path(cls, value: str) -> str:
        """A relative SQLite path made absolute here, so replicas in another working directory open the
        same file."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:  # the value is not echoed: it may hold a password
            raise ValueError(
                "is not an SQLAlchemy URL (e.g. sqlite:///out/tenants.db or postgresql+psycopg://user:password@host/db)"
            ) from None
        path = url.database
        if url.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
            return value
        return url.set(database=str(Path(path).expanduser().resolve())).render_as_string(hide_password=False)


class StorageConfig(_Strict):
    """Where `response_format: url` images and batch files go (serve/blob_store.py), shared by every
    ingress replica and the batch runner."""

    # An fsspec URL or a local folder (relative: to the working directory, made absolute here), e.g.
    # s3://bucket/ifserve or gcs://bucket/ifserve on a cluster, with the fsspec backend installed.
    url: str = Field("out/store", min_length=1, validate_default=True)
    url_ttl_s: float = Field(3600.0, gt=0)  # how long a signed image URL works; the sweep deletes the image after
    # The secret that signs image URLs, from this environment variable; unset, one is made once and kept
    # in the database (every replica reads the same).
    url_secret_env: str | None = None
    # The links' scheme://host[:port] as clients reach the service (a load balancer's address); unset, an
    # HTTP request's own, and http://{http.host}:{http.port} for batch results: only on loopback (below).
    public_url: Annotated[str, Field(pattern=r"^https?://[^/?#\s]+$")] | None = None
    sweep_s: float = Field(300.0, gt=0)  # how often expired images (and file blobs no row names) are deleted

    @field_validator("url")
    @classmethod
    def _absolute_folder(cls, value: str) -> str:
        if "://" in value:
            return value
        return str(Path(value).expanduser().resolve())


class BatchConfig(_Strict):
    """OpenAI's Batch API (serve/batch): limits on input files and how the runner works through them."""

    max_file_bytes: int = Field(100 << 20, ge=1024)  # an upload (POST /v1/files) larger than this is a 413
    max_lines: int = Field(50_000, ge=1)  # a batch's input file with more lines fails validation
    max_batch_bytes: int = Field(100 << 20, ge=1)  # ... and one with more bytes
    max_in_flight: int = Field(16, ge=1)  # items the runner has in the serving graph at once, all tenants
    max_in_flight_per_tenant: int = Field(8, ge=1)  # ... and of one tenant
    # Bytes of files one tenant may keep (uploads and batch outputs); None: no limit.
    max_tenant_bytes: int | None = Field(10 << 30, ge=1)
    # A batch's output and error files, and the `url` images they link, are kept this long after its
    # completion window ends, then deleted.
    output_ttl_s: float = Field(30 * 86400.0, gt=0)
    # A batch whose input cannot be read, or whose output cannot be written, is tried again (with backoff)
    # for this long before it fails; other batches go on meanwhile.
    retry_for_s: float = Field(300.0, gt=0)
    lease_s: float = Field(30.0, gt=0)  # an item claimed by a runner that died is claimed again after this
    poll_s: float = Field(0.5, gt=0)  # how often the runner looks for work when it has not been woken
    num_cpus: float = Field(0.1, ge=0)  # the runner's replica: it waits on the graph, encodes PNGs, writes files


class FaultsConfig(_Strict):
    """Deadlines, retries and health checks (serve/orchestrator.py, serve/deployments.py)."""

    # Every request's deadline, unless it asks for less (the X-Request-Timeout header, in seconds); past
    # it, its tasks leave their batches at the next step and the client gets a 504.
    timeout_s: float = Field(600.0, gt=0)
    # Tries of an image whose stage replica (or node) died, the first included; each retry starts from that
    # stage's saved inputs and gives the same image. Past them: 503 with Retry-After.
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(0.5, ge=0)  # waited before the second try; doubled for each further one
    health_check_period_s: float = Field(10.0, gt=0)  # Ray Serve calls every replica's check_health this often
    health_check_timeout_s: float = Field(30.0, gt=0)  # ... and replaces one that has not answered in this long
    # A stage replica whose engine has taken no step on a non-empty batch for stall_factor x its usual step
    # time (and at least min_stall_s) fails its health check, and Ray replaces it.
    stall_factor: float = Field(10.0, gt=1)
    min_stall_s: float = Field(60.0, gt=0)
    # Tests only: replicas accept `inject_fault` (stage replicas' engine thread stops stepping).
    fault_hooks: bool = False


class KubePool(_Strict):
    """The Kubernetes nodes of one pool's KubeRay worker group (serve/kuberay.py)."""

    # The GPU product the group's pods ask for: a node selector on NVIDIA GPU feature discovery's
    # `nvidia.com/gpu.product` label (e.g. NVIDIA-H100-80GB-HBM3); unset, any node with a free GPU.
    accelerator: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)  # more node labels the pods need
    # Unset: tolerate the `nvidia.com/gpu` taint when the pool's replicas take GPUs.
    tolerations: list[dict[str, Any]] | None = None
    replicas_per_node: int = Field(1, ge=1)  # replicas one pod hosts (it offers this many pool units)
    memory: str = Field("64Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)?$")  # each pod's memory
    # Most pods of the group; unset, enough for the most replicas its deployments may scale to.
    max_nodes: int | None = Field(None, ge=1)


class KubeRayConfig(_Strict):
    """The KubeRay RayService that runs this config (`ifserve serve-config --kuberay`, deploy/kuberay/)."""

    name: str = Field("ifserve", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = "ifserve:latest"  # Ray (ray_version) with this project installed, its files in app_dir
    app_dir: str = "/app"  # where the image holds this repository (the config file is read from there)
    ray_version: str = "2.60.0"  # the Ray in the image; KubeRay's autoscaler runs the same version
    head_memory: str = Field("16Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)?$")
    idle_timeout_s: int = Field(300, ge=0)  # an idle worker pod is removed after this
    secret: str = "ifserve-secrets"  # the head's secrets: API key digests, database URL, URL secret (by env name)
    models_claim: str = "ifserve-models"  # PersistentVolumeClaim mounted at the checkpoints' parent folder
    store_claim: str = "ifserve-store"  # ... and at storage.url when that is a folder (ReadWriteMany)
    pools: dict[Pool, KubePool] = Field(default_factory=dict)  # a pool left out gets the defaults
    # Who the NetworkPolicy lets reach the head's dashboard (the KubeRay operator, which submits the Serve
    # config there) and every pod's metrics port (Prometheus): pod labels, and the namespace they run in
    # (None: any namespace).
    operator_labels: dict[str, str] = Field(default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"})
    operator_namespace: str | None = None
    monitoring_namespace: str | None = "monitoring"


class ModelGraph(_Strict):
    """One model and its graph's deployments: the text encoder and one per stage of its family."""

    model: ModelConfig
    # Left out: one replica on the pool named after the family's encoder (IF's TextEncoder: pool_text_encoder).
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    stages: dict[str, StageConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _graph_matches_family(self) -> ModelGraph:
        family = self.family
        if self.model.preset is not None and self.model.preset not in family.presets:
            raise ValueError(
                f"model.preset: {family.name} has no preset {self.model.preset!r}; it has {', '.join(family.presets)}"
            )
        lacking = self.model.safety_checker and family.option_error("safety_checker")
        if lacking:
            raise ValueError(f"model.safety_checker: {lacking}")
        known = [s.name for s in family.stages]
        unknown = sorted(set(self.stages) - set(known))
        if unknown:
            raise ValueError(f"stages: {self.model.family} has no stage {unknown[0]!r}; it has {', '.join(known)}")
        modes = self.model.batch_invariance
        foreign = sorted(set(modes) - {ENCODER_NODE, *known}) if isinstance(modes, dict) else []
        if foreign:
            raise ValueError(
                f"model.batch_invariance: {self.model.family} has no deployment {foreign[0]!r}; "
                f"it has {', '.join([ENCODER_NODE, *known])}"
            )
        for name in known:  # a stage left out of the file runs with the defaults on its own pool
            self.stages.setdefault(name, StageConfig(pool=f"pool_{name}"))
        if "encoder" not in self.model_fields_set:  # as a stage left out: on a pool of its own
            words = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", family.encoder_title).lower()
            self.encoder.pool = "pool_" + re.sub(r"[^a-z0-9_]", "_", words)
        on_cpu, device = self.model.device == "cpu", self.model.device
        for name, stage in self.stages.items():
            if stage.cpu_offload and (on_cpu or not stage.num_gpus):
                raise ValueError(f"stages.{name}.cpu_offload: needs a GPU (model.device cuda and num_gpus > 0)")
        # Every deployment loads onto model.device: on a GPU each needs a share of one from Ray (else Ray
        # places it where no GPU is, or lets it crowd a GPU other replicas were given); on the CPU a GPU
        # share would only hold a GPU nothing uses.
        for field, replica in self.replicas():
            if self.model.on_gpu and not replica.num_gpus:
                raise ValueError(
                    f"{field}.num_gpus: model.device is {device}, so this deployment needs a GPU from Ray: "
                    "num_gpus > 0 (a fraction such as 0.25 shares one GPU among deployments)"
                )
            if on_cpu and replica.num_gpus:
                raise ValueError(
                    f"{field}.num_gpus: model.device is cpu, so the {replica.num_gpus:g} GPU asked for would sit "
                    "idle: set model.device: cuda, or num_gpus: 0"
                )
        return self

    @property
    def family(self) -> ModelFamily:
        return get_family(self.model.family)

    def checkpoint_root(self) -> Path:
        return Path(self.model.checkpoints).expanduser().resolve()

    def replicas(self) -> list[tuple[str, Replica]]:
        """Each deployment's config with its field path: the encoder, then the stages."""
        return [("encoder", self.encoder), *((f"stages.{name}", stage) for name, stage in self.stages.items())]

    def deployment_titles(self) -> dict[str, str]:
        """The family's names of this graph's deployments, by node: "text_encoder", then each stage."""
        family = self.family
        return {"text_encoder": family.encoder_title, **{spec.name: spec.title for spec in family.stages}}


class ServeConfig(ModelGraph):
    """The served model (`model`, `encoder`, `stages`), any further `models` beside it, and the service."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tenancy: TenancyConfig = Field(default_factory=TenancyConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    kuberay: KubeRayConfig = Field(default_factory=KubeRayConfig)
    # More models served beside `model`, each with its own deployments on its own pools; a request picks
    # one by its `model` field (unset: the first model).
    models: list[ModelGraph] = Field(default_factory=list)

    @model_validator(mode="after")
    def _service(self) -> ServeConfig:
        graphs = self.graphs
        seen: dict[str, int] = {}  # model id slug -> index of the model with it
        pools: dict[str, str] = {}
        for index, graph in enumerate(graphs):
            at, model_id = where(index), graph.model.id
            # Deployment and schema names carry the id's slug, so ids must differ in more than punctuation.
            first = seen.setdefault(model_slug(model_id), index)
            if first != index:
                other = graphs[first].model.id
                clash = "is already served" if other == model_id else f"would share derived names with {other!r}"
                raise ValueError(f"{at}model.id: {model_id!r} {clash}; model ids must differ")
            for field, replica in graph.replicas():
                if not replica.pool:
                    continue
                owner = pools.setdefault(replica.pool, graph.model.id)
                if owner != graph.model.id:
                    raise ValueError(
                        f"{at}{field}.pool: {replica.pool} already runs {owner}; give each model its own pools"
                    )
                if self.cluster.resources and replica.pool not in self.cluster.resources:
                    raise ValueError(f"{at}{field}.pool: {replica.pool} is not declared in cluster.resources")
        for pool in self.kuberay.pools:
            if pool not in pools:
                raise ValueError(f"kuberay.pools.{pool}: no deployment runs on this pool")
        if not _is_loopback(self.http.host):
            auth = self.auth
            if not (auth.api_key_sha256 or auth.api_key_sha256_env or auth.require_key):
                raise ValueError(
                    f"http.host: {self.http.host} listens beyond loopback; API keys are required there "
                    "(auth.api_key_sha256, auth.api_key_sha256_env, or auth.require_key with `ifserve keys`)"
                )
            if not self.storage.public_url:
                raise ValueError(
                    f"storage.public_url: http.host {self.http.host} listens beyond loopback; set the "
                    "scheme://host[:port] clients reach the service at, which `url` image links carry"
                )
        return self

    def check_can_serve(self) -> None:
        """What only the running service can check (its secrets are in its environment, not where a
        manifest is written): beyond loopback, some API key must be in force. InvalidParameter if not."""
        auth = self.auth
        if not _is_loopback(self.http.host) and not (auth.api_key_sha256 or auth.require_key):
            raise InvalidParameter(
                "auth.api_key_sha256_env",
                f"http.host {self.http.host} listens beyond loopback, and {auth.api_key_sha256_env} holds no "
                "key digest: set it (ifserve hash-key KEY), or auth.require_key with keys from `ifserve keys`",
            )

    def public_base_url(self) -> str:
        """Where clients reach the service, for links made outside any request (batch results)."""
        return self.storage.public_url or f"http://{self.http.host}:{self.http.port}"

    @property
    def graphs(self) -> list[ModelGraph]:
        """Every served model's graph; the first is the default model."""
        return [self, *self.models]

    def batch_in_flight(self) -> int:
        """Batch lines the runner may have in the graph at once: `batch.max_in_flight`, but always leaving
        `ingress.interactive_reserve` of the smallest stage's guaranteed slots (min replicas x
        max_ongoing_requests) free. Ray Serve queues a call that finds every slot taken in its router,
        first come first served, where no interactive request could overtake a batch line; inside a
        replica it preempts the batch line at the next step."""
        slots = min(
            max(1, stage.autoscaling.min_replicas) * stage.max_ongoing_requests
            for graph in self.graphs
            for stage in graph.stages.values()
        )
        return max(1, min(self.batch.max_in_flight, slots - self.ingress.interactive_reserve))

    def longest_request_s(self) -> float:
        """The longest a request may hold a tenant's lease: its body's deadline, then its own, and a minute."""
        return self.ingress.body_timeout_s + self.faults.timeout_s + 60

    def batch_line_bytes(self) -> int:
        """The longest batch input line: what its endpoint would take as a body (JSON, or an edit's pictures
        in base64), and a little more for the line around it."""
        ingress = self.ingress
        return max(ingress.max_body_bytes, -(-ingress.max_upload_bytes * 4 // 3)) + (64 << 10)

    def http_options(self) -> dict[str, Any]:
        """Ray Serve's proxy options: our host and port, and the proxy's own request timeout as a backstop
        behind the deadline every hop enforces (faults.timeout_s), late enough that the 504 comes first."""
        return {"host": self.http.host, "port": self.http.port, "request_timeout_s": self.faults.timeout_s + 30}

    def ingress_drain_s(self) -> float:
        """A stopping ingress replica waits for its requests to pass every stage of the slowest graph."""
        return max(sum(replica.drain_s() for _, replica in graph.replicas()) for graph in self.graphs) + 5

    def deployment_names(self) -> list[dict[str, str]]:
        """Each graph's deployment names by node: its family's titles, unless an earlier graph took one of
        them (the same family served twice); then all of its names start with its model id."""
        taken: set[str] = set()
        names = []
        for graph in self.graphs:
            titles = graph.deployment_titles()
            if taken & set(titles.values()):
                titles = {node: f"{model_slug(graph.model.id)}-{title}" for node, title in titles.items()}
            taken |= set(titles.values())
            names.append(titles)
        return names


def model_slug(model_id: str) -> str:
    """A model id in the names derived from it (deployments, schemas): letters, digits and `_`."""
    return re.sub(r"[^A-Za-z0-9]+", "_", model_id)


def where(index: int) -> str:
    """The config path of the `index`-th served model's keys: "" for `model`, "models.0." for the next."""
    return "" if index == 0 else f"models.{index - 1}."


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_config(data: dict[str, Any]) -> ServeConfig:
    """Validate a config mapping; the error names the first bad field with its dotted path."""
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        error = invalid_parameter(err)
        # A check across fields names its field at the start of its message, relative to where it ran
        # (the config, or one of `models`).
        found = re.match(r"([a-z_][a-z0-9_.]*): (.*)", error.message, re.DOTALL)
        if error.param == "request":
            raise (InvalidParameter(*found.groups()) if found else InvalidParameter("config", error.message)) from None
        if found:  # the field's own validator names it once more; a model's validator, a field of it
            param = error.param if error.param.endswith(found[1]) else f"{error.param}.{found[1]}"
            raise InvalidParameter(param, found[2]) from None
        raise error from None


def load_config(path: str | Path, **overrides: Any) -> ServeConfig:
    """Read a YAML config; `overrides` are dotted keys (`model.checkpoints`, `http.port`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise InvalidParameter("--config", f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise InvalidParameter("--config", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise InvalidParameter("--config", f"{path} must hold a mapping at the top level")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(data)
