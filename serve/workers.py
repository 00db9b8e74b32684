"""The thread pools of an ingress or batch-runner process, one per kind of blocking work, so that one kind
stalling never holds up another: a locked or unreachable database fills `DATABASE`'s threads and nothing
else, a flood of `/readyz` waits on `CONTROL`'s one thread, and image responses (PNG encoding in
`PICTURES`, `url` images written through `STORE`) keep moving whatever the database does. (asyncio's
default executor, which `asyncio.to_thread` uses, would share a few threads among all of them.)

The kinds are names, and each process makes its pools when it first uses them: Ray pickles the
deployment classes that use them, and a pool cannot be pickled."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

DATABASE = "database"  # SQL: keys, files, batches
STORE = "store"  # the blob store: uploads, downloads, `url` images
PICTURES = "pictures"  # PNG encoding, uploaded pictures' decoding
CONTROL = "control"  # Ray Serve's controller (serve.status)
_THREADS = {DATABASE: 8, STORE: 8, PICTURES: max(2, os.cpu_count() or 2), CONTROL: 1}


@functools.cache
def pool(kind: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS[kind], thread_name_prefix=f"ifserve-{kind}")


async def run_on(kind: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(*args, **kwargs)` on one of the `kind` pool's threads."""
    return await asyncio.get_running_loop().run_in_executor(pool(kind), functools.partial(function, *args, **kwargs))
