"""indexes for browsing runs newest first in keyset order, all of them or of one status

Revision ID: 0007_inspector_indexes
Revises: 0006_usage_lost
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from tidebase_agents._store.migrate import revision_schema

revision: str = "0007_inspector_indexes"
down_revision: str | None = "0006_usage_lost"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tidebase_runs", schema=revision_schema()) as batch_op:
        batch_op.create_index("ix_tidebase_runs_created", ["created_at", "run_id"], unique=False)
        batch_op.create_index(
            "ix_tidebase_runs_status_created", ["status", "created_at", "run_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("tidebase_runs", schema=revision_schema()) as batch_op:
        batch_op.drop_index("ix_tidebase_runs_status_created")
        batch_op.drop_index("ix_tidebase_runs_created")
