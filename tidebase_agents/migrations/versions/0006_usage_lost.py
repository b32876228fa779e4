"""usage records say whether the work they paid for was done again by a later attempt

Revision ID: 0006_usage_lost
Revises: 0003_own_schema
Create Date: 2026-12-01 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tidebase_agents._store.migrate import revision_schema

revision: str = "0006_usage_lost"
down_revision: str | None = "0003_own_schema"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tidebase_usage", schema=revision_schema()) as batch_op:
        batch_op.add_column(
            sa.Column("lost", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("tidebase_usage", schema=revision_schema()) as batch_op:
        batch_op.drop_column("lost")
