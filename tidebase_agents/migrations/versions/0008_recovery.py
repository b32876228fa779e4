"""who holds a running run, beyond its owner label: its process and its database session

Revision ID: 0008_recovery
Revises: 0007_inspector_indexes
Create Date: 2026-12-02 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tidebase_agents._store.migrate import revision_schema

revision: str = "0008_recovery"
down_revision: str | None = "0007_inspector_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tidebase_runs", schema=revision_schema()) as batch_op:
        batch_op.add_column(sa.Column("lease_process", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("lease_session", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tidebase_runs", schema=revision_schema()) as batch_op:
        batch_op.drop_column("lease_session")
        batch_op.drop_column("lease_process")
