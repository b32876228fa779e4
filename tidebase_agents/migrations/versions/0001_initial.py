"""initial schema

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-26 02:22:31.037967
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

from tidebase_agents._store.migrate import migration_schema, refuse_unversioned

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ACTIVE = (
    "dedupe_key IS NOT NULL AND status IN "
    "('queued', 'running', 'failed_retryable', 'manual_review')"
)

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if not context.is_offline_mode():
        # Tables created another way (an application's Alembic running these migrations
        # records them in its own version table) would collide: say so instead.
        bind = op.get_bind()
        postgres = bind.dialect.name == "postgresql"
        refuse_unversioned(bind, migration_schema(context.config) if postgres else None)
    op.create_table(
        "tidebase_runs",
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("pipeline", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("input", JSON, nullable=True),
        sa.Column("input_hash", sa.String(length=64), nullable=True),
        sa.Column("output", JSON, nullable=True),
        sa.Column("error", JSON, nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_token", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("(false)"), nullable=False
        ),
        sa.Column("event_seq", sa.Integer(), server_default="0", nullable=False),
        sa.Column("state_version", sa.Integer(), server_default="0", nullable=False),
        sa.Column("queue", sa.String(length=255), nullable=True),
        sa.Column("dedupe_key", sa.String(length=255), nullable=True),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_attempts", sa.Integer(), nullable=True),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_tidebase_runs")),
    )
    with op.batch_alter_table("tidebase_runs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tidebase_runs_claim", ["queue", "status", "priority", "scheduled_at"], unique=False
        )
        batch_op.create_index(
            "ix_tidebase_runs_lease_expires", ["status", "lease_expires_at"], unique=False
        )
        batch_op.create_index(
            "ix_tidebase_runs_pipeline_created", ["pipeline", "created_at"], unique=False
        )
        batch_op.create_index(
            "ix_tidebase_runs_status_pipeline", ["status", "pipeline"], unique=False
        )
        batch_op.create_index(
            "uq_tidebase_runs_active_dedupe",
            ["queue", "dedupe_key"],
            unique=True,
            postgresql_where=sa.text(_ACTIVE),
            sqlite_where=sa.text(_ACTIVE),
        )

    op.create_table(
        "tidebase_events",
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("step", sa.String(length=1000), nullable=True),
        sa.Column("data", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["tidebase_runs.run_id"],
            name=op.f("fk_tidebase_events_run_id_tidebase_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "seq", name=op.f("pk_tidebase_events")),
    )
    op.create_table(
        "tidebase_state",
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["tidebase_runs.run_id"],
            name=op.f("fk_tidebase_state_run_id_tidebase_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "version", name=op.f("pk_tidebase_state")),
    )
    op.create_table(
        "tidebase_steps",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=1000), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("input_hash", sa.String(length=64), nullable=False),
        sa.Column("input_parts", JSON, nullable=True),
        sa.Column("output", JSON, nullable=True),
        sa.Column("error", JSON, nullable=True),
        sa.Column("side_effects", JSON, nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("keyed", sa.Boolean(), server_default=sa.text("(false)"), nullable=False),
        sa.Column("replay", sa.String(length=16), server_default="auto", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("lease_token", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["tidebase_runs.run_id"],
            name=op.f("fk_tidebase_steps_run_id_tidebase_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tidebase_steps")),
        sa.UniqueConstraint("run_id", "name", name="uq_tidebase_steps_run_name"),
    )
    op.create_table(
        "tidebase_usage",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("dedupe_key", sa.String(length=1100), nullable=False),
        sa.Column("step", sa.String(length=1000), nullable=True),
        sa.Column("kind", sa.String(length=32), server_default="llm", nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("requests", sa.Integer(), server_default="0", nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["tidebase_runs.run_id"],
            name=op.f("fk_tidebase_usage_run_id_tidebase_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tidebase_usage")),
        sa.UniqueConstraint("run_id", "dedupe_key", name="uq_tidebase_usage_run_dedupe"),
    )
    with op.batch_alter_table("tidebase_usage", schema=None) as batch_op:
        batch_op.create_index("ix_tidebase_usage_model", ["model"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tidebase_usage", schema=None) as batch_op:
        batch_op.drop_index("ix_tidebase_usage_model")

    op.drop_table("tidebase_usage")
    op.drop_table("tidebase_steps")
    op.drop_table("tidebase_state")
    op.drop_table("tidebase_events")
    with op.batch_alter_table("tidebase_runs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_tidebase_runs_active_dedupe",
            postgresql_where=sa.text(_ACTIVE),
            sqlite_where=sa.text(_ACTIVE),
        )
        batch_op.drop_index("ix_tidebase_runs_status_pipeline")
        batch_op.drop_index("ix_tidebase_runs_pipeline_created")
        batch_op.drop_index("ix_tidebase_runs_lease_expires")
        batch_op.drop_index("ix_tidebase_runs_claim")

    op.drop_table("tidebase_runs")
