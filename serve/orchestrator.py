"""Walks one image through the serving graph (`stages/graph.py`'s walk, with Ray Serve calls).

Each stage's output goes into the next handle call by reference (the call's `ObjectRef`, which the
ingress owns), so embeddings and images travel through Ray's object store from replica to replica;
only the final image (and, when streaming, each stage's preview) is fetched by the ingress.
The next stage is called only once the previous one has finished (`ReadyWatcher` checks readiness
without fetching): a call made earlier would pass Ray's `max_queued_requests` check at once and then
wait unseen in the ingress, so a full stage could never shed load and its autoscaler would see demand
too early. Every call made for an image is cancelled if the image ends early (client gone, another
image of the request failed), so its tasks leave their stage's batch at the next step.

Faults. Every image has a deadline (epoch seconds, passed to every stage call, which drops its task at
the next step once it passes); past it the image fails with DeadlineExceeded. When a call fails because
its replica or node died (or the replica's engine loop did), the image is tried again, up to
`faults.max_attempts` times: each stage's output is kept (`done`) as the input of the next, so a retry
first probes the kept outputs in order, drops the first that is gone or failed and everything after it,
and calls again from there. That is the earliest stage whose inputs survive, with the same inputs
(the previous output carries the generator state), so the retried image is the same image.

Errors leave here as our own types: InvalidParameter (the request's fault), Overloaded (a stage shed
it), Unavailable (its replicas kept dying: retry later), DeadlineExceeded, StageFailure (the server's
fault, naming the stage): never Ray's wrappers, whose text carries tracebacks, actor ids and addresses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import ray
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve.admission import FairAdmission
from serve.config import FaultsConfig, ServeConfig
from serve.metrics import retry_metrics
from stages.errors import DeadlineExceeded, InvalidParameter, StageFailure
from stages.fair_share import DEFAULT_SHARE, Share
from stages.family import ModelFamily, StageSpec
from stages.graph import walk
from stages.params import RequestParams
from stages.stage_loop import StageRecord
from stages.task import EditImages, Presented, StageOutput

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """A stage shed the request (its queue is full): the client should retry later."""


class Unavailable(Exception):
    """The image's stage replicas kept failing past `faults.max_attempts`: the client should retry later."""


@dataclass
class StageResult:
    """A stage's output plus the records of every stage it went through, handed down the chain."""

    output: StageOutput
    records: list[StageRecord] = field(default_factory=list)
    presented: Presented | None = None  # the final picture, when the stage ran the safety checker on it

    def timings(self) -> list[dict]:
        return [asdict(record) for record in self.records]


OnStage = Callable[[StageSpec, StageResult], Awaitable[None]]


def unwrapped(err: BaseException) -> BaseException:
    """The error a stage raised, out of Ray's task-error wrappers (and Serve's, which wraps an upstream
    replica's death in a RayServeException with that death as its cause)."""
    while True:
        if isinstance(err, RayTaskError) and err.cause is not None and err.cause is not err:
            err = err.cause
        elif isinstance(err, RayServeException) and isinstance(err.__cause__, RayError):
            err = err.__cause__
        else:
            return err


def retriable(err: BaseException) -> bool:
    """Whether the image may be tried again: a replica, its worker or its node died, an input was lost
    with them, or a replica's engine loop died (its health check fails, and Ray replaces it)."""
    err = unwrapped(err)
    if isinstance(err, StageFailure):
        return err.phase == "replica"
    return isinstance(err, RayActorError | ObjectLostError | NodeDiedError | WorkerCrashedError)


def client_error(err: BaseException, stage: str) -> Exception:
    """What a client may be told about `err`, raised while `stage` was being called or awaited."""
    err = unwrapped(err)
    if isinstance(err, InvalidParameter | StageFailure | Overloaded | Unavailable | DeadlineExceeded):
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
        faults: FaultsConfig | None = None,
        names: dict[str, str] | None = None,
        model: str = "",
    ):
        self.family = family
        self.names = names or {}  # deployment names by node ("text_encoder", then each stage)
        self.encoder = encoder
        self.stages = stages
        self.watcher = ReadyWatcher()
        # Images let into the stages at once (shared by every model of this ingress replica); the rest
        # wait here in fair order: on a CPU more work in flight only slices the cores thinner.
        self.admission = admission
        self.faults = faults or FaultsConfig()
        self.model = model
        # Retries by the stage that failed, and images given up on (Unavailable), in this process.
        self.retries: Counter[str] = Counter()
        self.given_up = 0

    def deployments_for(self, params: RequestParams) -> list[str]:
        """The deployments an image with these parameters passes through (for edge admission)."""
        nodes = ["text_encoder", *(spec.name for spec in self.family.stages_for(params.size))]
        return [self.names[node] for node in nodes if node in self.names]

    def deadline(self, timeout_s: float | None = None) -> float:
        """An image's deadline (epoch seconds): `faults.timeout_s` from now, or `timeout_s` if shorter."""
        limit = self.faults.timeout_s if timeout_s is None else min(timeout_s, self.faults.timeout_s)
        return time.time() + limit

    async def image(
        self,
        request_id: str,
        params: RequestParams,
        on_stage: OnStage | None = None,
        edit: EditImages | ray.ObjectRef | None = None,
        share: Share = DEFAULT_SHARE,
        deadline: float | None = None,
    ) -> StageResult:
        """One image through the stages its size needs; `on_stage` gets each stage's result but the last.
        An edit's pictures (`edit`, or a ref to them) go to the stages that take them; `share` says whose
        image it is, in every stage's queue; past `deadline` (epoch seconds) it fails."""
        deadline = deadline or self.deadline()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                if self.admission is None:
                    return await self._image(request_id, params, on_stage, edit, share, deadline)
                async with self.admission.slot(request_id, share, self.cost(params)):
                    return await self._image(request_id, params, on_stage, edit, share, deadline)
        except DeadlineExceeded:
            raise
        except TimeoutError:  # the deadline passed here, between or around the stage calls
            raise DeadlineExceeded("request") from None

    def cost(self, params: RequestParams) -> float:
        """An image's fair-share cost (the family's: steps x pixels over its stages)."""
        return self.family.cost(params)

    async def _image(self, request_id, params, on_stage, edit, share: Share, deadline: float) -> StageResult:
        run = _ImageRun(self, params, on_stage, edit, share, deadline)
        for attempt in range(self.faults.max_attempts):
            call_id = request_id if attempt == 0 else f"{request_id}.retry{attempt}"
            try:
                return await run.attempt(call_id)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - retried, or re-raised as what the client may see
                if not retriable(err):
                    raise client_error(err, run.current) from None
                cause = type(unwrapped(err)).__name__
            if attempt + 1 < self.faults.max_attempts:
                await asyncio.sleep(self.faults.retry_backoff_s * 2**attempt)
                restart = await self._forget_failed(run.done, run.order, deadline)
                log.warning("%s: %s (%s) on attempt %d of %d; trying again from %s", request_id, run.current, cause,
                            attempt + 1, self.faults.max_attempts, restart)  # fmt: skip
                self.retries[restart] += 1  # the stage whose output failed or was lost: where it starts again
                retry_metrics().retried(self.model, restart, cause)
        self.given_up += 1
        raise Unavailable(f"{run.current}: its replicas failed {self.faults.max_attempts} times; retry later")

    async def _forget_failed(self, done: dict[str, ray.ObjectRef], order: list[str], deadline: float) -> str:
        """Drop the first kept output that failed or was lost (with its node), and every later one: the
        next attempt starts at that node (returned), from the outputs before it, which are still there."""
        for position, node in enumerate(order):
            if node not in done:
                return node
            try:
                await asyncio.wait_for(done[node], timeout=max(1.0, deadline - time.time()))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - gone or failed: made again from its own inputs
                for later in order[position:]:
                    done.pop(later, None)
                return node
        return order[-1]

    async def images(
        self,
        request_id: str,
        images: list[RequestParams],
        edit: EditImages | None = None,
        share: Share = DEFAULT_SHARE,
        deadline: float | None = None,
    ) -> list[StageResult]:
        """All images of a request together; the first failure cancels the others and is raised."""
        edit = shared(edit)
        deadline = deadline or self.deadline()
        tasks = [
            asyncio.create_task(self.image(f"{request_id}-{i}", p, edit=edit, share=share, deadline=deadline))
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


class _ImageRun:
    """One image's calls through the graph. Each node's output is kept (`done`) across attempts, so an
    attempt calls only the nodes whose outputs are missing, from the kept outputs before them."""

    def __init__(self, orchestrator: Orchestrator, params: RequestParams, on_stage, edit, share: Share, deadline):
        self.orchestrator = orchestrator
        self.params = params
        self.fields = params.model_dump()  # plain data crosses to the replicas; they validate it again
        self.kind = orchestrator.family.kind_of(params).name
        self.specs = orchestrator.family.stages_for(params.size)
        self.order = ["text_encoder", *(spec.name for spec in self.specs)]
        self.on_stage, self.edit, self.whose, self.deadline = on_stage, edit, asdict(share), deadline
        self.done: dict[str, ray.ObjectRef] = {}
        self.previewed: set[str] = set()
        self.current = "text_encoder"  # the node being called or awaited, for errors
        self.responses: list[DeploymentResponse] = []
        self.call_id = ""

    async def attempt(self, call_id: str) -> StageResult:
        self.call_id = call_id
        family = self.orchestrator.family
        try:
            return await (await walk(family, self.params, encode=self.encode, run_stage=self.run_stage,
                                     on_stage=self.preview))  # fmt: skip
        finally:  # whatever is still running for this attempt leaves its batch
            for response in self.responses:
                _cancel(response)
            self.responses = []

    async def encode(self, params: RequestParams) -> ray.ObjectRef:
        self.current = "text_encoder"
        if "text_encoder" not in self.done:
            response = self.orchestrator.encoder.encode.remote(
                params.prompt, params.negative_prompt, share=self.whose, deadline=self.deadline
            )
            self.responses.append(response)
            self.done["text_encoder"] = await response._to_object_ref()
        return self.done["text_encoder"]

    async def run_stage(self, spec: StageSpec, params: RequestParams, embeddings, previous) -> ray.ObjectRef:
        self.current = spec.name
        if spec.name not in self.done:
            response = self.orchestrator.stages[spec.name].run.remote(
                self.call_id,
                self.fields,
                embeddings=embeddings,
                previous=previous,
                kind=self.kind,
                edit=self.edit if spec.edits else None,
                final=spec is self.specs[-1],
                share=self.whose,
                deadline=self.deadline,
            )
            self.responses.append(response)
            ref = await response._to_object_ref()  # raises BackPressureError when the stage sheds
            await self.orchestrator.watcher.wait(ref)
            self.done[spec.name] = ref
        return self.done[spec.name]

    async def preview(self, spec: StageSpec, ref: ray.ObjectRef) -> None:
        if self.on_stage is not None and spec.name not in self.previewed:  # once, however many attempts
            await self.on_stage(spec, await ref)
            self.previewed.add(spec.name)


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
    for graph, names in zip(config.graphs, config.deployment_names(), strict=True):
        handles = dict(graphs[graph.model.id])
        encoder = handles.pop("text_encoder")
        orchestrators[graph.model.id] = Orchestrator(
            graph.family, encoder, handles, admission, config.faults, names, model=graph.model.id
        )
    return orchestrators
