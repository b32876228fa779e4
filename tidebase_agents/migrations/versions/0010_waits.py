"""runs that wait: tool calls waiting for approval and their decisions, messages sent to runs,
and the waiting status among the runs a dedupe key keeps unique

A waiting run's wake-up time is its ``scheduled_at`` (when a worker may resume it).

Revision ID: 0010_waits
Revises: 0009_retention
Create Date: 2026-12-02 01:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from tidebase_agents._store.migrate import revision_schema

revision: str = "0010_waits"
down_revision: str | None = "0009_retention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ACTIVE_BEFORE = (
    "dedupe_key IS NOT NULL AND status IN "
    "('queued', 'running', 'failed_retryable', 'manual_review')"
)
_ACTIVE = (
    "dedupe_key IS NOT NULL AND status IN "
    "('failed_retryable', 'manual_review', 'queued', 'running', 'waiting')"
)


def _dedupe_index(where: str) -> None:
    with op.batch_alter_table("tidebase_runs", schema=revision_schema()) as batch_op:
        batch_op.drop_index("uq_tidebase_runs_active_dedupe")
        batch_op.create_index(
            "uq_tidebase_runs_active_dedupe",
            ["queue", "dedupe_key"],
            unique=True,
            postgresql_where=sa.text(where),
            sqlite_where=sa.text(where),
        )


def _runs_column() -> str:
    schema = revision_schema()
    return f"{schema}.tidebase_runs.run_id" if schema else "tidebase_runs.run_id"


def upgrade() -> None:
    op.create_table(
        "tidebase_approvals",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("step", sa.String(length=1000), nullable=False),
        sa.Column("call_id", sa.String(length=255), nullable=False),
        sa.Column("agent", sa.String(length=255), nullable=False),
        sa.Column("tool", sa.String(length=255), nullable=False),
        sa.Column("arguments", sa.Text(), nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("always", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            [_runs_column()],
            name=op.f("fk_tidebase_approvals_run_id_tidebase_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tidebase_approvals")),
        sa.UniqueConstraint(
            "run_id", "step", "call_id", name="uq_tidebase_approvals_run_step_call"
        ),
        schema=revision_schema(),
    )
    with op.batch_alter_table("tidebase_approvals", schema=revision_schema()) as batch_op:
        batch_op.create_index("ix_tidebase_approvals_run_call", ["run_id", "call_id"])
    op.create_table(
        "tidebase_messages",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("payload", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("consumed_by", sa.String(length=1000), nullable=True),
        sa.Column("consumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            [_runs_column()],
            name=op.f("fk_tidebase_messages_run_id_tidebase_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tidebase_messages")),
        schema=revision_schema(),
    )
    with op.batch_alter_table("tidebase_messages", schema=revision_schema()) as batch_op:
        batch_op.create_index("ix_tidebase_messages_run_topic", ["run_id", "topic", "id"])
    _dedupe_index(_ACTIVE)


def downgrade() -> None:
    _dedupe_index(_ACTIVE_BEFORE)
    op.drop_table("tidebase_messages", schema=revision_schema())
    op.drop_table("tidebase_approvals", schema=revision_schema())
