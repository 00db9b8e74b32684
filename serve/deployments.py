"""Ray Serve deployments of the model side: the text encoder and one class for every denoising stage.

They stay thin (as in `ray.serve.llm`): load the family's component from the checkpoint folder, set
torch's thread count to the CPUs Ray gave the replica, and hand work to a `StageLoop`
(stages/stage_loop.py: scheduler, executor, report) running in a thread of its own. The encoder runs
the same loop over `EncoderEngine`, behind an LRU cache of embeddings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import ray
import torch
from ray import serve

from serve.metrics import EncoderMetrics, StageMetrics
from serve.orchestrator import StageResult
from stages.encoding import EncoderEngine, EncodeRequest
from stages.fair_share import DEFAULT_SHARE, Share
from stages.families import get_family
from stages.family import TEXT_TO_IMAGE
from stages.images import to_uint8
from stages.scheduler import StageScheduler
from stages.stage_loop import StageLoop
from stages.task import EditImages

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def configure_replica() -> tuple[int, str]:
    """Quiet the libraries, stay offline, and use as many torch threads as CPUs this replica was given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - constructed outside Serve (tests of the class itself)
        replica = ""
    return threads, replica


def _load_options(model: dict) -> dict:
    return dict(
        device=model["device"],
        torch_dtype=DTYPES[model["dtype"]],
        variant=model["variant"],
        batch_invariant=model["batch_invariant"],  # this deployment's mode: "split", "per_task" or "off"
    )


def _encoder_options(model: dict) -> dict:
    # The text encoder in its own dtype (model.text_encoder_dtype, e.g. T5 in bfloat16 beside float16 stages).
    return {**_load_options(model), "torch_dtype": DTYPES[model.get("text_encoder_dtype") or model["dtype"]]}


def _stage_options(model: dict, cpu_offload: bool) -> dict:
    extra = {"safety_checker": True} if model.get("safety_checker") else {}
    return {**_load_options(model), **extra, **({"cpu_offload": True} if cpu_offload else {})}


class _LoopReplica:
    """What both deployments share: the loop's lifecycle, its health, its stats and the fault hook."""

    loop: StageLoop
    threads: int
    replica: str
    faults: dict

    def check_health(self) -> None:
        """Ray Serve calls this every `faults.health_check_period_s`; raising makes Ray replace the
        replica, and the orchestrator retries the images it held."""
        problem = self.loop.health(self.faults.get("stall_factor", 10.0), self.faults.get("min_stall_s", 60.0))
        if problem is not None:
            raise RuntimeError(problem)

    def inject_fault(self, kind: str = "wedge") -> None:
        """Tests' fault hook (`faults.fault_hooks`): `wedge` stops the engine thread stepping."""
        if not self.faults.get("fault_hooks"):
            raise PermissionError("faults.fault_hooks is off")
        if kind != "wedge":
            raise ValueError(f"kind: unknown fault {kind!r} (wedge)")
        self.loop.wedge()

    def stats(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "torch_threads": self.threads,
            "stage": self.loop.name,
            **self.loop.load,
            **asdict(self.loop.stats),
        }

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()


@serve.deployment
class TextEncoder(_LoopReplica):
    def __init__(
        self,
        *,
        model: dict,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        cache_size: int = 256,
        max_replicas: int = 1,
        faults: dict | None = None,
    ):
        self.threads, self.replica = configure_replica()
        self.faults = faults or {}
        family = get_family(model["family"])
        encoder = family.load_encoder_from(model["checkpoints"], **_encoder_options(model))
        self.metrics = EncoderMetrics(model.get("id", ""))
        self.loop = StageLoop(
            EncoderEngine(encoder),
            StageScheduler(max_batch_size),
            replica=self.replica,
            metrics=self.metrics,
            max_replicas=max_replicas,
            batch_wait_s=batch_wait_timeout_s,
        ).start()
        # Kept per tenant: a tenant must not learn from a fast answer that another sent the same prompt.
        self.cache: OrderedDict[tuple[str, str, str | None], Any] = OrderedDict()
        self.cache_size = cache_size
        self.hits = self.misses = 0
        self._calls = 0

    async def encode(
        self, prompt: str, negative_prompt: str | None = None, share: dict | None = None, deadline: float | None = None
    ) -> Any:
        whose = Share(**share) if share else DEFAULT_SHARE
        key = (whose.tenant, prompt, negative_prompt)
        if key in self.cache:
            self.hits += 1
            self.metrics.prompt(cached=True)
            self.cache.move_to_end(key)
            return self.cache[key]
        self.misses += 1
        self.metrics.prompt(cached=False)
        self._calls += 1
        request = EncodeRequest(prompt, negative_prompt)
        embeddings, _ = await self.loop.run(f"encode-{self._calls}", request, whose, deadline=deadline)
        if self.cache_size:
            self.cache[key] = embeddings
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return embeddings

    def stats(self) -> dict:
        return {
            **super().stats(),
            "cache_entries": len(self.cache),
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "batches": self.loop.stats.steps,
        }


@serve.deployment
class Stage(_LoopReplica):
    """One denoising stage of the family (which one: `stage`); new requests join the running batch at
    the next step."""

    def __init__(
        self,
        *,
        model: dict,
        stage: str,
        max_batch_size: int = 8,
        mode: str = "step",
        max_replicas: int = 1,
        cpu_offload: bool = False,
        faults: dict | None = None,
    ):
        self.threads, self.replica = configure_replica()
        self.faults = faults or {}
        self.family = get_family(model["family"])
        self.spec = self.family.stage(stage)
        self.engine = self.family.load_stage(stage, model["checkpoints"], **_stage_options(model, cpu_offload))
        # Final pictures go through the safety checker here, beside the step loop's thread, never in it.
        self.presenter = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-present")
        self.loop = StageLoop(
            self.engine,
            StageScheduler(max_batch_size, mode),
            replica=self.replica,
            metrics=StageMetrics(stage, model.get("id", "")),
            max_replicas=max_replicas,
            os_priority=model["device"] == "cpu",  # the stages share the cores: see stages/thread_priority.py
        ).start()

    async def run(
        self,
        request_id: str,
        params: dict,
        embeddings: Any = None,
        previous: StageResult | None = None,
        kind: str = TEXT_TO_IMAGE,
        edit: EditImages | None = None,
        final: bool = False,
        share: dict | None = None,
        deadline: float | None = None,
    ) -> StageResult:
        request = self.family.stage_request(
            self.spec,
            request_id,
            self.family.kind(kind).params.model_validate(params),
            embeddings=embeddings,
            previous=previous.output if previous else None,
            edit=edit,
        )
        whose = Share(**share) if share else DEFAULT_SHARE
        # A step's fair-share cost is its pixels: a 1024 px step costs 256x a 64 px one.
        output, record = await self.loop.run(
            request_id, request, whose, step_cost=self.spec.output_size**2, deadline=deadline
        )
        presented = None
        if final:  # beside the step loop: the safety checker, and the picture in 8 bits for the ingress
            loop = asyncio.get_running_loop()
            if self.engine.safety is not None:
                presented = await loop.run_in_executor(self.presenter, self.engine.present, output.image)
            output = dataclasses.replace(
                output, image=await loop.run_in_executor(self.presenter, to_uint8, output.image)
            )
        return StageResult(output, [*(previous.records if previous else []), record], presented)

    def stats(self) -> dict:
        return {**super().stats(), "unet_calls": getattr(self.engine, "unet_calls", 0)}
