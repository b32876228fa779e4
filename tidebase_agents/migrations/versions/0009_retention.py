"""retention: usage of pruned runs kept as daily rollups, ended runs found by when they ended;
claims walk an index in their own order

Revision ID: 0009_retention
Revises: 0008_recovery
Create Date: 2026-12-02 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tidebase_agents._store.migrate import revision_schema

revision: str = "0009_retention"
down_revision: str | None = "0008_recovery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SUMS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "records",
    "lost_tokens",
)


def upgrade() -> None:
    op.create_table(
        "tidebase_usage_daily",
        sa.Column("day", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("pipeline", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        *(sa.Column(c, sa.BigInteger(), server_default="0", nullable=False) for c in _SUMS),
        sa.Column("recorded_cost", sa.Float(), server_default="0", nullable=False),
        *(
            sa.Column(f"unpriced_{c}", sa.BigInteger(), server_default="0", nullable=False)
            for c in ("input", "output", "cached")
        ),
        sa.PrimaryKeyConstraint("day", "pipeline", "model", name=op.f("pk_tidebase_usage_daily")),
        schema=revision_schema(),
    )
    with op.batch_alter_table("tidebase_runs", schema=revision_schema()) as batch_op:
        batch_op.create_index(
            "ix_tidebase_runs_status_finished", ["status", "finished_at"], unique=False
        )
        # The claim index in the claim's order: a deep queue no longer sorts every run.
        batch_op.drop_index("ix_tidebase_runs_claim")
        batch_op.create_index(
            "ix_tidebase_runs_claim",
            ["queue", "status", sa.text("priority DESC"), "scheduled_at", "created_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("tidebase_runs", schema=revision_schema()) as batch_op:
        batch_op.drop_index("ix_tidebase_runs_claim")
        batch_op.create_index(
            "ix_tidebase_runs_claim", ["queue", "status", "priority", "scheduled_at"], unique=False
        )
        batch_op.drop_index("ix_tidebase_runs_status_finished")
    op.drop_table("tidebase_usage_daily", schema=revision_schema())
