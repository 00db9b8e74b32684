"""Prometheus metrics of the stages and the ingress, recorded through `ray.serve.metrics` and exported
by Ray's own metrics endpoint next to Ray Serve's `ray_serve_*` series (Serve adds the `deployment`,
`replica` and `application` tags). Ray's exporter prefixes every name with `ray_`; the scrape config in
`monitoring/prometheus.yml` renames `ray_ifserve_*` back to `ifserve_*`, so dashboards and rules use
our names. Labels are bounded: `model` (the served models' ids), `stage` (a family's stages and
text_encoder), `endpoint` (route templates), `status` (HTTP codes), `priority` (two classes) and
`tenant`: the top tenants by traffic by name, every other tenant as `other` (serve/tenancy/limits.py
picks the names; a share's `label`).

Everything is recorded from the stage's engine thread once per step or per task; a recording is a few
microseconds against UNet steps of milliseconds or more (`benchmarks/bench_metrics.py` measures it).
"""

from __future__ import annotations

from functools import lru_cache

from ray.serve import metrics

from stages.fair_share import Share

SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600]
# Ray ships histograms as bucket counts and re-creates each observation at its bucket's midpoint, so a
# histogram's `_sum` is exact only where every observed value is a midpoint. Batch sizes are integers:
# buckets (n - 0.5, n + 0.5] make each size its own midpoint, so the batch-size sum is exactly the
# task-steps executed (up to 64 per step; the first bucket, (0, 0.5], is never hit).
BATCH = [n + 0.5 for n in range(65)]


class StageMetrics:
    """One stage replica's series, all labelled `model` and `stage`."""

    def __init__(self, stage: str, model: str = ""):
        def tagged(metric):
            metric.set_default_tags({"model": model, "stage": stage})
            return metric

        keys = ("model", "stage")
        self.queue_wait = tagged(
            metrics.Histogram(
                "ifserve_stage_queue_wait_seconds",
                "Time from a task's arrival at the stage to its first step.",
                SECONDS,
                tag_keys=keys,
            )
        )
        self.step_duration = tagged(
            metrics.Histogram(
                "ifserve_stage_step_duration_seconds",
                "Duration of one batched denoising step.",
                SECONDS,
                tag_keys=keys,
            )
        )
        self.batch_size = tagged(
            metrics.Histogram(
                "ifserve_stage_batch_size",
                "Tasks sharing one batched step; the sum is the task-steps executed.",
                BATCH,
                tag_keys=keys,
            )
        )
        self.residence = tagged(
            metrics.Histogram(
                "ifserve_stage_residence_seconds",
                "Time a task spent in the stage, arrival to finish.",
                SECONDS,
                tag_keys=keys,
            )
        )
        self.images = tagged(metrics.Counter("ifserve_stage_images", "Images the stage finished.", tag_keys=keys))
        self.denoising_steps = tagged(
            metrics.Counter(
                "ifserve_stage_denoising_steps",
                "Denoising steps executed, summed over the tasks of each step.",
                tag_keys=keys,
            )
        )
        self.busy = tagged(
            metrics.Counter(
                "ifserve_stage_busy_seconds",
                "Seconds the replica spent stepping; its rate is the busy fraction.",
                tag_keys=keys,
            )
        )
        self.ended_tasks = tagged(
            metrics.Counter(
                "ifserve_stage_tasks_ended",
                "Tasks that left the stage without finishing, by outcome.",
                tag_keys=("model", "stage", "outcome"),
            )
        )
        self.active = tagged(metrics.Gauge("ifserve_stage_tasks_active", "Tasks in the running batch.", tag_keys=keys))
        self.waiting = tagged(
            metrics.Gauge(
                "ifserve_stage_tasks_waiting",
                "Tasks admitted to the replica, waiting to join the batch.",
                tag_keys=keys,
            )
        )
        self.max_batch = tagged(
            metrics.Gauge(
                "ifserve_stage_max_batch_size",
                "The configured batch size: the capacity of one replica's step.",
                tag_keys=keys,
            )
        )
        self.accelerator_memory = tagged(
            metrics.Gauge(
                "ifserve_accelerator_memory_bytes", "Accelerator memory allocated by the replica.", tag_keys=keys
            )
        )
        self.accelerator_utilization = tagged(
            metrics.Gauge(
                "ifserve_accelerator_utilization_ratio",
                "Accelerator utilisation seen by the replica, 0-1.",
                tag_keys=keys,
            )
        )
        self.arrived = tagged(
            metrics.Counter(
                "ifserve_stage_tasks_arrived", "Tasks that arrived at the stage (its demand).", tag_keys=keys
            )
        )
        self.max_replicas = tagged(
            metrics.Gauge("ifserve_stage_max_replicas", "The autoscaling ceiling of the stage.", tag_keys=keys)
        )
        by_tenant = ("model", "stage", "tenant", "priority")
        self.tenant_queue_wait = tagged(
            metrics.Histogram(
                "ifserve_tenant_queue_wait_seconds",
                "Time from a task's arrival at the stage to its first step, by tenant and priority class.",
                SECONDS,
                tag_keys=by_tenant,
            )
        )
        self.tenant_task_steps = tagged(
            metrics.Counter(
                "ifserve_tenant_task_steps", "Task-steps executed, by tenant and priority class.", tag_keys=by_tenant
            )
        )
        self.tenant_cost = tagged(
            metrics.Counter(
                "ifserve_tenant_cost",
                "Fair-share cost served (steps x pixels), by tenant and class: its share is the share of capacity.",
                tag_keys=by_tenant,
            )
        )
        self.preemptions = tagged(
            metrics.Counter(
                "ifserve_stage_preemptions",
                "Running tasks sent back to wait for higher-priority work, by the preempted task's class.",
                tag_keys=("model", "stage", "priority"),
            )
        )
        self._cuda = _cuda_device()
        # Counters start at 0, so the first increments after a replica starts show in rate() and increase().
        for counter in (self.images, self.denoising_steps, self.busy, self.arrived):
            _start_at_zero(counter)

    # ---- called from the engine thread ----------------------------------------------------------
    def arrived_task(self) -> None:
        self.arrived.inc()

    def started(self, queue_wait_s: float, share: Share) -> None:
        self.queue_wait.observe(queue_wait_s)
        self.tenant_queue_wait.observe(queue_wait_s, tags=_tenant_tags(share))

    def served(self, share: Share, steps: int, cost: float) -> None:
        tags = _tenant_tags(share)
        self.tenant_task_steps.inc(steps, tags=tags)
        self.tenant_cost.inc(cost, tags=tags)

    def preempted(self, share: Share) -> None:
        self.preemptions.inc(tags={"priority": share.priority})

    def stepped(self, seconds: float, batch: int, finished: int) -> None:
        self.step_duration.observe(seconds)
        self.batch_size.observe(batch)
        self.busy.inc(seconds)
        self.denoising_steps.inc(batch)
        if finished:
            self.images.inc(finished)

    def finished(self, residence_s: float) -> None:
        self.residence.observe(residence_s)

    def ended(self, outcome: str) -> None:  # "cancelled", "expired" (its deadline passed) or "failed"
        self.ended_tasks.inc(tags={"outcome": outcome})

    def refresh(self, active: int, waiting: int, max_batch: int, max_replicas: int) -> None:
        """Gauges: Ray drops a gauge that is not set again within two report intervals, so the engine
        loop calls this every second, busy or idle."""
        self.active.set(active)
        self.waiting.set(waiting)
        self.max_batch.set(max_batch)
        self.max_replicas.set(max_replicas)
        if self._cuda is not None:
            import torch

            self.accelerator_memory.set(torch.cuda.memory_allocated(self._cuda))
            try:
                self.accelerator_utilization.set(torch.cuda.utilization(self._cuda) / 100)
            except Exception:  # noqa: BLE001 - needs NVML (pynvml); memory is still reported
                pass


class EncoderMetrics:
    """The text encoder's prompts (by cache hit or miss) and batch sizes, labelled `model` and
    stage="text_encoder"."""

    def __init__(self, model: str = ""):
        self.prompts = metrics.Counter(
            "ifserve_encoder_prompts",
            "Prompts asked of the text encoder, by embedding-cache result.",
            tag_keys=("model", "stage", "cache"),
        )
        self.batch_size = metrics.Histogram(
            "ifserve_encoder_batch_size",
            "Prompts per batched text encoder forward.",
            BATCH,
            tag_keys=("model", "stage"),
        )
        for metric in (self.prompts, self.batch_size):
            metric.set_default_tags({"model": model, "stage": "text_encoder"})

    def prompt(self, cached: bool) -> None:
        self.prompts.inc(tags={"cache": "hit" if cached else "miss"})

    # The encoder's StageLoop reports through the same calls as a stage's (stages/stage_loop.LoopMetrics);
    # of those, the encoder records its batch sizes.
    def stepped(self, seconds: float, batch: int, finished: int) -> None:
        self.batch_size.observe(batch)

    def arrived_task(self) -> None: ...
    def started(self, queue_wait_s: float, share: Share) -> None: ...
    def served(self, share: Share, steps: int, cost: float) -> None: ...
    def preempted(self, share: Share) -> None: ...
    def finished(self, residence_s: float) -> None: ...
    def ended(self, outcome: str) -> None: ...
    def refresh(self, active: int, waiting: int, max_batch: int, max_replicas: int) -> None: ...


class RequestMetrics:
    """The ingress's end-to-end request latency and outcome, by endpoint (route template) and status."""

    def __init__(self):
        keys = ("endpoint", "status")
        self.duration = metrics.Histogram(
            "ifserve_request_duration_seconds",
            "End-to-end HTTP request latency, to the last byte.",
            SECONDS,
            tag_keys=keys,
        )
        self.requests = metrics.Counter("ifserve_requests", "HTTP requests by endpoint and status.", tag_keys=keys)
        self._seen: set[tuple[str, int]] = set()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        # A new (endpoint, status) series starts at 0 before its first increment, for rate().
        if (endpoint, status) not in self._seen:
            self._seen.add((endpoint, status))
            _start_at_zero(self.requests, {"endpoint": endpoint, "status": str(status)})
        tags = {"endpoint": endpoint, "status": str(status)}
        self.duration.observe(seconds, tags=tags)
        self.requests.inc(tags=tags)


class RetryMetrics:
    """Images tried again after a stage call failed with its replica, worker or node (serve/orchestrator.py),
    by model, the stage that failed and why (the error's type: a handful of Ray's)."""

    def __init__(self):
        self.retries = metrics.Counter(
            "ifserve_image_retries", "Images tried again after a stage's replica, worker or node failed.",
            tag_keys=("model", "stage", "cause"),
        )  # fmt: skip

    def retried(self, model: str, stage: str, cause: str) -> None:
        self.retries.inc(tags={"model": model, "stage": stage, "cause": cause})


@lru_cache(maxsize=1)
def retry_metrics() -> RetryMetrics:
    return RetryMetrics()


class TenantMetrics:
    """The ingress's per-tenant counts: images admitted and requests refused by a rate limit."""

    def __init__(self):
        self.images = metrics.Counter(
            "ifserve_tenant_images", "Images requested, by model, tenant and priority class.",
            tag_keys=("model", "tenant", "priority"),
        )  # fmt: skip
        self.limited = metrics.Counter(
            "ifserve_tenant_rate_limited", "Requests refused with 429, by tenant and the limit that refused them.",
            tag_keys=("tenant", "priority", "limit"),
        )  # fmt: skip

    def requested(self, model: str, share: Share, images: int) -> None:
        self.images.inc(images, tags={"model": model, **_tenant_tags(share)})

    def refused(self, share: Share, limit: str) -> None:
        self.limited.inc(tags={**_tenant_tags(share), "limit": limit})


class BatchMetrics:
    """The batch runner's lines: finished (or handed back for another try) by outcome, and in flight."""

    def __init__(self):
        self.lines = metrics.Counter(
            "ifserve_batch_lines",
            "Batch lines finished, by tenant and outcome (succeeded, errored, retried, held_back).",
            tag_keys=("tenant", "outcome"),
        )  # fmt: skip
        self.in_flight = metrics.Gauge("ifserve_batch_lines_in_flight", "Batch lines in the serving graph now.")

    def finished(self, share: Share, outcome: str) -> None:
        self.lines.inc(tags={"tenant": share.label, "outcome": outcome})


@lru_cache(maxsize=1)
def batch_metrics() -> BatchMetrics:
    return BatchMetrics()


@lru_cache(maxsize=1)
def tenant_metrics() -> TenantMetrics:
    return TenantMetrics()


def _tenant_tags(share: Share) -> dict[str, str]:
    return {"tenant": share.label, "priority": share.priority}


@lru_cache(maxsize=1)
def request_metrics() -> RequestMetrics:
    """Created on first use inside the ingress replica (metrics belong to the process that records)."""
    return RequestMetrics()


def _start_at_zero(counter: metrics.Counter, tags: dict[str, str] | None = None) -> None:
    # Ray's public `inc` refuses 0; `_record` is what it calls after that check.
    try:
        counter._record(0.0, tags=tags)
    except Exception:  # noqa: BLE001 - a Ray without it only loses the zero sample
        pass


def _cuda_device():
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else None
