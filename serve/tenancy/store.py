"""The tenants-and-keys database: tenants (priority, weight, rate and concurrency limits) and their API
keys, of which only the SHA-256 is stored. SQLAlchemy 2.x over any URL it takes: an SQLite file by
default, PostgreSQL when several machines share it. Each operation is one transaction, so a failed
call leaves nothing half-written; every ingress replica re-reads `active_keys()` every few seconds,
which is how a new, changed or revoked key takes effect without a restart."""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship, sessionmaker

from serve.config import hash_key
from serve.database import Base, UtcDateTime, open_database
from stages.errors import InvalidParameter
from stages.fair_share import PRIORITIES  # in order of precedence

LIMITS = ("rpm", "ipm", "max_concurrent")
SETTINGS = ("priority", "weight", *LIMITS)  # what update_tenant may change
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
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
        return Tenant(self.name, self.priority, self.weight, self.rpm, self.ipm, self.max_concurrent)


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
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidParameter(field, f"must be a whole number >= 0, or None for no limit; got {value!r}")
        return value
    raise InvalidParameter(field, f"not a tenant setting; one of {', '.join(SETTINGS)}")


class TenantStore:
    def __init__(self, url: str):
        self.engine = open_database(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

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

    def delete_tenant(self, name: str) -> None:
        """Delete the tenant and all of its keys."""
        with self._session.begin() as session:
            session.delete(self._tenant_row(session, name))

    def tenants(self) -> list[Tenant]:
        with self._session() as session:
            return [row.tenant() for row in session.scalars(select(TenantRow).order_by(TenantRow.name))]

    def tenant(self, name: str) -> Tenant:
        with self._session() as session:
            return self._tenant_row(session, name).tenant()

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
