"""The application's SQL database (tenants and keys, batch files, batches and their items, shared
secrets such as the URL-signing key): one SQLAlchemy engine per URL, an SQLite file by default or
PostgreSQL, and its schema kept by Alembic (`serve/migrations`), upgraded to the newest revision the
first time a process uses it (`Database`), not when the process starts: an ingress must start, and serve
images with the keys it can check, while the database is down.

Reads and writes are different transactions (`Sessions`). On SQLite a write takes the write lock when it
starts (`BEGIN IMMEDIATE`), so two processes never both read a row as free and then both claim it:
SQLite's equivalent of PostgreSQL's `SELECT ... FOR UPDATE SKIP LOCKED`, which the batch runner uses
there. A read is a plain deferred transaction, which in WAL mode neither waits for a writer nor blocks
one. Migrations run in one transaction under that lock (SQLite) or an advisory lock (PostgreSQL), so
replicas starting together upgrade the schema once.

Nothing waits on the database for long: PostgreSQL connections time out after 5 s, a lock wait after
10 s and a statement after 30 s, SQLite's busy wait after 15 s, and a pooled connection is awaited 10 s.
Past those the caller gets one of the `UNAVAILABLE` errors, which the HTTP API answers with 503 and
Retry-After."""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, Engine, String, Text, TypeDecorator, create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

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


WRITE = "ifserve_write"  # execution option of a write transaction's connection (BEGIN IMMEDIATE on SQLite)
# Errors that say the database is away, locked or too slow, not that the request was wrong.
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)


def create_database_engine(url: str) -> Engine:
    """An engine for `url` (nothing is connected yet), with the timeouts and SQLite settings above."""
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if sqlite:
        options = {"connect_args": {"timeout": 15}}
    else:
        timeouts = "-c lock_timeout=10000 -c statement_timeout=30000"
        options = {"connect_args": {"connect_timeout": 5, "options": timeouts}, "pool_timeout": 10}
    engine = create_engine(parsed, pool_pre_ping=True, **options)
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
            write = connection.get_execution_options().get(WRITE, False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def open_database(url: str) -> Engine:
    """An engine for `url` with the schema at the newest revision (now: the database must be up)."""
    engine = create_database_engine(url)
    migrate(engine)
    return engine


class Sessions:
    """`sessions()` is a read (a deferred transaction: on SQLite it neither waits for a writer nor
    blocks one); `sessions.begin()` a write, committed at the end of its block."""

    def __init__(self, database: Database):
        self.database = database
        self._read: sessionmaker | None = None
        self._write: sessionmaker | None = None

    def _makers(self) -> tuple[sessionmaker, sessionmaker]:
        if self._read is None or self._write is None:
            engine = self.database.ready()
            self._write = sessionmaker(engine.execution_options(**{WRITE: True}), expire_on_commit=False)
            self._read = sessionmaker(engine, expire_on_commit=False)
        return self._read, self._write

    def __call__(self) -> Session:
        return self._makers()[0]()

    def begin(self):
        return self._makers()[1].begin()


class Database:
    """The application database of one URL in this process: its engine, made at once, and its schema,
    brought to the newest revision on first use (and tried again on the next use if that failed)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = create_database_engine(url)
        self.sessions = Sessions(self)
        self._migrated = False
        self._lock = threading.Lock()

    @property
    def sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def ready(self) -> Engine:
        """The engine, its schema migrated (raises the database's error when it cannot be reached)."""
        if not self._migrated:
            with self._lock:
                if not self._migrated:
                    migrate(self.engine)
                    self._migrated = True
        return self.engine

    def close(self) -> None:
        self.engine.dispose()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision` (Alembic), under a lock so that concurrent openers do it once."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.execution_options(**{WRITE: True}).begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SET LOCAL statement_timeout = 0"))  # a migration may rewrite large tables
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


class SettingRow(Base):
    __tablename__ = "app_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def shared_secret(database: Database, name: str) -> bytes:
    """A secret every process of the application reads alike: made once, kept in the database."""
    query = select(SettingRow.value).where(SettingRow.name == name)
    with database.sessions() as session:
        value = session.scalar(query)
    if value is None:
        try:
            with database.sessions.begin() as session:
                session.add(SettingRow(name=name, value=secrets.token_hex(32)))
        except IntegrityError:  # another process made it first
            pass
        with database.sessions() as session:
            value = session.scalar(query)
    return bytes.fromhex(value)
