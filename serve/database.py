"""The application's SQL database (tenants and keys, batch files, batches and their items, shared
secrets such as the URL-signing key): one SQLAlchemy engine per URL, an SQLite file by default or
PostgreSQL, and its schema kept by Alembic (`serve/migrations`), upgraded to the newest revision
whenever a process opens it.

SQLite gets `BEGIN IMMEDIATE` for every transaction: a transaction takes the write lock when it starts,
so two processes never both read a row as free and then both claim it. That is SQLite's equivalent of
PostgreSQL's `SELECT ... FOR UPDATE SKIP LOCKED`, which the batch runner uses there. Migrations run in
one transaction under that lock (SQLite) or an advisory lock (PostgreSQL), so replicas starting together
upgrade the schema once."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, Engine, String, Text, TypeDecorator, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x1F5E_7E5E  # PostgreSQL advisory lock id held while the schema is upgraded


class Base(DeclarativeBase):
    pass


class UtcDateTime(TypeDecorator):
    """Timezone-aware UTC in and out: SQLite keeps no zone, so its naive values are read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def open_database(url: str) -> Engine:
    """An engine for `url` with the schema at the newest revision."""
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, pool_pre_ping=True, **({"connect_args": {"timeout": 60}} if sqlite else {}))
    if sqlite:

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event below starts transactions
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")  # per connection, or SQLite ignores foreign keys
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for a writer's commit
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    migrate(engine)
    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` (Alembic), under a lock so that concurrent openers do it once."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


class SettingRow(Base):
    __tablename__ = "app_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def shared_secret(engine: Engine, name: str) -> bytes:
    """A secret every process of the application reads alike: made once, kept in the database."""
    query = select(SettingRow.value).where(SettingRow.name == name)
    with Session(engine) as session:
        value = session.scalar(query)
    if value is None:
        try:
            with Session(engine) as session, session.begin():
                session.add(SettingRow(name=name, value=secrets.token_hex(32)))
        except IntegrityError:  # another process made it first
            pass
        with Session(engine) as session:
            value = session.scalar(query)
    return bytes.fromhex(value)
