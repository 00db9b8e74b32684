"""`ifserve tenants | keys`: manage the tenants and their API keys in the config's tenancy.database
(serve/cli.py registers them). A new key is printed once, as the last line; only its SHA-256 is stored."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from stages.errors import InvalidParameter
from stages.fair_share import PRIORITIES

# SQLAlchemy and the store are imported by the commands that use them, not when `ifserve` builds its
# parser: `ifserve profile`, `generate` and `checkpoints` run without the serving stack.
if TYPE_CHECKING:
    from serve.tenancy.store import KeyInfo, Tenant, TenantStore


def _limit(text: str) -> int | None:
    """A limit flag: a whole number, or `none` for no limit (how `tenants update` lifts one)."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number or 'none', got {text!r}") from None


def _database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("deploy/local.yaml"), help="serving config (YAML)")
    parser.add_argument("--database", help="override tenancy.database (an SQLAlchemy URL)")


def _tenant_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    # Without defaults (update) a flag left out is absent from the namespace: only the given settings change.
    # The priority is checked by the store, so a bad one is the same one-line error as any other.
    given = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("name", help="tenant name: 1-64 letters, digits, '.', '_' or '-'")
    parser.add_argument(
        "--priority",
        metavar="{" + ",".join(PRIORITIES) + "}",
        help="interactive requests go before batch ones" + (" (default interactive)" if defaults else ""),
        **given,
    )
    parser.add_argument("--weight", type=float, help="share against tenants of the same priority", **given)
    parser.add_argument("--rpm", type=_limit, help="requests per minute (none: unlimited)", **given)
    parser.add_argument("--ipm", type=_limit, help="images per minute (none: unlimited)", **given)
    parser.add_argument("--max-concurrent", type=_limit, help="requests in flight at once (none: unlimited)", **given)
    _database_flags(parser)


def add_parsers(sub) -> None:
    tenants = sub.add_parser("tenants", help="create, list, update and delete tenants")
    actions = tenants.add_subparsers(dest="action", required=True)
    _tenant_flags(actions.add_parser("create", help="add a tenant"), defaults=True)
    _database_flags(actions.add_parser("list", help="the tenants, their settings and active keys"))
    _tenant_flags(actions.add_parser("update", help="change only the given settings of a tenant"), defaults=False)
    delete = actions.add_parser("delete", help="delete a tenant, its keys, batches and files")
    delete.add_argument("name")
    _database_flags(delete)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new key for a tenant, printed once (last line)")
    create.add_argument("--tenant", required=True)
    _database_flags(create)
    listing = actions.add_parser("list", help="the keys (revoked ones too), without their secrets")
    listing.add_argument("--tenant", help="only this tenant's")
    _database_flags(listing)
    revoke = actions.add_parser("revoke", help="revoke a key by its id (key_...)")
    revoke.add_argument("key_id")
    _database_flags(revoke)


def _store(args) -> TenantStore:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from serve.config import load_config
    from serve.tenancy.store import TenantStore

    config = load_config(args.config, **{"tenancy.database": args.database})
    try:
        store = TenantStore(config.tenancy.database)
        store.database.ready()  # reached and migrated now, so a bad URL is this one line
        return store
    except SQLAlchemyError as err:  # unreachable server, missing driver, unwritable file: one line, no password
        where = make_url(config.tenancy.database).render_as_string(hide_password=True)
        cause = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise InvalidParameter("tenancy.database", f"cannot open {where}: {cause}") from None


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def _unlimited(value: int | None) -> str:
    return "-" if value is None else str(value)


def _describe(tenant: Tenant) -> str:
    limits = ", ".join(f"{f} {_unlimited(getattr(tenant, f))}" for f in ("rpm", "ipm", "max_concurrent"))
    return f"{tenant.name} ({tenant.priority}, weight {tenant.weight:g}, {limits})"


def _when(moment) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def tenants(args) -> int:
    store = _store(args)
    try:
        settings = {f: getattr(args, f) for f in ("priority", "weight", "rpm", "ipm", "max_concurrent") if f in args}
        if args.action == "create":
            settings = {f: v for f, v in settings.items() if v is not None}  # left out: the store's defaults
            print(f"created tenant {_describe(store.create_tenant(args.name, **settings))}")
        elif args.action == "update":
            print(f"updated tenant {_describe(store.update_tenant(args.name, **settings))}")
        elif args.action == "delete":
            gone = store.delete_tenant(args.name)
            print(f"deleted tenant {args.name} ({gone.id}) and its keys; the batch runner ends its batches and "
                  "deletes its files within seconds, its `url` images go when their links expire")  # fmt: skip
        else:
            active: dict[str, int] = {}
            for key in store.keys():
                active[key.tenant] = active.get(key.tenant, 0) + (key.revoked_at is None)
            header = ["name", "priority", "weight", "rpm", "ipm", "max-concurrent", "active keys"]
            rows = [
                [t.name, t.priority, f"{t.weight:g}", *(_unlimited(v) for v in (t.rpm, t.ipm, t.max_concurrent))]
                + [str(active.get(t.name, 0))]
                for t in store.tenants()
            ]
            print(_table(header, rows) if rows else "no tenants")
        return 0
    finally:
        store.close()


def keys(args) -> int:
    store = _store(args)
    try:
        if args.action == "create":
            info, secret = store.create_key(args.tenant)
            print(f"created {info.id} for tenant {info.tenant} (prefix {info.prefix})")
            print("the key is shown once, now: keep it; only its SHA-256 is stored")
            print(secret)  # the last line, for scripts: `ifserve keys create ... | tail -1`
        elif args.action == "revoke":
            info = store.revoke_key(args.key_id)
            print(f"revoked {info.id} of tenant {info.tenant} at {_when(info.revoked_at)}")
        else:
            found: list[KeyInfo] = store.keys(args.tenant)
            header = ["id", "tenant", "prefix", "created", "revoked"]
            rows = [[k.id, k.tenant, k.prefix, _when(k.created_at), _when(k.revoked_at)] for k in found]
            print(_table(header, rows) if rows else "no keys")
        return 0
    finally:
        store.close()
