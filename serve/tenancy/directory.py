"""Who a bearer key belongs to, in an ingress replica: the database's active keys, re-read every
`tenancy.refresh_s` (so a new, changed or revoked key takes effect within seconds, without a restart),
plus the config's `auth.api_key_sha256` keys, which belong to the `default` tenant.

With no key anywhere (neither in the config nor in the database) and `auth.require_key` off, the
service is open, as it is on loopback out of the box: every request is the `default` tenant's. Once
one key exists, every request needs one.
"""

from __future__ import annotations

import asyncio
import logging

from serve.config import ServeConfig, hash_key
from serve.tenancy.store import Tenant, TenantStore

log = logging.getLogger(__name__)

DEFAULT_TENANT = Tenant("default")


class KeyDirectory:
    def __init__(self, config: ServeConfig):
        self.store = TenantStore(config.tenancy.database)
        self.refresh_s = config.tenancy.refresh_s
        self.auth = config.auth  # the config's own keys: the default tenant's
        self.keys: dict[str, Tenant] = self.store.active_keys()  # an unreachable database fails the replica now
        self._reloader: asyncio.Task | None = None

    @property
    def open(self) -> bool:
        return not (self.auth.require_key or self.auth.api_key_sha256 or self.keys)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The key's tenant; None for a missing, unknown or revoked key (the default tenant when open)."""
        self._ensure_reloading()
        if self.open:
            return DEFAULT_TENANT
        if not token:
            return None
        digest = hash_key(token)
        found = self.keys.get(digest)
        if found is not None:
            return found
        return DEFAULT_TENANT if self.auth.accepts(token) else None

    def _ensure_reloading(self) -> None:
        # Started from the first request, inside the replica's event loop.
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                self.keys = await asyncio.to_thread(self.store.active_keys)
            except Exception as err:  # noqa: BLE001 - keep serving with the keys last read
                log.warning("tenancy: could not reload the keys (%s); keeping the last ones read", err)
