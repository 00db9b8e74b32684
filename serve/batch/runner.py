"""The batch runner: one replica, started with the application, that works through the batches.

Each round (when woken by the API, when an item finishes, or every `batch.poll_s`):
1. check the input file of every `validating` batch (serve/batch/lines.py): any bad line fails it with
   an error file and nothing run; otherwise its items are queued and it is `in_progress`;
2. claim items (serve/batch/store.py: leases, SKIP LOCKED) up to `batch.max_in_flight` (fewer where
   the stages' slots are few: ServeConfig.batch_in_flight) and `max_in_flight_per_tenant` of one
   tenant, and send each through the same serving graph as /v1/images/generations, in its tenant's
   batch priority class;
3. write each result, then mark its item done (a task of its own renews the leases of the lines it runs);
4. end each batch whose items are all done: output and error files, then completed / cancelled / expired.

Each line is charged against its tenant's limits like an interactive request (serve/tenancy/limits.py:
requests and images per minute, images counted by cost, requests in flight); a line its tenant's limits
hold back goes back to the queue, not counted as a try, and that tenant's lines wait out its Retry-After.

One batch never stops another: validating or finalizing a batch that fails (its input unreadable, the
store refusing its output) is tried again with backoff while the others go on, and after
`batch.retry_for_s` that batch alone fails, with the error. A line whose runner died while running it
is claimed again at most MAX_ATTEMPTS times in all, then ends as an error line.

Every few seconds it ends and deletes the batches and files of tenants that no longer exist (deleted
with `ifserve tenants delete`). Every `storage.sweep_s` it also deletes `url` images whose links
expired, batch output files past their expiry, the per-item results of ended batches, and uploaded
files' blobs that no row names (their writer died before the row).

A runner that dies (killed, its node gone, the cluster restarted) leaves its items leased; the next
runner claims them again once the leases run out (`batch.lease_s`), and rewrites their results at the
same keys: each input line ends with exactly one output or error line. A runner that is stopped hands
its items back at once. It starts without the database, and its rounds fail (and are tried again) while
the database is away.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.batch.lines import check_lines, items
from serve.batch.store import BatchStore, Claimed, NotFound
from serve.batch.tables import CANCELLING, FINALIZING, IN_PROGRESS, VALIDATING
from serve.config import ServeConfig
from serve.database import Database
from serve.http_common import failure
from serve.metrics import batch_metrics, tenant_metrics
from serve.openai_api import error_body
from serve.orchestrator import Overloaded, Unavailable, build_orchestrators
from serve.served import ImageLinks, ServedModels, generate
from serve.tenancy.directory import DEFAULT_TENANT
from serve.tenancy.limits import OTHER, Decision, LeaseKeeper, check_fits_a_minute
from serve.tenancy.store import Tenant, TenantStore
from serve.workers import DATABASE, PICTURES, STORE, run_on
from stages.errors import DeadlineExceeded, StageFailure
from stages.fair_share import BATCH, Share

log = logging.getLogger(__name__)

EDITS = "/v1/images/edits"
MAX_ATTEMPTS = 3  # tries of a line whose stage failed or shed it, or whose runner died, before it is an error
PURGE_EVERY_S = 2.0  # how often deleted tenants' batches are looked for
SKIPPED_ERRORS = {
    "cancelled": {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"},
    "expired": {"code": "batch_expired", "message": "the batch's completion window ended before this request ran"},
}


@dataclass
class Trouble:
    """A batch whose validation or finalization keeps failing: tried again with backoff, then failed."""

    since: float
    tries: int = 0
    next_at: float = 0.0


@serve.deployment(num_replicas=1, max_ongoing_requests=100)
class BatchRunner:
    def __init__(self, config: dict, graphs: dict[str, dict[str, DeploymentHandle]], limits: DeploymentHandle):
        self.config = ServeConfig.model_validate(config)
        self.batch = self.config.batch
        self.served = ServedModels.of(self.config, build_orchestrators(self.config, graphs, admission=None))
        self.limits = limits
        self.leases = LeaseKeeper(limits, self.config.tenancy.lease_s, self.config.longest_request_s())
        database = Database(self.config.tenancy.database)  # reached on the first round, not here
        self.links = ImageLinks.of(self.config, database)
        self.store = BatchStore(database, self.links.blobs, self.batch.output_ttl_s, self.batch.max_tenant_bytes)
        self.tenants = TenantStore(database)
        self.base_url = self.config.public_base_url()
        self.max_line_bytes = self.config.batch_line_bytes()
        self.owner = "runner-" + secrets.token_hex(8)  # this process's leases
        self.running: dict[int, tuple[Claimed, asyncio.Task]] = {}
        self.held_back: dict[str, float] = {}  # tenant id -> when its limits let its lines run again
        self.trouble: dict[str, Trouble] = {}  # batch id -> its failures so far
        self.wake_event = asyncio.Event()
        self.rounds = 0
        self.last_sweep = self.last_purge = 0.0
        self.loop = asyncio.get_running_loop().create_task(self._run())
        # Its own task, so that a long round (a large file validated) never lets a running line's lease lapse.
        self.renewer = asyncio.get_running_loop().create_task(self._renew())

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
            "troubled": {batch_id: trouble.tries for batch_id, trouble in self.trouble.items()},
        }

    async def check_health(self) -> None:
        for task in (self.loop, self.renewer):
            if task.done():  # Serve replaces a replica whose loop died
                raise RuntimeError(f"the batch runner's loop ended: {task.exception()!r}")

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

    async def _renew(self) -> None:
        """Extend the leases of the lines this runner runs, every third of `batch.lease_s`."""
        while True:
            await asyncio.sleep(self.batch.lease_s / 3)
            try:
                await run_on(DATABASE, self.store.renew, self.owner, self.batch.lease_s, list(self.running))
            except Exception:  # noqa: BLE001 - the database is away: tried again; the leases may lapse meanwhile
                log.exception("batch runner: could not renew its lines' leases")

    async def _round(self) -> None:
        self.rounds += 1
        now = time.monotonic()
        validating = await run_on(DATABASE, self.store.with_status, VALIDATING)
        for row in validating:
            validate = functools.partial(self._validate, row.id, row.input_file_id, row.tenant_id, row.endpoint)
            await self._isolated(row.id, "validate", lambda work=validate: run_on(STORE, work))
        await run_on(DATABASE, self.store.expire_overdue)
        await run_on(DATABASE, self.store.skip_abandoned)
        if now - self.last_purge > PURGE_EVERY_S:
            self.last_purge = now
            await self._purge_deleted_tenants()
        await self._claim()
        mine = {claimed.batch_id for claimed, _ in self.running.values()}
        running = await run_on(DATABASE, self.store.with_status, IN_PROGRESS, FINALIZING, CANCELLING)
        for row in running:
            if row.id not in mine:
                cause = "cancelled" if row.status == CANCELLING else "expired"
                finalize = functools.partial(self.store.finalize, row.id, SKIPPED_ERRORS[cause])
                await self._isolated(row.id, "finalize", lambda work=finalize: run_on(STORE, work))
        live = {row.id for row in (*validating, *running)}
        for batch_id in [batch_id for batch_id in self.trouble if batch_id not in live]:  # ended, or purged
            del self.trouble[batch_id]
        if now - self.last_sweep > self.config.storage.sweep_s:
            self.last_sweep = now
            await run_on(STORE, self._sweep)

    async def _isolated(self, batch_id: str, what: str, work: Callable[[], Awaitable[object]]) -> None:
        """Run one batch's step so that its failure touches no other batch: retried with backoff (up to 30
        s apart), and after `batch.retry_for_s` the batch fails with the error."""
        now = time.monotonic()
        trouble = self.trouble.get(batch_id)
        if trouble is not None and now < trouble.next_at:
            return
        try:
            await work()
        except Exception as err:  # noqa: BLE001 - this batch's trouble, not the round's
            trouble = trouble or Trouble(since=now)
            trouble.tries += 1
            trouble.next_at = now + min(30.0, 2.0**trouble.tries)
            self.trouble[batch_id] = trouble
            log.warning("batch %s: %s failed (try %d): %r", batch_id, what, trouble.tries, err)
            if now - trouble.since >= self.batch.retry_for_s:
                error = {"code": f"{what}_failed", "message": f"the batch could not be {what}d: {type(err).__name__}",
                         "param": None, "line": None}  # fmt: skip
                if await run_on(DATABASE, self.store.fail_running, batch_id, error):
                    log.error("batch %s failed: could not %s it for %.0f s", batch_id, what, now - trouble.since)
                self.trouble.pop(batch_id, None)
            return
        self.trouble.pop(batch_id, None)

    def _sweep(self) -> None:
        swept = {
            "expired images": self.links.sweep(),
            "expired batch output files": self.store.sweep_expired_files(),
            "ended batches' per-line results": self.store.sweep_results(),
            "file blobs no row names": self.store.sweep_orphan_files(),
        }
        for what, count in swept.items():
            if count:
                log.info("deleted %d %s", count, what)

    async def _purge_deleted_tenants(self) -> None:
        """Deleted tenants' batches end at once: their lines in flight are dropped, their rows and files go."""
        gone = await run_on(STORE, self.store.purge_deleted_tenants, (DEFAULT_TENANT.id,))
        for tenant_id in gone:
            await run_on(STORE, self.links.delete_tenant, tenant_id)
        for claimed, task in list(self.running.values()):
            if claimed.tenant_id in gone:
                task.cancel()
        if gone:
            log.info("ended the batches and deleted the files of %d deleted tenants", len(gone))

    def _validate(self, batch_id: str, input_file_id: str, tenant_id: str, endpoint: str) -> None:
        """Check the input file a line at a time; queue its items, or fail the batch naming the bad lines.
        A file that is gone fails it; one that cannot be read now raises (tried again: `_isolated`)."""
        try:
            row, source = self.store.reader(tenant_id, input_file_id)
        except (NotFound, FileNotFoundError) as err:  # deleted before the batch started
            error = {"code": "missing_file", "message": f"input_file_id: cannot read {input_file_id}: {err}",
                     "param": "input_file_id", "line": None}  # fmt: skip
            self.store.fail(batch_id, [error], [{"id": None, "custom_id": None, "response": None, "error": error}])
            return
        check = functools.partial(self._parse, endpoint)
        with source:
            checked = check_lines(source, row.bytes, endpoint, check, self.batch.max_lines, self.batch.max_batch_bytes,
                                  self.max_line_bytes)  # fmt: skip
        if checked.errors:
            if checked.more_errors:
                checked.errors.append({"code": "more_errors", "message": f"{checked.more_errors} more lines have "
                                       "errors", "param": None, "line": None})  # fmt: skip
            self.store.fail(batch_id, checked.errors, checked.error_lines)
            return
        _, source = self.store.reader(tenant_id, input_file_id)
        with source:
            queued = ((n, custom_id, seeded(batch_id, custom_id, body))
                      for n, custom_id, body in items(source, self.max_line_bytes))  # fmt: skip
            self.store.start(batch_id, queued)

    def _parse(self, endpoint: str, body: dict):
        """A line's body as its endpoint reads it: (model, request, images, what an edit starts from)."""
        if endpoint == EDITS:
            return self.served.edit_json(body, self.config.ingress.max_image_pixels)
        return (*self.served.generation(body), None)

    async def _claim(self) -> None:
        free = self.config.batch_in_flight() - len(self.running)
        busy = Counter(claimed.tenant_id for claimed, _ in self.running.values())
        room = {tenant: self.batch.max_in_flight_per_tenant - count for tenant, count in busy.items()}
        now = time.monotonic()
        for tenant, until in list(self.held_back.items()):
            if until > now:
                room[tenant] = 0
            else:
                del self.held_back[tenant]
        claimed = await run_on(DATABASE, self.store.claim, self.owner, free, self.batch.lease_s, room,
                               self.batch.max_in_flight_per_tenant, MAX_ATTEMPTS)  # fmt: skip
        for item in claimed:
            if item.id in self.running:  # cannot happen while its lease is renewed; never run a line twice
                continue
            task = asyncio.get_running_loop().create_task(self._item(item))
            self.running[item.id] = (item, task)
            task.add_done_callback(lambda _, item_id=item.id: self._done(item_id))
        batch_metrics().in_flight.set(len(self.running))

    def _done(self, item_id: int) -> None:
        self.running.pop(item_id, None)
        batch_metrics().in_flight.set(len(self.running))
        self.wake_event.set()

    async def _tenant(self, tenant_id: str) -> Tenant | None:
        """The line's tenant as it is now; None once deleted."""
        if tenant_id == DEFAULT_TENANT.id:
            return DEFAULT_TENANT
        return await run_on(DATABASE, self.tenants.by_id, tenant_id)

    async def _admit(self, item: Claimed, tenant: Tenant, images: int, units: float) -> Decision | None:
        """The tenant's limits, as for an interactive request (no stage room: the runner's lines have theirs
        set aside). Refused, or the limits not answering: the line goes back to the queue, not counted as a
        try, and the tenant's lines wait out its Retry-After."""
        try:
            decision: Decision = await self.limits.acquire.remote(tenant, images, [], units)
        except Exception as err:  # noqa: BLE001 - TenantLimits restarting: not the line's fault
            log.warning("batch %s line %d: the tenant limits did not answer (%s)", item.batch_id, item.line, err)
            decision = Decision(False, {"Retry-After": "2"}, "unavailable")
        if decision.allowed:
            self.leases.hold(decision.lease)
            return decision
        wait = float(decision.headers.get("Retry-After", 1))
        self.held_back[tenant.id] = time.monotonic() + wait
        await run_on(DATABASE, self.store.release_item, item, self.owner, False)
        batch_metrics().finished(Share(tenant.id, BATCH, tenant.weight, decision.label), "held_back")
        return None

    async def _release(self, lease: str | None) -> None:
        try:
            await self.leases.release(lease)
        except Exception as err:  # noqa: BLE001 - it runs out on its own (tenancy.lease_s)
            log.warning("could not release a tenant lease: %s", err)

    async def _item(self, item: Claimed) -> None:
        """Run one line; write its result line; mark it done. Retriable failures go back to the queue."""
        request_id = f"batchreq_{item.batch_id.removeprefix('batch_')}_{item.line}"  # fixed: a rerun overwrites

        async def publish(name: str, picture: bytes) -> str:
            return await run_on(STORE, self.links.save, item.tenant_id, name, picture, self.base_url)

        try:
            tenant = await self._tenant(item.tenant_id)
        except Exception as err:  # noqa: BLE001 - the database is away: the line's lease lapses, it runs later
            log.warning("batch %s line %d: cannot read its tenant (%s)", item.batch_id, item.line, err)
            return
        if tenant is None:  # deleted: its batches are being purged
            return
        try:
            label = await self.limits.label.remote(tenant.name)
        except Exception:  # noqa: BLE001 - TenantLimits restarting: its metrics under "other"
            label = OTHER
        share = Share(tenant.id, BATCH, tenant.weight, label)
        decision = None
        try:
            target, body, images, edit = await run_on(PICTURES, self._parse, item.endpoint, item.body)
            units = target.units(images)
            check_fits_a_minute(tenant, units)
            decision = await self._admit(item, tenant, len(images), units)
            if decision is None:
                return
            tenant_metrics().requested(target.id, share, len(images))
            response = await generate(target, request_id, body, images, edit, share, publish)
            status, payload = 200, response
        except asyncio.CancelledError:
            raise
        except (Overloaded, Unavailable, DeadlineExceeded, StageFailure) as err:
            if item.attempts < MAX_ATTEMPTS:
                log.warning("batch %s line %d: %s; will retry", item.batch_id, item.line, err)
                await run_on(DATABASE, self.store.release_item, item, self.owner)
                batch_metrics().finished(share, "retried")
                return
            status, payload = error_line(err)
        except Exception as err:  # noqa: BLE001 - the request's own error, as the endpoint would answer it
            status, payload = error_line(err)
        finally:
            if decision is not None:
                await self._release(decision.lease)
        response = {"status_code": status, "request_id": request_id, "body": payload}
        line = {"id": f"batch_req_{item.id}", "custom_id": item.custom_id, "response": response, "error": None}
        await run_on(STORE, self.store.finish, item, self.owner, line, status)
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
