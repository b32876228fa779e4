"""drop the never-read cancel_requested column (a cancelled run's status says it all)

Revision ID: 0002_drop_cancel_requested
Revises: 0001_initial
Create Date: 2026-12-01 22:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_drop_cancel_requested"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tidebase_runs", schema=None) as batch_op:
        batch_op.drop_column("cancel_requested")


def downgrade() -> None:
    with op.batch_alter_table("tidebase_runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "cancel_requested", sa.Boolean(), server_default=sa.text("(false)"), nullable=False
            )
        )
