"""Runs images through the serving graph: encoder -> the stages an image's size needs.

Each stage's output goes into the next handle call by reference (the call's `ObjectRef`, which the
ingress owns), so embeddings and images travel through Ray's object store from replica to replica;
only the final image (and, when streaming, each stage's preview) is fetched by the ingress.
The next stage is called only once the previous one has finished (`ReadyWatcher` checks readiness
without fetching): a call made earlier would pass Ray's `max_queued_requests` check at once and then
wait unseen in the ingress, so a full stage could never shed load and its autoscaler would see demand
too early. Every call made for an image is cancelled if the image ends early (client gone, another
image of the request failed), so its tasks leave their stage's batch at the next step.

Kept out of the ingress class on purpose: Ray ships the `@serve.ingress` class by value, this module
by reference.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import ray
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve.api import error_body
from serve.deployments import StageResult
from stages.errors import InvalidParameter
from stages.families import ModelFamily, StageSpec
from stages.images import png_bytes, to_pil
from stages.params import GenerationParams

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """A stage shed the request (its queue is full): the client should retry later."""


OnStage = Callable[[StageSpec, StageResult], Awaitable[None]]


class ReadyWatcher:
    """Wakes coroutines when their `ObjectRef`s are ready, without fetching the objects here: one
    non-blocking `ray.wait` over every watched ref per interval."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self._waiting: dict[ray.ObjectRef, list[asyncio.Future]] = {}
        self._poller: asyncio.Task | None = None

    async def wait(self, ref: ray.ObjectRef) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(ref, []).append(future)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            await future
        finally:
            waiters = self._waiting.get(ref)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiting[ref]

    async def _poll(self) -> None:
        while self._waiting:
            refs = list(self._waiting)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in ready:
                for future in self._waiting.pop(ref, []):
                    if not future.done():
                        future.set_result(None)
            await asyncio.sleep(self.interval_s)


class Orchestrator:
    def __init__(self, family: ModelFamily, encoder: DeploymentHandle, stages: dict[str, DeploymentHandle]):
        self.family = family
        self.encoder = encoder
        self.stages = stages
        self.watcher = ReadyWatcher()

    async def image(self, request_id: str, params: GenerationParams, on_stage: OnStage | None = None) -> StageResult:
        """One image through the stages its size needs; `on_stage` gets each stage's output but the
        last (streaming previews)."""
        specs = self.family.stages_for(params.size)
        responses: list[DeploymentResponse] = []
        try:
            embeddings = self.encoder.encode.remote(params.prompt, params.negative_prompt)
            responses.append(embeddings)
            previous: ray.ObjectRef | None = None
            for spec in specs:
                response = self.stages[spec.name].run.remote(
                    request_id, params, embeddings=embeddings if spec.uses_embeddings else None, previous=previous
                )
                responses.append(response)
                previous = await response._to_object_ref()  # raises BackPressureError when the stage sheds
                await self.watcher.wait(previous)
                if on_stage is not None and spec is not specs[-1]:
                    await on_stage(spec, await previous)
            return await previous
        except BackPressureError as err:
            raise Overloaded(str(err)) from None
        finally:
            for response in responses:
                _cancel(response)

    async def images(self, request_id: str, images: list[GenerationParams]) -> list[StageResult]:
        """All images of a request together; the first failure cancels the others and is raised."""
        tasks = [asyncio.create_task(self.image(f"{request_id}-{i}", p)) for i, p in enumerate(images)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()

    async def stream(self, request_id: str, images: list[GenerationParams]) -> AsyncIterator[str]:
        """Server-sent events in the shape of OpenAI's image streaming: `image_generation.partial_image`
        for each finished stage before the last (with `stage`), then `image_generation.completed`,
        then `[DONE]`. A failure is sent as an `{"error": ...}` event and ends the stream."""
        queue: asyncio.Queue = asyncio.Queue()

        async def one(index: int, params: GenerationParams) -> None:
            partial = 0

            async def on_stage(spec: StageSpec, result: StageResult) -> None:
                nonlocal partial
                extra = {"stage": spec.name, "partial_image_index": partial}
                await queue.put(await asyncio.to_thread(image_event, "partial_image", index, params, result, **extra))
                partial += 1

            try:
                result = await self.image(f"{request_id}-{index}", params, on_stage)
                stages = result.timings()
                await queue.put(await asyncio.to_thread(image_event, "completed", index, params, result, stages=stages))
            except asyncio.CancelledError:
                raise
            except InvalidParameter as err:
                await queue.put(error_body(str(err), param=err.param))
            except Overloaded as err:
                await queue.put(error_body(f"overloaded, retry later: {err}", kind="server_error", code="overloaded"))
            except Exception as err:  # noqa: BLE001 - reported to the client as an error event
                log.exception("request %s image %d failed", request_id, index)
                await queue.put(error_body(str(err), kind="server_error"))
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(images)]
        try:
            open_images = len(tasks)
            while open_images:
                item = await queue.get()
                if item is None:
                    open_images -= 1
                    continue
                yield f"data: {json.dumps(item)}\n\n"
                if "error" in item:
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or an image failed: the others' tasks leave their batches
            for task in tasks:
                task.cancel()


def _cancel(response: DeploymentResponse) -> None:
    """Best-effort cancel; Ray re-raises a failed assignment's error (e.g. backpressure) from cancel()."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - the call already ended, one way or another
        pass


def png(result: StageResult) -> bytes:
    return png_bytes(to_pil(result.output.image))


def image_event(kind: str, index: int, params: GenerationParams, result: StageResult, **extra) -> dict:
    size = result.output.image.shape[-1]
    return {
        "type": f"image_generation.{kind}",
        "index": index,
        "seed": params.seed,
        "b64_json": base64.b64encode(png(result)).decode(),
        "size": f"{size}x{size}",
        "created_at": int(time.time()),
        "output_format": "png",
        "quality": "auto",
        "background": "opaque",
        **extra,
    }


def running_replicas(status, app_name: str, deployments: list[str]) -> dict[str, int]:
    """Running replicas of each named deployment, from `serve.status()`."""
    application = status.applications.get(app_name)
    found = application.deployments if application else {}
    counts = {}
    for name in deployments:
        states = found[name].replica_states if name in found else {}
        counts[name] = sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")
    return counts
