"""The ingress's side of uploads (POST /v1/files, POST /v1/images/edits): who may upload, asked before any
of the body is read, and the body as a multipart form.

With Ray's proxy running serve/proxy_files.py, the proxy asks `admit` first (through the Ingress
deployment's `admit_upload`), writes the body to a file in `SPOOL`, and the route reads the form from
that file with the lease `admit` took. Without it, the route admits the upload itself and reads the body
as it arrives. Either way the tenant's limits are asked before the body is read, the body must arrive
within `ingress.body_timeout_s`, and the form's files are spooled to disk, not held in memory.
"""

from __future__ import annotations

import logging
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Request

from serve.batch.store import BatchStore, QuotaExceeded
from serve.config import ServeConfig
from serve.http_common import ApiError, Form, failure, multipart
from serve.http_limits import Gate
from serve.proxy_files import LEASE_HEADER, SPOOL_HEADER
from serve.tenancy.directory import KeyDirectory
from serve.tenancy.limits import Decision
from serve.tenancy.store import Tenant
from serve.workers import DATABASE, run_on

log = logging.getLogger(__name__)

SPOOL = Path(tempfile.gettempdir()) / "ifserve-spool"  # on the head, where the proxy and the ingress run
FILES, EDITS = "/v1/files", "/v1/images/edits"
_NAME = re.compile(r"^[0-9a-f]{32}$")
LEFTOVER_S = 3600.0  # a spooled body older than this was left by a proxy that died mid-way


def authenticate(directory: KeyDirectory, headers: Mapping[str, str]) -> Tenant:
    """The tenant of the request's key (401 without a good one, 503 when it cannot be checked yet), and,
    when the service is open, 403 for a browser's request from another site."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    try:
        tenant = directory.authenticate(token.strip() if scheme.lower() == "bearer" else None)
    except Exception as err:  # noqa: BLE001 - the keys' database is away: 503, never a wrong 401
        raise failure(err) from None
    if tenant is None:
        raise ApiError(401, "missing, invalid or revoked API key (Authorization: Bearer ...)", code="invalid_api_key")
    if directory.open and cross_site(headers):
        raise ApiError(403, "Origin: an open service (no API keys, loopback) takes no request from another site",
                       param="Origin", code="cross_site_request")  # fmt: skip
    return tenant


def cross_site(headers: Mapping[str, str]) -> bool:
    """Whether a browser sent this from another site's page: its Origin (browsers send one with every
    cross-origin POST) names another host than the request's, or its Sec-Fetch-Site says so."""
    if headers.get("sec-fetch-site", "") in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


class Uploads:
    def __init__(self, config: ServeConfig, directory: KeyDirectory, gate: Gate, batches: BatchStore):
        self.config, self.directory, self.gate, self.batches = config, directory, gate, batches
        SPOOL.mkdir(mode=0o700, exist_ok=True)
        for leftover in SPOOL.iterdir():
            try:
                if leftover.stat().st_mtime < time.time() - LEFTOVER_S:
                    leftover.unlink()
            except FileNotFoundError:  # another replica took it
                pass

    def limit(self, path: str) -> int:
        """The most bytes an upload to `path` may have (a file and its form's other fields; an edit's)."""
        return self.config.batch.max_file_bytes + (64 << 10) if path == FILES else self.config.ingress.max_upload_bytes

    async def admit(self, path: str, headers: Mapping[str, str]) -> dict:
        """The proxy asks, before it reads an upload's body: a grant (the spool file to write, the lease,
        the most bytes and seconds) or a refusal to send as it is."""
        try:
            tenant = authenticate(self.directory, headers)
            size, limit = int(headers.get("content-length") or 0), self.limit(path)
            if size > limit:
                raise ApiError(413, f"body: larger than {limit} bytes", param="body", code="body_too_large")
            if path == FILES:
                await self.check_quota(tenant, size)
            decision = await self.gate.admit_upload(tenant)
        except Exception as err:  # noqa: BLE001 - every refusal in OpenAI's shape, sent by the proxy
            response = failure(err).response()
            headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length",)}
            return {"refused": {"status": response.status_code, "body": bytes(response.body), "headers": headers}}
        return {"spool": secrets.token_hex(16), "dir": str(SPOOL), "lease": decision.lease, "max_bytes": limit,
                "timeout_s": self.config.ingress.body_timeout_s}  # fmt: skip

    async def check_quota(self, tenant: Tenant, size: int) -> None:
        try:
            await run_on(DATABASE, self.batches.check_quota, tenant.id, size)
        except QuotaExceeded as err:
            raise ApiError(413, str(err), param="file", code="storage_quota_exceeded") from None

    @asynccontextmanager
    async def form(self, request: Request, max_part: int, max_files: int) -> AsyncIterator[tuple[Form, Decision]]:
        """The upload's form and its lease: from the proxy's spool file, or read here as it arrives (the
        tenant admitted first). On an error the lease is given back; otherwise the caller does."""
        tenant: Tenant = request.state.tenant
        name = request.headers.get(SPOOL_HEADER)
        spooled = None
        if name is not None:
            if not _NAME.match(name) or not (SPOOL / name).is_file():
                raise ApiError(503, "upload: the proxy's spooled body is not here; send it again",
                               kind="server_error", code="upload_lost", headers={"Retry-After": "1"})  # fmt: skip
            decision = Decision(True, lease=request.headers.get(LEASE_HEADER))
            self.gate.keeper.hold(decision.lease)
            spooled = (SPOOL / name).open("rb")
        else:
            if request.url.path == FILES:
                await self.check_quota(tenant, int(request.headers.get("content-length") or 0))
            decision = await self.gate.admit_upload(tenant)
        try:
            limit, timeout_s = self.limit(request.url.path), self.config.ingress.body_timeout_s
            async with multipart(request, limit, timeout_s, max_part, max_files, spooled) as parsed:
                yield parsed, decision
        except BaseException:
            await self.gate.release(decision.lease)
            raise
        finally:
            if spooled is not None:
                spooled.close()
