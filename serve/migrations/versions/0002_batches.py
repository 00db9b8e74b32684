"""OpenAI's Batch API: uploaded and produced files, batches, one row per input line; and the
application's own settings (the URL-signing secret).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "app_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "batch_files",
        sa.Column("id", sa.String(48), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("blob", sa.String(255), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(48), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(48), nullable=False),
        sa.Column("completion_window", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("metadata", sa.JSON),
        sa.Column("errors", sa.JSON),
        sa.Column("output_file_id", sa.String(48)),
        sa.Column("error_file_id", sa.String(48)),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        *(
            sa.Column(f"{event}_at", _TIME)
            for event in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        ),  # fmt: skip
    )
    op.create_table(
        "batch_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("batch_id", sa.String(48), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("lease_owner", sa.String(48)),
        sa.Column("lease_until", _TIME),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.UniqueConstraint("batch_id", "line"),
        sa.UniqueConstraint("batch_id", "custom_id"),
    )
    op.create_index("ix_batch_items_batch_state", "batch_items", ["batch_id", "state"])
    op.create_index("ix_batch_items_state_lease", "batch_items", ["state", "lease_until"])


def downgrade() -> None:
    op.drop_table("batch_items")
    op.drop_table("batches")
    op.drop_table("batch_files")
    op.drop_table("app_settings")
