"""A throwaway PostgreSQL server for the tests, from Debian's packages (`apt-get install postgresql`): initdb
into a temporary folder, listen on 127.0.0.1 only at a free port (its unix socket in that folder), trust
authentication, one database; stopped and deleted afterwards. initdb and postgres refuse to run as root, so
under root they run as the `postgres` user the package creates."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "postgres"  # the server's superuser (initdb -U), whoever runs it
DATABASE = "ifserve_test"


def server_binaries() -> Path | None:
    """The newest installed server's bin folder (/usr/lib/postgresql/<version>/bin)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()]
    numbers = lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)]  # noqa: E731
    return max(found, key=numbers, default=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A running throwaway server (`running_postgres`): its URL, and `stop()` / `start()` to take it away
    and bring it back on the same port with the same data (the tests of a database outage)."""

    def __init__(self, url: str, control):
        self.url, self._control = url, control

    def stop(self) -> None:
        self._control("stop", "-m", "fast", "-w")

    def start(self) -> None:
        self._control("start")


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a server with database `ifserve_test`; yield it, stop and delete it afterwards."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server in /usr/lib/postgresql/*/bin: install Debian's postgresql")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(
                "running as root and there is no `postgres` user to run PostgreSQL as: install Debian's postgresql"
            )
        as_user = ["runuser", "-u", "postgres", "--"]
    # Under /tmp itself, not pytest's tmp_path: the postgres user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="ifserve-postgres-"))
    data, log, port = root / "data", root / "server.log", _free_port()

    def server(*command: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*as_user, *command], cwd=root, capture_output=True, text=True, timeout=120)
        if done.returncode:
            logged = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}{logged}")
        return done

    # Durability off: the data is thrown away, and the tests run faster.
    options = f"-h 127.0.0.1 -p {port} -k {shlex.quote(str(root))} -c fsync=off -c synchronous_commit=off"

    def control(action: str, *flags: str) -> None:
        if action == "start":
            server(str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options)
        else:
            server(str(bin_dir / "pg_ctl"), action, "-D", str(data), *flags)

    try:
        if as_user:
            os.chown(root, account.pw_uid, account.pw_gid)
        root.chmod(0o700)
        server(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-locale",
               "--no-sync", "--no-instructions")  # fmt: skip
        control("start")
        try:
            subprocess.run(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE],
                check=True,
                capture_output=True,
                timeout=60,
            )
            yield PostgresServer(f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DATABASE}", control)
        finally:
            try:
                control("stop", "-m", "immediate", "-w")
            except RuntimeError:  # a test left it stopped
                pass
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield `postgresql+psycopg://postgres@127.0.0.1:PORT/ifserve_test`."""
    with running_postgres() as server:
        yield server.url


def fresh_database(url: str, name: str) -> str:
    """A new empty database on the server of `url`; its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    with psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database, autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return parsed.set(database=name).render_as_string(hide_password=False)


_databases = itertools.count()


def empty_database(request, folder) -> str:
    """An empty database's SQLAlchemy URL for a test parametrized by "sqlite" / "postgresql": an SQLite
    file in `folder`, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{folder / 'app.db'}"
    return fresh_database(request.getfixturevalue("postgres_url"), f"test_{next(_databases)}")
