"""Walks one image through the serving graph (`stages/graph.py`'s walk, with Ray Serve calls).

Each stage's output goes into the next handle call by reference (the call's `ObjectRef`, which the
ingress owns), so embeddings and images travel through Ray's object store from replica to replica;
only the final image (and, when streaming, each stage's preview) is fetched by the ingress.
The next stage is called only once the previous one has finished (`ReadyWatcher` checks readiness
without fetching): a call made earlier would pass Ray's `max_queued_requests` check at once and then
wait unseen in the ingress, so a full stage could never shed load and its autoscaler would see demand
too early. Every call made for an image is cancelled if the image ends early (client gone, another
image of the request failed), so its tasks leave their stage's batch at the next step.

Errors leave here as our own types: InvalidParameter (the request's fault), Overloaded (a stage shed
it), StageFailure (the server's fault, naming the stage): never Ray's wrappers, whose text carries
tracebacks, actor ids and addresses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve.admission import FairAdmission
from serve.config import ServeConfig
from stages.errors import InvalidParameter, StageFailure
from stages.fair_share import DEFAULT_SHARE, Share
from stages.family import ModelFamily, StageSpec
from stages.graph import walk
from stages.params import RequestParams
from stages.stage_loop import StageRecord
from stages.task import EditImages, Presented, StageOutput

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """A stage shed the request (its queue is full): the client should retry later."""


@dataclass
class StageResult:
    """A stage's output plus the records of every stage it went through, handed down the chain."""

    output: StageOutput
    records: list[StageRecord] = field(default_factory=list)
    presented: Presented | None = None  # the final picture, when the stage ran the safety checker on it

    def timings(self) -> list[dict]:
        return [asdict(record) for record in self.records]


OnStage = Callable[[StageSpec, StageResult], Awaitable[None]]


def client_error(err: BaseException, stage: str) -> Exception:
    """What a client may be told about `err`, raised while `stage` was being called or awaited."""
    while isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause
    if isinstance(err, InvalidParameter | StageFailure | Overloaded):
        return err
    if isinstance(err, BackPressureError):
        return Overloaded(f"{stage} is at capacity")
    if isinstance(err, RayActorError):
        return StageFailure(stage, "replica", "its replica stopped")
    if isinstance(err, RayError):
        return StageFailure(stage, "replica", type(err).__name__)
    return err


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
    def __init__(
        self,
        family: ModelFamily,
        encoder: DeploymentHandle,
        stages: dict[str, DeploymentHandle],
        admission: FairAdmission | None = None,
    ):
        self.family = family
        self.encoder = encoder
        self.stages = stages
        self.watcher = ReadyWatcher()
        # Images let into the stages at once (shared by every model of this ingress replica); the rest
        # wait here in fair order: on a CPU more work in flight only slices the cores thinner.
        self.admission = admission

    async def image(
        self,
        request_id: str,
        params: RequestParams,
        on_stage: OnStage | None = None,
        edit: EditImages | ray.ObjectRef | None = None,
        share: Share = DEFAULT_SHARE,
    ) -> StageResult:
        """One image through the stages its size needs; `on_stage` gets each stage's result but the last.
        An edit's pictures (`edit`, or a ref to them) go to the stages that take them; `share` says whose
        image it is, in every stage's queue."""
        if self.admission is None:
            return await self._image(request_id, params, on_stage, edit, share)
        async with self.admission.slot(request_id, share, self.cost(params)):
            return await self._image(request_id, params, on_stage, edit, share)

    def cost(self, params: RequestParams) -> float:
        """An image's fair-share cost: steps x pixels summed over its stages."""
        return sum(
            spec.output_size**2 * (getattr(params, f"{spec.name}_steps", None) or 1)
            for spec in self.family.stages_for(params.size)
        )

    async def _image(self, request_id, params, on_stage, edit, share: Share) -> StageResult:
        responses: list[DeploymentResponse] = []
        current = ["text_encoder"]  # the stage being called or awaited, for errors
        fields = params.model_dump()  # plain data crosses to the replicas; they validate it again
        kind = self.family.kind_of(params).name
        last = self.family.stages_for(params.size)[-1].name
        whose = asdict(share)

        async def encode(params: RequestParams) -> DeploymentResponse:
            response = self.encoder.encode.remote(params.prompt, params.negative_prompt, share=whose)
            responses.append(response)
            return response

        async def run_stage(spec: StageSpec, params: RequestParams, embeddings, previous) -> ray.ObjectRef:
            current[0] = spec.name
            response = self.stages[spec.name].run.remote(
                request_id,
                fields,
                embeddings=embeddings,
                previous=previous,
                kind=kind,
                edit=edit if spec.edits else None,
                final=spec.name == last,
                share=whose,
            )
            responses.append(response)
            ref = await response._to_object_ref()  # raises BackPressureError when the stage sheds
            await self.watcher.wait(ref)
            return ref

        async def preview(spec: StageSpec, ref: ray.ObjectRef) -> None:
            if on_stage is not None:
                await on_stage(spec, await ref)

        try:
            return await (await walk(self.family, params, encode=encode, run_stage=run_stage, on_stage=preview))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised as what the client may see
            raise client_error(err, current[0]) from None
        finally:
            for response in responses:
                _cancel(response)

    async def images(
        self,
        request_id: str,
        images: list[RequestParams],
        edit: EditImages | None = None,
        share: Share = DEFAULT_SHARE,
    ) -> list[StageResult]:
        """All images of a request together; the first failure cancels the others and is raised."""
        edit = shared(edit)
        tasks = [
            asyncio.create_task(self.image(f"{request_id}-{i}", p, edit=edit, share=share))
            for i, p in enumerate(images)
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()


def shared(edit: EditImages | None) -> ray.ObjectRef | None:
    """An edit's pictures in the object store once, however many images and stages read them."""
    return None if edit is None else ray.put(edit)


def _cancel(response: DeploymentResponse) -> None:
    """Best-effort cancel; Ray re-raises a failed assignment's error (e.g. backpressure) from cancel()."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - the call already ended, one way or another
        pass


def running_replicas(status, app_name: str, deployments: list[str]) -> dict[str, int]:
    """Running replicas of each named deployment, from `serve.status()`."""
    application = status.applications.get(app_name)
    found = application.deployments if application else {}
    counts = {}
    for name in deployments:
        states = found[name].replica_states if name in found else {}
        counts[name] = sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")
    return counts


def build_orchestrators(
    config: ServeConfig, graphs: dict[str, dict[str, DeploymentHandle]], admission: FairAdmission | None
) -> dict[str, Orchestrator]:
    """One orchestrator per served model, over its handles by node ("text_encoder", then its stages)."""
    orchestrators = {}
    for graph in config.graphs:
        handles = dict(graphs[graph.model.id])
        encoder = handles.pop("text_encoder")
        orchestrators[graph.model.id] = Orchestrator(graph.family, encoder, handles, admission)
    return orchestrators
