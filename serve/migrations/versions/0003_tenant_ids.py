"""Tenants get a stable id that is never reused (`tenants.uid`, "tenant_" + 24 hex digits), and the
Batch API's rows name their tenant by it instead of by its name; batch output files get an expiry.

Rows of the config's keys' tenant keep "default", which is its id. A database tenant that was called
"default" keeps its name but gets an id of its own: what it made before now belongs to the config's
keys, as it always did in effect (the two shared the name).

Revision ID: 0003
Revises: 0002
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

_TIME = sa.DateTime(timezone=True)
_OWNED = ("batch_files", "batches", "batch_items")  # their `tenant` column now holds the tenant's id


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("uid", sa.String(40), nullable=True))
    tenants = sa.table("tenants", sa.column("id"), sa.column("name"), sa.column("uid"))
    for row_id, name in bind.execute(sa.select(tenants.c.id, tenants.c.name)).all():
        uid = "tenant_" + secrets.token_hex(12)
        bind.execute(tenants.update().where(tenants.c.id == row_id).values(uid=uid))
        if name == "default":
            continue
        for table in _OWNED:
            owned = sa.table(table, sa.column("tenant"))
            bind.execute(owned.update().where(owned.c.tenant == name).values(tenant=uid))
    with op.batch_alter_table("tenants") as batch:
        batch.alter_column("uid", existing_type=sa.String(40), nullable=False)
        batch.create_unique_constraint("uq_tenants_uid", ["uid"])
    with op.batch_alter_table("batch_files") as batch:
        batch.add_column(sa.Column("expires_at", _TIME))


def downgrade() -> None:
    bind = op.get_bind()
    tenants = sa.table("tenants", sa.column("name"), sa.column("uid"))
    for name, uid in bind.execute(sa.select(tenants.c.name, tenants.c.uid)).all():
        for table in _OWNED:
            owned = sa.table(table, sa.column("tenant"))
            bind.execute(owned.update().where(owned.c.tenant == uid).values(tenant=name))
    with op.batch_alter_table("batch_files") as batch:
        batch.drop_column("expires_at")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_constraint("uq_tenants_uid", type_="unique")
        batch.drop_column("uid")
