"""Blobs through fsspec (a local folder by default, any fsspec URL on a cluster), shared by every
ingress replica and the batch runner: `response_format: url` images, uploaded batch input files,
batch results and output files.

- A blob appears whole or not at all: it is written under a temporary name beside its final one and
  renamed (on object stores, a copy, which is atomic there). Temporary names are fixed per blob (and
  writer, when several may write it), so a writer that died half-way leaves a `.tmp` that the next
  write of the same blob replaces.
- Large blobs stream both ways (`write_from`, `writer`, `reader`): memory never holds a whole upload,
  batch output or download.
- Image URLs are signed (HMAC-SHA256 over the path and expiry time), so a browser opens them without a
  key, as it does OpenAI's. `sweep` deletes old blobs: images once their URLs have expired, and
  (with `keep`, the keys still named) uploaded files whose row was never written.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import posixpath
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import BinaryIO

import fsspec

log = logging.getLogger(__name__)
TMP_SUFFIX = ".tmp"
CHUNK = 1 << 20  # what a streamed copy holds at once


class BlobStore:
    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts):  # keys are ours, never a client's path
            raise ValueError(f"not a blob key: {key!r}")
        return posixpath.join(self.root, key)

    def _tmp(self, key: str, writer: str = "") -> str:
        folder, name = posixpath.split(self.path(key))
        self.fs.makedirs(folder, exist_ok=True)
        return posixpath.join(folder, f".{name}{'.' + writer if writer else ''}{TMP_SUFFIX}")

    def write(self, key: str, data: bytes) -> None:
        self.commit(self.stage(key, data), key)

    def stage(self, key: str, data: bytes, writer: str = "") -> str:
        """Write `data` beside `key` under a temporary name (`writer`'s own, when several may write it); the
        blob appears only with `commit`, which is quick: a rename."""
        tmp = self._tmp(key, writer)
        self.fs.pipe_file(tmp, data)
        return tmp

    def commit(self, staged: str, key: str) -> None:
        self.fs.mv(staged, self.path(key))

    def discard(self, staged: str) -> None:
        """Remove what `stage` wrote and was never committed."""
        if self.fs.exists(staged):
            self.fs.rm_file(staged)

    def write_from(self, key: str, source: BinaryIO) -> int:
        """Copy a file object into the blob, a chunk at a time; the bytes copied."""
        with self.writer(key) as sink:
            shutil.copyfileobj(source, sink, CHUNK)
            return sink.tell()

    @contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        """A file to write the blob through: it appears when the block ends, and not at all if it raises."""
        tmp = self._tmp(key)
        try:
            with self.fs.open(tmp, "wb") as sink:
                yield sink
            self.fs.mv(tmp, self.path(key))
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
            raise

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def reader(self, key: str) -> BinaryIO:
        """The blob as a file to read a chunk at a time (FileNotFoundError if there is none)."""
        return self.fs.open(self.path(key), "rb")

    def local_path(self, key: str) -> str | None:
        """The blob's path on this machine's disk, when the store is a local folder (else None)."""
        from fsspec.implementations.local import LocalFileSystem

        return self.path(key) if isinstance(self.fs, LocalFileSystem) else None

    def delete(self, key: str) -> None:
        if self.fs.exists(self.path(key)):
            self.fs.rm(self.path(key), recursive=True)

    def keys(self, prefix: str = "") -> list[str]:
        """Every blob under `prefix`, temporary ones included, relative to the store."""
        base = self.path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.relpath(path, self.root) for path in self.fs.find(base))

    def sweep(self, prefix: str, older_than_s: float | Callable[[str], float], keep: Collection[str] = ()) -> int:
        """Delete the blobs under `prefix` last written more than `older_than_s` ago (or the age that
        function gives for a blob's key), except the keys in `keep`; how many went."""
        now, gone = time.time(), 0
        base = self.path(prefix)
        if not self.fs.exists(base):
            return 0
        for path, info in self.fs.find(base, detail=True).items():
            key = posixpath.relpath(path, self.root)
            age = older_than_s(key) if callable(older_than_s) else older_than_s
            if _modified(info) < now - age and key not in keep:
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
    """Signed, expiring links: `?expires=UNIX&signature=HEX` over the path and expiry time. The secret may
    be given as a function, called on first use (it may come from a database that is down right now)."""

    def __init__(self, secret: bytes | Callable[[], bytes], ttl_s: float):
        self._secret, self.ttl_s = secret, ttl_s

    @property
    def secret(self) -> bytes:
        if callable(self._secret):
            self._secret = self._secret()
        return self._secret

    def _digest(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, now: float | None = None, ttl_s: float | None = None) -> str:
        """`path` (e.g. /v1/images/files/NAME) with its query string, valid for `ttl_s` (default: the
        signer's) from now."""
        expires = int((time.time() if now is None else now) + (self.ttl_s if ttl_s is None else ttl_s))
        return f"{path}?expires={expires}&signature={self._digest(path, expires)}"

    def check(self, path: str, expires: str | None, signature: str | None) -> str | None:
        """None when the link is good; otherwise why not."""
        if expires is None or signature is None:
            return "not signed"
        if len(signature) != 64 or not all(c in "0123456789abcdef" for c in signature):
            return "bad signature"
        try:
            when = int(expires)
        except ValueError:
            return "bad expiry time"
        if not hmac.compare_digest(self._digest(path, when), signature):
            return "bad signature"
        if when < time.time():
            return "expired"
        return None
