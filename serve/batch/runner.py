"""The batch runner: one replica, started with the application, that works through the batches.

Each round (when woken by the API, when an item finishes, or every `batch.poll_s`):
1. check the input file of every `validating` batch (serve/batch/lines.py): any bad line fails it with
   an error file and nothing run; otherwise its items are queued and it is `in_progress`;
2. claim items (serve/batch/store.py: leases, SKIP LOCKED) up to `batch.max_in_flight` (fewer where
   the stages' slots are few: ServeConfig.batch_in_flight) and `max_in_flight_per_tenant` of one
   tenant, and send each through the same serving graph as /v1/images/generations, in its tenant's
   batch priority class;
3. write each result, then mark its item done; renew the leases held;
4. end each batch whose items are all done: output and error files, then completed / cancelled / expired.

Every `storage.sweep_s` it also deletes `url` images whose links expired, the per-item results of
ended batches, and uploaded files' blobs that no row names (their writer died before the row).

A runner that dies (killed, its node gone, the cluster restarted) leaves its items leased; the next
runner claims them again once the leases run out (`batch.lease_s`), and rewrites their results at the
same keys: each input line ends with exactly one output or error line. A runner that is stopped hands
its items back at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import secrets
import time
from collections import Counter

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.batch.lines import check_lines
from serve.batch.store import BatchStore, Claimed
from serve.batch.tables import CANCELLING, FINALIZING, IN_PROGRESS, VALIDATING
from serve.config import ServeConfig
from serve.database import open_database
from serve.http_common import failure
from serve.metrics import batch_metrics, tenant_metrics
from serve.openai_api import error_body
from serve.orchestrator import Overloaded, Unavailable, build_orchestrators
from serve.served import ImageLinks, ServedModels, generate
from serve.tenancy.directory import DEFAULT_TENANT
from serve.tenancy.store import Tenant, TenantStore
from stages.errors import DeadlineExceeded, InvalidParameter, StageFailure
from stages.fair_share import BATCH, Share

log = logging.getLogger(__name__)

EDITS = "/v1/images/edits"
MAX_ATTEMPTS = 3  # an item whose stage failed or shed it is tried this often before it is an error line
SKIPPED_ERRORS = {
    "cancelled": {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"},
    "expired": {"code": "batch_expired", "message": "the batch's completion window ended before this request ran"},
}


@serve.deployment(num_replicas=1, max_ongoing_requests=100)
class BatchRunner:
    def __init__(self, config: dict, graphs: dict[str, dict[str, DeploymentHandle]], limits: DeploymentHandle):
        self.config = ServeConfig.model_validate(config)
        self.batch = self.config.batch
        self.served = ServedModels.of(self.config, build_orchestrators(self.config, graphs, admission=None))
        self.limits = limits
        engine = open_database(self.config.tenancy.database)
        self.links = ImageLinks.of(self.config.storage, engine)
        self.store = BatchStore(engine, self.links.blobs)
        self.tenants = TenantStore(self.config.tenancy.database)
        http = self.config.http
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
        self.base_url = self.config.storage.public_url or f"http://{host}:{http.port}"
        self.owner = "runner-" + secrets.token_hex(8)  # this process's leases
        self.running: dict[int, tuple[Claimed, asyncio.Task]] = {}
        self.wake_event = asyncio.Event()
        self.rounds = 0
        self.last_renew = self.last_sweep = 0.0
        self.loop = asyncio.get_running_loop().create_task(self._run())

    # ---- called by the ingress ----------------------------------------------------------------------------
    async def wake(self) -> None:
        self.wake_event.set()

    async def stats(self) -> dict:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "owner": self.owner,
            "running": len(self.running),
            "rounds": self.rounds,
        }

    async def check_health(self) -> None:
        if self.loop.done():  # Serve replaces a replica whose loop died
            raise RuntimeError(f"the batch runner's loop ended: {self.loop.exception()!r}")

    def __del__(self) -> None:
        """Stopped (redeploy, downscale): hand the unfinished items back, so the next runner starts them
        at once instead of after their leases."""
        try:
            for _, task in self.running.values():
                task.cancel()
            self.store.release(self.owner)
        except Exception:  # noqa: BLE001 - the leases run out on their own
            pass

    # ---- the loop -----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except Exception:  # noqa: BLE001 - a failed round (database away) is tried again next time
                log.exception("batch runner: round failed")
            try:
                await asyncio.wait_for(self.wake_event.wait(), self.batch.poll_s)
            except TimeoutError:
                pass
            self.wake_event.clear()

    async def _round(self) -> None:
        self.rounds += 1
        now = time.monotonic()
        for row in await asyncio.to_thread(self.store.with_status, VALIDATING):
            await asyncio.to_thread(self._validate, row.id, row.input_file_id, row.tenant, row.endpoint)
        await asyncio.to_thread(self.store.expire_overdue)
        await asyncio.to_thread(self.store.skip_abandoned)
        if now - self.last_renew > self.batch.lease_s / 3:
            await asyncio.to_thread(self.store.renew, self.owner, self.batch.lease_s)
            self.last_renew = now
        await self._claim()
        mine = {claimed.batch_id for claimed, _ in self.running.values()}
        for row in await asyncio.to_thread(self.store.with_status, IN_PROGRESS, FINALIZING, CANCELLING):
            if row.id not in mine:
                cause = "cancelled" if row.status == CANCELLING else "expired"
                await asyncio.to_thread(self.store.finalize, row.id, SKIPPED_ERRORS[cause])
        if now - self.last_sweep > self.config.storage.sweep_s:
            self.last_sweep = now
            await asyncio.to_thread(self._sweep)

    def _sweep(self) -> None:
        swept = {
            "expired images": self.links.blobs.sweep("images", self.config.storage.url_ttl_s),
            "ended batches' per-line results": self.store.sweep_results(),
            "file blobs no row names": self.store.sweep_orphan_files(),
        }
        for what, count in swept.items():
            if count:
                log.info("deleted %d %s", count, what)

    def _validate(self, batch_id: str, input_file_id: str, tenant: str, endpoint: str) -> None:
        try:
            data = self.store.content(tenant, input_file_id)
        except Exception as err:  # noqa: BLE001 - the input file was deleted before the batch started
            error = {"code": "missing_file", "message": f"input_file_id: cannot read {input_file_id}: {err}",
                     "param": "input_file_id", "line": None}  # fmt: skip
            self.store.fail(batch_id, [error], [{"id": None, "custom_id": None, "response": None, "error": error}])
            return
        check = functools.partial(self._parse, endpoint)
        checked = check_lines(data, endpoint, check, self.batch.max_lines, self.batch.max_batch_bytes)
        if checked.errors:
            if checked.more_errors:
                checked.errors.append({"code": "more_errors", "message": f"{checked.more_errors} more lines have "
                                       "errors", "param": None, "line": None})  # fmt: skip
            self.store.fail(batch_id, checked.errors, checked.error_lines)
        else:
            self.store.start(batch_id, [(n, custom_id, seeded(batch_id, custom_id, body)) for n, custom_id, body
                                        in checked.items])  # fmt: skip

    def _parse(self, endpoint: str, body: dict):
        """A line's body as its endpoint reads it: (model, request, images, what an edit starts from)."""
        if endpoint == EDITS:
            return self.served.edit_json(body, self.config.ingress.max_image_pixels)
        return (*self.served.generation(body), None)

    async def _claim(self) -> None:
        free = self.config.batch_in_flight() - len(self.running)
        busy = Counter(claimed.tenant for claimed, _ in self.running.values())
        room = {tenant: self.batch.max_in_flight_per_tenant - count for tenant, count in busy.items()}
        claimed = await asyncio.to_thread(
            self.store.claim, self.owner, free, self.batch.lease_s, room, self.batch.max_in_flight_per_tenant
        )
        for item in claimed:
            task = asyncio.get_running_loop().create_task(self._item(item))
            self.running[item.id] = (item, task)
            task.add_done_callback(lambda _, item_id=item.id: self._done(item_id))
        batch_metrics().in_flight.set(len(self.running))

    def _done(self, item_id: int) -> None:
        self.running.pop(item_id, None)
        batch_metrics().in_flight.set(len(self.running))
        self.wake_event.set()

    async def _tenant(self, name: str) -> Share:
        try:
            tenant = await asyncio.to_thread(self.tenants.tenant, name)
        except InvalidParameter:  # the config's keys' tenant, or one deleted since
            tenant = DEFAULT_TENANT if name == DEFAULT_TENANT.name else Tenant(name)
        label = await self.limits.label.remote(name)
        return Share(tenant.name, BATCH, tenant.weight, label)

    async def _item(self, item: Claimed) -> None:
        """Run one line; write its result line; mark it done. Retriable failures go back to the queue."""
        request_id = f"batchreq_{item.batch_id.removeprefix('batch_')}_{item.line}"  # fixed: a rerun overwrites

        async def publish(name: str, picture: bytes) -> str:
            return await asyncio.to_thread(self.links.save, item.tenant, name, picture, self.base_url)

        share = await self._tenant(item.tenant)
        try:
            target, body, images, edit = await asyncio.to_thread(self._parse, item.endpoint, item.body)
            tenant_metrics().requested(target.id, share, len(images))
            response = await generate(target, request_id, body, images, edit, share, publish)
            status, payload = 200, response
        except asyncio.CancelledError:
            raise
        except (Overloaded, Unavailable, DeadlineExceeded, StageFailure) as err:
            if item.attempts < MAX_ATTEMPTS:
                log.warning("batch %s line %d: %s; will retry", item.batch_id, item.line, err)
                await asyncio.to_thread(self.store.release_item, item, self.owner)
                batch_metrics().finished(share, "retried")
                return
            status, payload = error_line(err)
        except Exception as err:  # noqa: BLE001 - the request's own error, as the endpoint would answer it
            status, payload = error_line(err)
        response = {"status_code": status, "request_id": request_id, "body": payload}
        line = {"id": f"batch_req_{item.id}", "custom_id": item.custom_id, "response": response, "error": None}
        await asyncio.to_thread(self.store.finish, item, self.owner, line, status)
        batch_metrics().finished(share, "succeeded" if status == 200 else "errored")


def error_line(err: BaseException) -> tuple[int, dict]:
    """The status and body /v1/images/generations would have answered for `err`."""
    error = failure(err)
    return error.status, error_body(error.message, param=error.param, kind=error.kind, code=error.code)


def seeded(batch_id: str, custom_id: str, body: dict) -> dict:
    """The body with a seed: its own, or one fixed by the batch and custom_id, so that a line run again
    (after a crash) makes the same image as its first run would have."""
    if body.get("seed") is not None:
        return body
    digest = hashlib.sha256(f"{batch_id}/{custom_id}".encode()).digest()
    return {**body, "seed": int.from_bytes(digest[:4], "big") % 2**31}
