"""Who a bearer key belongs to, in an ingress replica: the database's active keys, re-read every
`tenancy.refresh_s` (so a new, changed or revoked key takes effect within seconds, without a restart),
plus the config's `auth.api_key_sha256` keys, which belong to the `default` tenant.

With no key anywhere (neither in the config nor in the database) and `auth.require_key` off, the
service is open, as it is on loopback out of the box: every request is the `default` tenant's. Once
one key exists, every request needs one.

The database may be down. A replica starts anyway and reads the keys as soon as it can; until it has
read them once, the config's keys still work and any other key is answered `KeysUnavailable` (503 with
Retry-After: the key may be good), never a 401, and never the open service. Once read, the keys are
kept while the database is away.
"""

from __future__ import annotations

import asyncio
import logging

from serve.config import ServeConfig, hash_key
from serve.database import Database
from serve.tenancy.store import DEFAULT, Tenant, TenantStore
from serve.workers import DATABASE, run_on

log = logging.getLogger(__name__)

DEFAULT_TENANT = Tenant(DEFAULT, id=DEFAULT)


class KeysUnavailable(Exception):
    """The key cannot be checked yet: the tenants' database has not been reached since this replica started."""


class KeyDirectory:
    def __init__(self, config: ServeConfig, database: Database | None = None):
        self.store = TenantStore(database or config.tenancy.database)
        self.refresh_s = config.tenancy.refresh_s
        self.auth = config.auth  # the config's own keys: the default tenant's
        self.keys: dict[str, Tenant] | None = None  # None until the database was read once
        self._reloader: asyncio.Task | None = None
        try:
            self.keys = self.store.active_keys()
        except Exception as err:  # noqa: BLE001 - start without them; the reloader keeps trying
            log.warning("tenancy: could not read the keys at start (%s); serving the config's keys meanwhile", err)

    @property
    def open(self) -> bool:
        return not (self.auth.require_key or self.auth.api_key_sha256 or self.keys)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The key's tenant; None for a missing, unknown or revoked key (the default tenant when open)."""
        self.start()
        if self.auth.accepts(token):
            return DEFAULT_TENANT
        if self.keys is None:
            if not (token or self.auth.require_key or self.auth.api_key_sha256):
                raise KeysUnavailable("the tenants' database has not been reached yet: whether a key is needed is "
                                      "unknown")  # fmt: skip
            if token:
                raise KeysUnavailable("the tenants' database has not been reached yet: this key cannot be checked")
            return None
        if self.open:
            return DEFAULT_TENANT
        return self.keys.get(hash_key(token)) if token else None

    def start(self) -> None:
        """Read the keys now and every `refresh_s` (from the first request, in the replica's event loop)."""
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            try:
                self.keys = await run_on(DATABASE, self.store.active_keys)
            except Exception as err:  # noqa: BLE001 - keep serving with the keys last read
                log.warning("tenancy: could not read the keys (%s); %s", err,
                            "keeping the last ones read" if self.keys is not None else "trying again")  # fmt: skip
            await asyncio.sleep(self.refresh_s)
