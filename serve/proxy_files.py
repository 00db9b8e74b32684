"""Large bodies through Ray Serve's HTTP proxy: uploads spooled to disk before they reach the ingress,
and downloads sent from the store by the proxy itself.

Why: Ray Serve's proxy reads a request's body from the client as fast as it comes and queues all of it
in memory for the replica, and the replica fetches all of it into memory again, whatever the app has read
so far (ray/serve/_private/proxy.py `proxy_asgi_receive`, http_util.py `ASGIReceiveProxy`); a response
streams back the same way, as fast as the replica makes it, whatever the client has read. There is no
backpressure, so a 100 MiB upload or download would sit in the head's memory twice.

So this ASGI middleware, which Ray installs in its proxy when the proxy's environment has
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_files:middlewares` (`ifserve up` and the
RayService set it), does two things. For an upload (POST /v1/files, /v1/images/edits) it

1. asks the ingress whether the request may upload now (`Ingress.admit_upload`: its key, its tenant's
   request rate, concurrency and uploads in flight, its files' quota), and sends a refusal itself, without
   reading the body;
2. otherwise writes the body to a file in `SPOOL` (the proxy and the ingress both run on the head) as it
   arrives: uvicorn reads the socket only as fast as that, so memory holds a chunk, within the size and
   the time the ingress allowed (413, 408, each in OpenAI's error shape);
3. passes the request on with an empty body and the file's name and the lease in `x-ifserve-spool` and
   `x-ifserve-lease`; the ingress reads the file; the file is deleted, and the lease given back (again,
   when the ingress did), once the answer has been sent, whatever happened.

For every other request it tells the ingress it can send files (`x-ifserve-sendfile-ok`), and when an
answer carries `x-ifserve-sendfile: PATH` (a file in the store, which the ingress has checked the client
may read), it sends that file a chunk at a time, only as fast as the client takes it, instead of the
answer's own (empty) body. The `x-ifserve-*` headers are stripped from every client's request and from
every answer, and each request it passes on carries `x-ifserve-proxy` with a token the ingress made in
`SPOOL`: the ingress believes the other `x-ifserve-*` headers only with it, so without this middleware
nobody can send them.

Without it (a Ray started by hand without that variable) both still work: the ingress reads uploads and
streams downloads itself, and memory is what Ray's proxy makes it (deploy/README.md).

This module runs inside Ray's proxy: it imports nothing of the application.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import tempfile
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

APP_NAME = "ifserve"  # the Serve application (serve/app.py)
INGRESS = "Ingress"  # its ingress deployment
UPLOAD_ROUTES = ("/v1/files", "/v1/images/edits")
PRIVATE = b"x-ifserve-"  # headers only this middleware may set, and only the ingress may answer with
PROXY_HEADER = "x-ifserve-proxy"  # the spool's token: the request came through this middleware
SPOOL_HEADER, LEASE_HEADER = "x-ifserve-spool", "x-ifserve-lease"
SENDFILE_OK, SENDFILE = "x-ifserve-sendfile-ok", "x-ifserve-sendfile"  # the proxy can send; send this file
CHUNK = 1 << 20
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.proxy_files:middlewares"
FLUSH_BYTES = 1 << 20  # written to the file a MiB at a time, on a thread
# On the head, where this proxy and the ingress replicas run: spooled bodies, and the token the ingress
# made (TOKEN_FILE), which proves to it that a request's x-ifserve-* headers come from this middleware.
SPOOL = os.path.join(tempfile.gettempdir(), f"ifserve-spool-{os.getuid()}")
TOKEN_FILE = ".proxy-token"


def middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback: the middlewares its proxy applies."""
    return [Middleware(UploadSpool)]


class UploadSpool:
    def __init__(self, app: ASGIApp):
        self.app = app
        self._ingress = None
        self._token: bytes | None = None

    def ingress(self):
        if self._ingress is None:
            from ray import serve

            self._ingress = serve.get_deployment_handle(INGRESS, app_name=APP_NAME)
        return self._ingress

    async def ask(self, method: str, *args: Any) -> Any:
        """Call one of the ingress's methods, in a context of its own: the proxy's request context (which a
        kept-alive connection carries from its previous request) would make Serve treat the call as an HTTP
        request."""

        async def call() -> Any:
            return await getattr(self.ingress(), method).remote(*args)

        return await asyncio.get_running_loop().create_task(call(), context=contextvars.Context())

    async def token(self) -> bytes | None:
        """The ingress's token (None until an ingress replica has made it)."""
        if self._token is None:
            try:
                self._token = (await asyncio.to_thread(_read, os.path.join(SPOOL, TOKEN_FILE))).strip()
            except OSError:
                return None
        return self._token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope["headers"] if not name.lower().startswith(PRIVATE)]
        token = await self.token()
        if token is None:  # no ingress has started: nothing of ours to vouch for
            await self.app({**scope, "headers": headers}, receive, _private_stripped(send))
            return
        headers.append((PROXY_HEADER.encode(), token))
        if scope["method"] != "POST" or scope["path"] not in UPLOAD_ROUTES:
            scope = {**scope, "headers": [*headers, (SENDFILE_OK.encode(), b"1")]}
            await self.app(scope, receive, _sending_files(send))
            return
        await self._upload({**scope, "headers": headers}, receive, _private_stripped(send))

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            grant: dict[str, Any] = await self.ask("admit_upload", scope["path"], given)
        except Exception:  # noqa: BLE001 - no ingress answers: refused, rather than read into memory
            log.exception("upload spool: could not ask the ingress whether to take an upload")
            await _respond(send, 503, _error("the service cannot take uploads right now; retry later", 503),
                           {"Retry-After": "2"})  # fmt: skip
            return
        if "refused" in grant:
            await _respond(send, grant["refused"]["status"], grant["refused"]["body"], grant["refused"]["headers"])
            return
        path = os.path.join(SPOOL, grant["spool"])
        try:
            failed = await _spool(receive, path, grant["max_bytes"], grant["timeout_s"])
            if isinstance(failed, tuple):
                status, message = failed
                await _respond(send, status, _error(message, status), {})
            elif failed is None:
                forwarded = [(n, v) for n, v in scope["headers"] if n.lower() != b"content-length"] + [
                    (b"content-length", b"0"),
                    (SPOOL_HEADER.encode(), grant["spool"].encode()),
                    (LEASE_HEADER.encode(), grant["lease"].encode()),
                ]
                await self.app({**scope, "headers": forwarded}, _empty_then(receive), send)
        finally:  # whatever happened, the lease is back (again, harmlessly, when the ingress gave it back)
            await asyncio.to_thread(_remove, path)
            try:
                await self.ask("release_upload", grant["lease"])
            except Exception:  # noqa: BLE001 - it lapses on its own (tenancy.lease_s)
                log.exception("upload spool: could not give a lease back")


def _read(path: str) -> bytes:
    with open(path, "rb") as source:
        return source.read()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def _spool(receive: Receive, path: str, max_bytes: int, timeout_s: float) -> tuple[int, str] | str | None:
    """The body into `path`; None when whole, else (status, why) or "disconnected"."""
    loop = asyncio.get_running_loop()
    deadline, size, pending = loop.time() + timeout_s, 0, bytearray()
    sink = await asyncio.to_thread(open, path, "wb")
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return 408, f"body: not received within {timeout_s:g} s (ingress.body_timeout_s)"
            if message["type"] == "http.disconnect":
                return "disconnected"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                return 413, f"body: larger than {max_bytes} bytes"
            pending += chunk
            if len(pending) >= FLUSH_BYTES or not message.get("more_body", False):
                await asyncio.to_thread(sink.write, bytes(pending))
                pending.clear()
            if not message.get("more_body", False):
                return None
    finally:
        await asyncio.to_thread(sink.close)


def _private_stripped(send: Send) -> Send:
    """`send`, without the ingress's private headers."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [(n, v) for n, v in message.get("headers", [])
                                              if not n.lower().startswith(PRIVATE)]}  # fmt: skip
        await send(message)

    return sending


def _sending_files(send: Send) -> Send:
    """`send`, but an answer naming a file in `x-ifserve-sendfile` gets that file as its body (a 404 if the
    file went meanwhile)."""
    source = None

    async def sending(message: Message) -> None:
        nonlocal source
        if message["type"] == "http.response.start":
            named = [v for n, v in message.get("headers", []) if n.lower() == SENDFILE.encode()]
            if named:
                try:
                    source = await asyncio.to_thread(open, named[0].decode(), "rb")
                except OSError:
                    await _respond(send, 404, _error("file_id: its content is gone", 404), {})
                    source = "gone"
                    return
            await _private_stripped(send)(message)
        elif source is None:
            await send(message)
        elif message["type"] == "http.response.body" and not message.get("more_body", False) and source != "gone":
            await _send_file(send, source)  # the app's own (empty) body ended: the file instead

    return sending


async def _send_file(send: Send, source) -> None:
    try:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})  # waits for the client
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await asyncio.to_thread(source.close)


def _empty_then(receive: Receive) -> Receive:
    """The request's body, now empty; then whatever the client does next (its disconnect)."""
    sent = False

    async def empty() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return empty


def _error(message: str, status: int) -> bytes:
    code = {404: "not_found", 408: "body_timeout", 413: "body_too_large", 503: "unavailable"}.get(status)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    param = {404: "file_id", 503: None}.get(status, "body")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def _respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    fields += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
               if name.lower() not in ("content-type", "content-length")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})
