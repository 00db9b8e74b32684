"""Blobs through fsspec (a local folder by default, any fsspec URL on a cluster), shared by every
ingress replica and the batch runner: `response_format: url` images, uploaded batch input files,
batch results and output files.

- A blob appears whole or not at all: it is written under a temporary name beside its final one and
  renamed (on object stores, a copy, which is atomic there). Temporary names are fixed per blob, so a
  writer that died half-way leaves a `.tmp` that the next write of the same blob replaces.
- Image URLs are signed (HMAC-SHA256 over the path and expiry time), so a browser opens them without a
  key, as it does OpenAI's. `sweep` deletes old blobs: images once their URLs have expired, and
  (with `keep`, the keys still named) uploaded files whose row was never written.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import posixpath
import time
from collections.abc import Collection
from datetime import UTC, datetime

import fsspec

log = logging.getLogger(__name__)
TMP_SUFFIX = ".tmp"


class BlobStore:
    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts):  # keys are ours, never a client's path
            raise ValueError(f"not a blob key: {key!r}")
        return posixpath.join(self.root, key)

    def write(self, key: str, data: bytes) -> None:
        final = self.path(key)
        folder, name = posixpath.split(final)
        tmp = posixpath.join(folder, f".{name}{TMP_SUFFIX}")
        self.fs.makedirs(folder, exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def delete(self, key: str) -> None:
        if self.fs.exists(self.path(key)):
            self.fs.rm(self.path(key), recursive=True)

    def keys(self, prefix: str = "") -> list[str]:
        """Every blob under `prefix`, temporary ones included, relative to the store."""
        base = self.path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.relpath(path, self.root) for path in self.fs.find(base))

    def sweep(self, prefix: str, older_than_s: float, keep: Collection[str] = ()) -> int:
        """Delete the blobs under `prefix` last written more than `older_than_s` ago, except the keys in
        `keep`; how many went."""
        cutoff, gone = time.time() - older_than_s, 0
        base = self.path(prefix)
        if not self.fs.exists(base):
            return 0
        for path, info in self.fs.find(base, detail=True).items():
            if _modified(info) < cutoff and posixpath.relpath(path, self.root) not in keep:
                self.fs.rm_file(path)
                gone += 1
        return gone


def _modified(info: dict) -> float:
    """A blob's last write as a Unix time, from whichever field the fsspec backend gives."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=UTC).timestamp()
    return time.time()  # unknown: never swept by mistake


class UrlSigner:
    """Signed, expiring links: `?expires=UNIX&signature=HEX` over the path and expiry time."""

    def __init__(self, secret: bytes, ttl_s: float):
        self.secret, self.ttl_s = secret, ttl_s

    def _digest(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, now: float | None = None) -> str:
        """`path` (e.g. /v1/images/files/NAME) with its query string, valid for ttl_s from now."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return f"{path}?expires={expires}&signature={self._digest(path, expires)}"

    def check(self, path: str, expires: str | None, signature: str | None) -> str | None:
        """None when the link is good; otherwise why not."""
        if expires is None or signature is None:
            return "not signed"
        try:
            when = int(expires)
        except ValueError:
            return "bad expiry time"
        if not hmac.compare_digest(self._digest(path, when), signature):
            return "bad signature"
        if when < time.time():
            return "expired"
        return None
