"""The tenants-and-keys database on SQLite and on a real PostgreSQL (tests/postgres.py), and
`ifserve tenants | keys` as a user runs them."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text

from serve.config import hash_key
from serve.tenancy.store import Tenant, TenantStore
from stages.errors import InvalidParameter
from tests.cli import ifserve


@pytest.fixture
def store(database_url):
    with TenantStore(database_url) as store:
        yield store


def _rows(url: str, query: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


def test_tenants_create_list_update_delete(store):
    made = store.create_tenant("acme", priority="batch", weight=2, rpm=60, ipm=120, max_concurrent=4)
    assert made == Tenant("acme", "batch", 2.0, 60, 120, 4, id=made.id)
    beta = store.create_tenant("Beta.team_1-x")
    assert beta == Tenant("Beta.team_1-x", id=beta.id)  # unlimited, interactive, weight 1
    assert [t.name for t in store.tenants()] == ["Beta.team_1-x", "acme"]

    updated = store.update_tenant("acme", rpm=None, weight=0.5)  # only the given fields change; None: unlimited
    assert updated == Tenant("acme", "batch", 0.5, None, 120, 4, id=made.id)
    assert store.tenant("acme") == updated and store.by_id(made.id) == updated

    assert store.delete_tenant("acme") == updated
    assert store.tenants() == [beta] and store.by_id(made.id) is None
    with pytest.raises(InvalidParameter, match=r"^tenant: no tenant 'acme'$"):
        store.tenant("acme")


def test_key_is_returned_once_and_stored_hashed(store, database_url):
    store.create_tenant("acme", rpm=10)
    before = datetime.now(UTC)
    info, secret = store.create_key("acme")
    assert secret.startswith("ifs-") and len(secret) > 40
    assert info.id.startswith("key_") and len(info.id) == 16 and int(info.id[4:], 16) >= 0
    assert (info.tenant, info.prefix, info.revoked_at) == ("acme", secret[:8], None)
    assert info.created_at.tzinfo is not None and before <= info.created_at <= datetime.now(UTC)

    [(key_id, digest, prefix)] = _rows(database_url, "SELECT id, sha256, prefix FROM api_keys")
    assert (key_id, digest, prefix) == (info.id, hash_key(secret), secret[:8])
    everything = " ".join(str(cell) for row in _rows(database_url, "SELECT * FROM api_keys") for cell in row)
    assert secret not in everything and secret[8:] not in everything  # the secret itself is nowhere

    assert store.active_keys() == {hash_key(secret): store.tenant("acme")}
    assert store.active_keys()[hash_key(secret)].rpm == 10
    assert store.keys() == [info] and store.keys("acme") == [info]


def test_revoked_key_drops_out_of_active_keys(store):
    store.create_tenant("acme")
    store.create_tenant("other", priority="batch")
    kept, kept_secret = store.create_key("acme")
    gone, gone_secret = store.create_key("acme")
    _, other_secret = store.create_key("other")
    assert set(store.active_keys()) == {hash_key(s) for s in (kept_secret, gone_secret, other_secret)}

    revoked = store.revoke_key(gone.id)
    assert revoked.revoked_at is not None and revoked.revoked_at.tzinfo is not None
    assert store.revoke_key(gone.id) == revoked  # idempotent: the first revocation's time stays
    active = store.active_keys()
    assert set(active) == {hash_key(kept_secret), hash_key(other_secret)}
    assert active[hash_key(other_secret)].priority == "batch"
    assert [k.id for k in store.keys("acme")] == [kept.id, gone.id]  # listed still, as revoked
    assert [k.revoked_at is None for k in store.keys("acme")] == [True, False]


def test_deleting_a_tenant_deletes_its_keys(store, database_url):
    store.create_tenant("acme")
    store.create_tenant("other")
    store.create_key("acme")
    store.create_key("acme")
    _, other_secret = store.create_key("other")
    store.delete_tenant("acme")
    assert [k.tenant for k in store.keys()] == ["other"]
    assert _rows(database_url, "SELECT sha256 FROM api_keys") == [(hash_key(other_secret),)]
    assert list(store.active_keys()) == [hash_key(other_secret)]
    # The foreign key cascades too, for a delete that bypasses the store.
    store.create_key("other")
    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA foreign_keys=ON"))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM tenants WHERE name = 'other'"))
    engine.dispose()
    assert _rows(database_url, "SELECT COUNT(*) FROM api_keys") == [(0,)]


@pytest.mark.parametrize(
    "call, param, message",
    [
        (lambda s: s.create_tenant("has space"), "name", "letters, digits"),
        (lambda s: s.create_tenant(""), "name", "letters, digits"),
        (lambda s: s.create_tenant("x" * 65), "name", "letters, digits"),
        (lambda s: s.create_tenant("x", priority="urgent"), "priority", "interactive, batch"),
        (lambda s: s.create_tenant("x", weight=0), "weight", "> 0"),
        (lambda s: s.create_tenant("x", weight=-1.5), "weight", "> 0"),
        (lambda s: s.create_tenant("x", weight=float("nan")), "weight", "> 0"),
        (lambda s: s.create_tenant("default"), "name", "the config's keys' tenant"),
        (lambda s: s.create_tenant("x", rpm=-1), "rpm", ">= 1"),
        (lambda s: s.create_tenant("x", rpm=0), "rpm", ">= 1"),
        (lambda s: s.create_tenant("x", ipm=-5), "ipm", ">= 1"),
        (lambda s: s.create_tenant("x", ipm=0), "ipm", ">= 1"),
        (lambda s: s.create_tenant("x", max_concurrent=0), "max_concurrent", ">= 1"),
        (lambda s: s.create_tenant("x", rpm=1.5), "rpm", "whole number"),
        (lambda s: s.create_tenant("acme"), "name", "tenant 'acme' already exists"),
        (lambda s: s.update_tenant("acme", priority="later"), "priority", "unknown priority 'later'"),
        (lambda s: s.update_tenant("acme", ipm=-1), "ipm", ">= 1"),
        (lambda s: s.update_tenant("acme", rpm=0), "rpm", ">= 1"),
        (lambda s: s.update_tenant("acme", colour="red"), "colour", "not a tenant setting"),
        (lambda s: s.update_tenant("nobody", rpm=1), "tenant", "no tenant 'nobody'"),
        (lambda s: s.delete_tenant("nobody"), "tenant", "no tenant 'nobody'"),
        (lambda s: s.tenant("nobody"), "tenant", "no tenant 'nobody'"),
        (lambda s: s.create_key("nobody"), "tenant", "no tenant 'nobody'"),
        (lambda s: s.keys("nobody"), "tenant", "no tenant 'nobody'"),
        (lambda s: s.revoke_key("key_000000000000"), "key", "no key 'key_000000000000'"),
    ],
)
def test_errors_name_their_field_and_change_nothing(store, call, param, message):
    store.create_tenant("acme", rpm=5)
    store.create_key("acme")
    before = (store.tenants(), store.keys())
    with pytest.raises(InvalidParameter) as raised:
        call(store)
    assert raised.value.param == param
    assert message in raised.value.message and str(raised.value).startswith(f"{param}: ")
    assert (store.tenants(), store.keys()) == before


def test_a_second_store_sees_the_first_ones_changes(database_url):
    """How every ingress replica sees a change without a restart: it reloads from the same database."""
    with TenantStore(database_url) as writer, TenantStore(database_url) as reader:
        assert reader.active_keys() == {} and reader.tenants() == []
        writer.create_tenant("acme", rpm=10)
        info, secret = writer.create_key("acme")
        assert reader.active_keys() == {hash_key(secret): writer.tenant("acme")}
        writer.update_tenant("acme", priority="batch")
        assert reader.active_keys()[hash_key(secret)].priority == "batch"
        writer.revoke_key(info.id)
        assert reader.active_keys() == {}
        with pytest.raises(InvalidParameter, match="already exists"):
            reader.create_tenant("acme")


def test_sqlite_folder_is_made(tmp_path):
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'tenants.db'}"
    with TenantStore(url) as store:
        store.create_tenant("acme")
    assert (tmp_path / "a" / "b" / "tenants.db").is_file()


def test_cli(tmp_path):
    db = ["--database", f"sqlite:///{tmp_path / 'tenants.db'}"]
    done = ifserve("tenants", "create", "acme", "--priority", "batch", "--weight", "2", "--rpm", "30", *db)
    assert done.returncode == 0, done.stderr
    assert "acme" in done.stdout

    done = ifserve("keys", "create", "--tenant", "acme", *db)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    secret = lines[-1]
    assert secret.startswith("ifs-") and "shown once" in done.stdout
    with TenantStore(db[1]) as store:
        acme = store.tenant("acme")
        assert store.active_keys() == {hash_key(secret): Tenant("acme", "batch", 2.0, rpm=30, id=acme.id)}
        [info] = store.keys()

    done = ifserve("tenants", "list", *db)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.strip().splitlines()
    assert header.split() == ["name", "priority", "weight", "rpm", "ipm", "max-concurrent", "active", "keys"]
    assert row.split() == ["acme", "batch", "2", "30", "-", "-", "1"]

    done = ifserve("keys", "revoke", info.id, *db)
    assert done.returncode == 0, done.stderr
    assert info.id in done.stdout
    with TenantStore(db[1]) as store:
        assert store.active_keys() == {}

    done = ifserve("keys", "list", "--tenant", "acme", *db)
    assert done.returncode == 0, done.stderr
    [_, row] = done.stdout.strip().splitlines()
    assert row.split()[:3] == [info.id, "acme", info.prefix] and row.count(" UTC") == 2  # created and revoked


@pytest.mark.parametrize(
    "args, field",
    [
        (["tenants", "create", "acme", "--priority", "urgent"], "priority"),
        (["tenants", "create", "acme", "--rpm", "0"], "rpm"),
        (["keys", "create", "--tenant", "nobody"], "tenant"),
    ],
)
def test_cli_errors_are_one_line_naming_the_field(tmp_path, args, field):
    done = ifserve(*args, "--database", f"sqlite:///{tmp_path / 'tenants.db'}")
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = [line for line in done.stderr.splitlines() if not line.startswith("[transformers]")]
    assert "error: " in line and f" {field}: " in line and "Traceback" not in done.stderr


def test_a_tenant_made_again_under_its_name_gets_a_new_id(store):
    """Files, batches, images and limits are keyed by the id: the new tenant inherits nothing."""
    first = store.create_tenant("acme")
    store.delete_tenant("acme")
    second = store.create_tenant("acme")
    assert first.id != second.id and first.id.startswith("tenant_") and len(first.id) == len("tenant_") + 24
    assert [tenant.id for tenant in store.tenants()] == [second.id]


def test_migration_gives_existing_tenants_ids_and_their_rows_follow(database_url):
    """A database at revision 0002 (tenants named in the batch tables) upgraded to the newest: each tenant
    gets an id, and its files, batches and items name it by that id; the config's keys' rows keep
    `default`, which is its id."""
    from serve.database import create_database_engine, migrate

    engine = create_database_engine(database_url)
    migrate(engine, "0002")
    now = "2026-01-01 00:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(
            text(f"INSERT INTO tenants (name, priority, weight, created_at) VALUES ('acme', 'batch', 1, '{now}')")
        )
        for tenant, file_id in (("acme", "file-a"), ("default", "file-d")):
            conn.execute(
                text(
                    f"INSERT INTO batch_files (id, tenant, filename, purpose, bytes, blob, created_at) "
                    f"VALUES ('{file_id}', '{tenant}', 'in.jsonl', 'batch', 1, 'files/{file_id}', '{now}')"
                )
            )
        conn.execute(
            text(
                "INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window, status, "
                f"created_at, expires_at) VALUES ('batch_a', 'acme', '/v1/images/generations', 'file-a', "
                f"'24h', 'in_progress', '{now}', '{now}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO batch_items (batch_id, line, custom_id, tenant, body, state, attempts) VALUES "
                "('batch_a', 1, 'x', 'acme', '{}', 'queued', 0)"
            )
        )
    migrate(engine)
    engine.dispose()
    with TenantStore(database_url) as store:
        acme = store.tenant("acme")
    assert acme.id.startswith("tenant_")
    assert sorted(_rows(database_url, "SELECT id, tenant FROM batch_files")) == [
        ("file-a", acme.id),
        ("file-d", "default"),
    ]
    assert _rows(database_url, "SELECT tenant FROM batches") == [(acme.id,)]
    assert _rows(database_url, "SELECT tenant FROM batch_items") == [(acme.id,)]
