"""Tenants and their API keys (serve/tenancy/store.py).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    # A database made before migrations existed already has these tables: it is adopted as it is.
    existing = sa.inspect(op.get_bind()).get_table_names()
    if "tenants" not in existing:
        op.create_table(
            "tenants",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(64), nullable=False, unique=True),
            sa.Column("priority", sa.String(16), nullable=False),
            sa.Column("weight", sa.Float, nullable=False),
            sa.Column("rpm", sa.Integer),
            sa.Column("ipm", sa.Integer),
            sa.Column("max_concurrent", sa.Integer),
            sa.Column("created_at", _TIME, nullable=False),
        )
    if "api_keys" not in existing:
        op.create_table(
            "api_keys",
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("prefix", sa.String(16), nullable=False),
            sa.Column("created_at", _TIME, nullable=False),
            sa.Column("revoked_at", _TIME),
        )
        op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
        op.create_index("ix_api_keys_sha256", "api_keys", ["sha256"], unique=True)


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("tenants")
