"""The ingress's side of uploads (POST /v1/files, POST /v1/images/edits) and of the files Ray's proxy sends:
who may upload, asked before any of the body is read, and the body as a multipart form.

With Ray's proxy running serve/proxy_files.py, the proxy asks `admit` first (through the Ingress
deployment's `admit_upload`), writes the body to a file in `SPOOL`, and the route reads the form from
that file with the lease `admit` took. Without it, the route admits the upload itself and reads the body
as it arrives. Either way the tenant's limits are asked before the body is read, the body must arrive
within `ingress.body_timeout_s`, and the form's files are spooled to disk, not held in memory.

The proxy's `x-ifserve-*` headers are believed only with its token (`x-ifserve-proxy`), which the first
ingress replica on the head writes into `SPOOL` (a folder only this user may use); a client without that
middleware in front cannot send them.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from fastapi import Request

from serve.batch.store import BatchStore
from serve.config import ServeConfig
from serve.http_common import ApiError, Form, failure, multipart
from serve.http_limits import Gate
from serve.proxy_files import LEASE_HEADER, PROXY_HEADER, SPOOL, SPOOL_HEADER, TOKEN_FILE
from serve.tenancy.directory import KeyDirectory
from serve.tenancy.limits import Decision
from serve.tenancy.store import Tenant
from serve.workers import DATABASE, STORE, run_on

log = logging.getLogger(__name__)

FILES = "/v1/files"
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


def _spool_folder() -> tuple[Path, str]:
    """`SPOOL`, made if missing, and its token (made once, kept across restarts). Refused if another user
    made the folder (it could read or swap what is spooled there)."""
    folder = Path(SPOOL)
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise RuntimeError(f"{folder} must belong to this user alone (mode 0700): remove it and start again")
    token_file = folder / TOKEN_FILE
    try:
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as sink:
            sink.write(secrets.token_hex(32))
    except FileExistsError:  # another replica made it
        pass
    for leftover in folder.iterdir():
        try:
            if leftover.name != TOKEN_FILE and leftover.stat().st_mtime < time.time() - LEFTOVER_S:
                leftover.unlink()
        except FileNotFoundError:  # another replica took it
            pass
    return folder, token_file.read_text().strip()


class Uploads:
    def __init__(self, config: ServeConfig, directory: KeyDirectory, gate: Gate, batches: BatchStore):
        self.config, self.directory, self.gate, self.batches = config, directory, gate, batches
        self.folder, self._token = _spool_folder()

    def from_proxy(self, request: Request) -> bool:
        """Whether the request came through serve/proxy_files.py, whose other x-ifserve-* headers hold."""
        return hmac.compare_digest(request.headers.get(PROXY_HEADER, "").encode(), self._token.encode())

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
                await run_on(DATABASE, self.batches.check_quota, tenant.id, size)
            decision = await self.gate.admit_upload(tenant)
        except Exception as err:  # noqa: BLE001 - every refusal in OpenAI's shape, sent by the proxy
            response = failure(err).response()
            headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length",)}
            return {"refused": {"status": response.status_code, "body": bytes(response.body), "headers": headers}}
        return {"spool": secrets.token_hex(16), "lease": decision.lease, "max_bytes": limit,
                "timeout_s": self.config.ingress.body_timeout_s}  # fmt: skip

    @asynccontextmanager
    async def form(self, request: Request, max_part: int, max_files: int) -> AsyncIterator[tuple[Form, Decision]]:
        """The upload's form and its lease: from the proxy's spool file, or read here as it arrives (the
        tenant admitted first). On an error the lease is given back; otherwise the caller does."""
        tenant: Tenant = request.state.tenant
        name = request.headers.get(SPOOL_HEADER) if self.from_proxy(request) else None
        spooled: BinaryIO | None = None
        if name is not None:
            decision = Decision(True, lease=request.headers.get(LEASE_HEADER))
            self.gate.keeper.hold(decision.lease)
        else:
            if request.url.path == FILES:
                size = int(request.headers.get("content-length") or 0)
                await run_on(DATABASE, self.batches.check_quota, tenant.id, size)
            decision = await self.gate.admit_upload(tenant)
        try:
            if name is not None:
                if not _NAME.match(name):
                    raise ApiError(400, "x-ifserve-spool: not a spool file's name", param="x-ifserve-spool")
                try:
                    spooled = await run_on(STORE, (self.folder / name).open, "rb")
                except FileNotFoundError:
                    raise ApiError(
                        503,
                        "upload: the proxy's spooled body is not here; send it again",
                        kind="server_error",
                        code="upload_lost",
                        headers={"Retry-After": "1"},
                    ) from None
            limit, timeout_s = self.limit(request.url.path), self.config.ingress.body_timeout_s
            async with multipart(request, limit, timeout_s, max_part, max_files, spooled) as parsed:
                yield parsed, decision
        except BaseException:
            await self.gate.release(decision.lease)
            raise
        finally:
            if spooled is not None:
                await run_on(STORE, spooled.close)
