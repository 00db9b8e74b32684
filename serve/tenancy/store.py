"""The tenants-and-keys database: tenants (priority, weight, rate and concurrency limits) and their API
keys, of which only the SHA-256 is stored. A tenant is known everywhere else (files, batches, images,
limits) by its `id`, made when it is created and never reused: a tenant deleted and made again under the
same name starts with nothing of the old one's. The name `default` belongs to the config's own keys.
SQLAlchemy 2.x over any URL it takes: an SQLite file by default, PostgreSQL when several machines share
it. Each operation is one transaction, so a failed call leaves nothing half-written; every ingress replica
re-reads `active_keys()` every few seconds, which is how a new, changed or revoked key takes effect
without a restart."""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from serve.config import hash_key
from serve.database import Base, Database, UtcDateTime
from stages.errors import InvalidParameter
from stages.fair_share import PRIORITIES  # in order of precedence

LIMITS = ("rpm", "ipm", "max_concurrent")
SETTINGS = ("priority", "weight", *LIMITS)  # what update_tenant may change
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT = "default"  # the config's keys' tenant: its id and name, never a database tenant's
KEY_PREFIX = "ifs-"
PREFIX_CHARS = 8  # of the secret kept in the clear, to recognise a key in a list


@dataclass(frozen=True)
class Tenant:
    name: str
    priority: str = "interactive"
    weight: float = 1.0  # share of the capacity against other tenants of the same priority
    rpm: int | None = None  # requests per minute; None: unlimited
    ipm: int | None = None  # images per minute
    max_concurrent: int | None = None  # requests in flight at once
    # Stable and never reused ("tenant_" + 24 hex digits; "default" for the config's keys): what files,
    # batches, images and limits are keyed by.
    id: str = field(kw_only=True)


@dataclass(frozen=True)
class KeyInfo:
    id: str  # public id, "key_" + 12 hex chars: what lists show and revoke takes
    tenant: str
    prefix: str  # the secret's first characters
    created_at: datetime
    revoked_at: datetime | None


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(40), unique=True)  # Tenant.id
    name: Mapped[str] = mapped_column(String(64), unique=True)
    priority: Mapped[str] = mapped_column(String(16))
    weight: Mapped[float] = mapped_column(Float)
    rpm: Mapped[int | None]
    ipm: Mapped[int | None]
    max_concurrent: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The ORM deletes a tenant's keys with it; the foreign key's ON DELETE CASCADE does so for a delete
    # that bypasses the ORM.
    keys: Mapped[list[KeyRow]] = relationship(back_populates="tenant", cascade="all, delete-orphan")

    def tenant(self) -> Tenant:
        return Tenant(self.name, self.priority, self.weight, self.rpm, self.ipm, self.max_concurrent, id=self.uid)


class KeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    tenant: Mapped[TenantRow] = relationship(back_populates="keys")

    def info(self) -> KeyInfo:
        return KeyInfo(self.id, self.tenant.name, self.prefix, self.created_at, self.revoked_at)


def _checked(field: str, value: Any) -> Any:
    """A tenant setting, validated; the error names the field."""
    if field == "name":
        if not isinstance(value, str) or not NAME.match(value):
            raise InvalidParameter("name", f"{value!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if value == DEFAULT:
            raise InvalidParameter("name", f"{DEFAULT!r} is the config's keys' tenant (auth.api_key_sha256); "
                                   "choose another")  # fmt: skip
        return value
    if field == "priority":
        if value not in PRIORITIES:
            raise InvalidParameter("priority", f"unknown priority {value!r}; one of {', '.join(PRIORITIES)}")
        return value
    if field == "weight":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise InvalidParameter("weight", f"must be a number > 0, got {value!r}")
        return float(value)
    if field in LIMITS:
        # 0 would refuse every request for ever: a tenant to shut out is deleted, or its keys revoked.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidParameter(field, f"must be a whole number >= 1, or None for no limit; got {value!r}")
        return value
    raise InvalidParameter(field, f"not a tenant setting; one of {', '.join(SETTINGS)}")


class TenantStore:
    def __init__(self, database: str | Database):
        self.database = database if isinstance(database, Database) else Database(database)
        self._session = self.database.sessions

    @property
    def engine(self):
        return self.database.engine

    def close(self) -> None:
        self.database.close()

    def __enter__(self) -> TenantStore:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # Tenants

    def create_tenant(
        self,
        name: str,
        *,
        priority: str = "interactive",
        weight: float = 1.0,
        rpm: int | None = None,
        ipm: int | None = None,
        max_concurrent: int | None = None,
    ) -> Tenant:
        settings = dict(priority=priority, weight=weight, rpm=rpm, ipm=ipm, max_concurrent=max_concurrent)
        row = TenantRow(
            uid="tenant_" + secrets.token_hex(12),
            name=_checked("name", name),
            created_at=datetime.now(UTC),
            **{field: _checked(field, value) for field, value in settings.items()},
        )
        try:
            with self._session.begin() as session:
                if session.scalar(select(TenantRow.id).where(TenantRow.name == name)) is not None:
                    raise InvalidParameter("name", f"tenant {name!r} already exists")
                session.add(row)
        except IntegrityError:  # created by another process since the check above
            raise InvalidParameter("name", f"tenant {name!r} already exists") from None
        return row.tenant()

    def update_tenant(self, name: str, **fields: Any) -> Tenant:
        """Change only the given settings (`rpm=None` lifts that limit)."""
        checked = {field: _checked(field, value) for field, value in fields.items()}
        with self._session.begin() as session:
            row = self._tenant_row(session, name)
            for field, value in checked.items():
                setattr(row, field, value)
            return row.tenant()

    def delete_tenant(self, name: str) -> Tenant:
        """Delete the tenant and all of its keys. Its files, batches and images go too: the batch runner
        ends and deletes those of every tenant that no longer exists (BatchStore.purge_gone_tenants)."""
        with self._session.begin() as session:
            row = self._tenant_row(session, name)
            tenant = row.tenant()
            session.delete(row)
        return tenant

    def tenants(self) -> list[Tenant]:
        with self._session() as session:
            return [row.tenant() for row in session.scalars(select(TenantRow).order_by(TenantRow.name))]

    def tenant(self, name: str) -> Tenant:
        with self._session() as session:
            return self._tenant_row(session, name).tenant()

    def by_id(self, tenant_id: str) -> Tenant | None:
        """The tenant with this id; None once it is deleted."""
        with self._session() as session:
            row = session.scalar(select(TenantRow).where(TenantRow.uid == tenant_id))
            return None if row is None else row.tenant()

    # Keys

    def create_key(self, tenant: str) -> tuple[KeyInfo, str]:
        """A new key for the tenant: its info and the secret, which is returned here once and never stored."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._session.begin() as session:
            row = KeyRow(
                id="key_" + secrets.token_hex(6),
                tenant=self._tenant_row(session, tenant),
                sha256=hash_key(secret),
                prefix=secret[:PREFIX_CHARS],
                created_at=datetime.now(UTC),
                revoked_at=None,
            )
            session.add(row)
            return row.info(), secret

    def keys(self, tenant: str | None = None) -> list[KeyInfo]:
        """Every key (revoked ones too), oldest first; only the tenant's when named."""
        with self._session() as session:
            query = select(KeyRow, TenantRow).join(KeyRow.tenant).order_by(KeyRow.created_at, KeyRow.id)
            if tenant is not None:
                query = query.where(TenantRow.id == self._tenant_row(session, tenant).id)
            return [KeyInfo(k.id, t.name, k.prefix, k.created_at, k.revoked_at) for k, t in session.execute(query)]

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke a key from now on; revoking it again changes nothing."""
        with self._session.begin() as session:
            row = session.get(KeyRow, key_id)
            if row is None:
                raise InvalidParameter("key", f"no key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
            return row.info()

    def active_keys(self) -> dict[str, Tenant]:
        """SHA-256 hex of every key not revoked -> its tenant, in one query: what each ingress replica reloads."""
        query = select(KeyRow.sha256, TenantRow).join(KeyRow.tenant).where(KeyRow.revoked_at.is_(None))
        with self._session() as session:
            return {digest: row.tenant() for digest, row in session.execute(query)}

    @staticmethod
    def _tenant_row(session: Session, name: str) -> TenantRow:
        row = session.scalar(select(TenantRow).where(TenantRow.name == name))
        if row is None:
            raise InvalidParameter("tenant", f"no tenant {name!r}")
        return row
