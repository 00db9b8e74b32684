"""Ray Serve deployments of the model side: the text encoder and one class for every denoising stage.

They stay thin (as in `ray.serve.llm`): load the engine from the checkpoint folder, set torch's thread
count to the CPUs Ray gave the replica, and delegate. The stage's step-level scheduling lives in
`StageLoop`/`StepBatcher`; the encoder uses Ray Serve's own `@serve.batch` plus a prompt cache.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import torch
from ray import serve

from serve.metrics import EncoderMetrics, StageMetrics
from serve.stage_loop import StageLoop, StageRecord
from stages.batching import StepBatcher
from stages.families import get_family, stage_request
from stages.params import GenerationParams
from stages.task import StageOutput, TextEmbeddings

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


def _replica_info(threads: int, replica: str) -> dict:
    return {"replica": replica, "node_id": ray.get_runtime_context().get_node_id(), "torch_threads": threads}


@dataclass
class StageResult:
    """A stage's output plus the records of every stage it went through, handed down the chain."""

    output: StageOutput
    records: list[StageRecord] = field(default_factory=list)

    def timings(self) -> list[dict]:
        return [asdict(record) for record in self.records]


@serve.deployment
class TextEncoder:
    def __init__(
        self,
        *,
        family: str,
        checkpoints: str,
        device: str = "cpu",
        dtype: str = "float32",
        variant: str | None = None,
        batch_invariant: bool = True,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        cache_size: int = 256,
    ):
        self.threads, self.replica = configure_replica()
        spec = get_family(family)
        path = Path(checkpoints) / spec.encoder_folder
        self.encoder = spec.load_encoder(
            path, device=device, torch_dtype=DTYPES[dtype], variant=variant, batch_invariant=batch_invariant
        )
        self.cache: OrderedDict[tuple[str, str | None], TextEmbeddings] = OrderedDict()
        self.cache_size = cache_size
        self.hits = self.misses = self.batches = 0
        self.metrics = EncoderMetrics()
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def encode(self, prompt: str, negative_prompt: str | None = None) -> TextEmbeddings:
        key = (prompt, negative_prompt)
        if key in self.cache:
            self.hits += 1
            self.metrics.prompt(cached=True)
            self.cache.move_to_end(key)
            return self.cache[key]
        self.misses += 1
        self.metrics.prompt(cached=False)
        embeddings = await self._encode_batch(key)
        if self.cache_size:
            self.cache[key] = embeddings
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return embeddings

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, keys: list[tuple[str, str | None]]) -> list[TextEmbeddings]:
        self.batches += 1
        self.metrics.batch(len(keys))
        # Off the event loop, so requests arriving meanwhile gather into the next batch.
        return await asyncio.to_thread(self.encoder.encode, [p for p, _ in keys], [n for _, n in keys])

    def stats(self) -> dict:
        return {
            **_replica_info(self.threads, self.replica),
            "cache_entries": len(self.cache),
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "batches": self.batches,
        }


@serve.deployment
class Stage:
    """One denoising stage (which one: `stage`); new requests join the running batch at the next step."""

    def __init__(
        self,
        *,
        family: str,
        stage: str,
        checkpoints: str,
        device: str = "cpu",
        dtype: str = "float32",
        variant: str | None = None,
        batch_invariant: bool = True,
        max_batch_size: int = 8,
        mode: str = "step",
        max_replicas: int = 1,
    ):
        self.threads, self.replica = configure_replica()
        self.spec = get_family(family).stage(stage)
        path = Path(checkpoints) / self.spec.folder
        engine = get_family(family).load_stage(
            stage, path, device=device, torch_dtype=DTYPES[dtype], variant=variant, batch_invariant=batch_invariant
        )
        self.engine = engine
        batcher = StepBatcher(engine, max_batch_size=max_batch_size, mode=mode)
        metrics = StageMetrics(stage)
        self.loop = StageLoop(batcher, stage, self.replica, metrics=metrics, max_replicas=max_replicas)

    async def run(
        self,
        request_id: str,
        params: GenerationParams,
        embeddings: TextEmbeddings | None = None,
        previous: StageResult | None = None,
    ) -> StageResult:
        request = stage_request(
            self.spec, request_id, params, embeddings=embeddings, previous=previous.output if previous else None
        )
        output, record = await self.loop.run(request)
        return StageResult(output, [*(previous.records if previous else []), record])

    def stats(self) -> dict:
        return {
            **_replica_info(self.threads, self.replica),
            "stage": self.spec.name,
            **self.loop.load,
            **asdict(self.loop.stats),
            "unet_calls": self.engine.unet_calls,
        }

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
