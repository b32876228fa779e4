"""SQLAlchemy 2.0 models: runs, steps, the per-run event log, state versions and usage records.

The migrations under ``migrations/versions`` build exactly these tables (a test runs Alembic's
autogenerate against them and expects no difference).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .._errors import CheckpointSerializationError
from .._vocab import ACTIVE_RUN_STATUSES, ReplayPolicy, sql_list

#: Alembic revision the models correspond to; a database at another revision is not migrated.
SCHEMA_REVISION = "0010_waits"
VERSION_TABLE = "tidebase_alembic_version"

_ACTIVE_DEDUPE = text(f"dedupe_key IS NOT NULL AND status IN {sql_list(ACTIVE_RUN_STATUSES)}")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware datetimes on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a timezone-aware column")
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value


class StoredJSON(TypeDecorator[Any]):
    """JSON whose stored text failed to parse raises the library's own error.

    PostgreSQL's JSONB cannot hold invalid JSON; an SQLite file can, if someone edits it.
    """

    impl = JSON
    cache_ok = True

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        inner = self.impl_instance.result_processor(dialect, coltype)
        if inner is None:
            return None

        def process(value: Any) -> Any:
            try:
                return inner(value)
            except (ValueError, RecursionError) as exc:
                raise CheckpointSerializationError(
                    f"a stored checkpoint is not valid JSON ({type(exc).__name__}: "
                    f"{str(exc)[:200]}); it was changed outside the library"
                ) from None

        return process


JSONType = StoredJSON().with_variant(JSONB(), "postgresql")
BigId = BigInteger().with_variant(Integer(), "sqlite")

_naming = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_naming)


class RunRow(Base):
    __tablename__ = "tidebase_runs"

    run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    input: Mapped[Any | None] = mapped_column(JSONType)
    input_hash: Mapped[str | None] = mapped_column(String(64))
    output: Mapped[Any | None] = mapped_column(JSONType)
    error: Mapped[Any | None] = mapped_column(JSONType)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_token: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    state_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queue: Mapped[str | None] = mapped_column(String(255))
    dedupe_key: Mapped[str | None] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    scheduled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    max_attempts: Mapped[int | None] = mapped_column(Integer)
    deadline: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Last, as migration 0008 added them: SQLite's ``RETURNING *`` is read by position.
    #: The holder's process (``host:pid:start``, see ``holders``) and the key of the advisory
    #: lock its PostgreSQL session holds.
    lease_process: Mapped[str | None] = mapped_column(String(255))
    lease_session: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_tidebase_runs_status_pipeline", "status", "pipeline"),
        Index("ix_tidebase_runs_pipeline_created", "pipeline", "created_at"),
        # Keyset pages of runs (Store.runs_page), of all runs and of one status.
        Index("ix_tidebase_runs_created", "created_at", "run_id"),
        Index("ix_tidebase_runs_status_created", "status", "created_at", "run_id"),
        Index("ix_tidebase_runs_lease_expires", "status", "lease_expires_at"),
        # Retention finds ended runs by when they ended (Store.prune).
        Index("ix_tidebase_runs_status_finished", "status", "finished_at"),
        Index(
            "uq_tidebase_runs_active_dedupe",
            "queue",
            "dedupe_key",
            unique=True,
            postgresql_where=_ACTIVE_DEDUPE,
            sqlite_where=_ACTIVE_DEDUPE,
        ),
    )


# Claims walk this index in their order (highest priority, then earliest due, then oldest)
# and stop at the first due run, so a claim costs the same however deep the queue is.
Index(
    "ix_tidebase_runs_claim",
    RunRow.queue,
    RunRow.status,
    RunRow.priority.desc(),
    RunRow.scheduled_at,
    RunRow.created_at,
)


class StepRow(Base):
    __tablename__ = "tidebase_steps"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("tidebase_runs.run_id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(32))
    input_hash: Mapped[str] = mapped_column(String(64))
    input_parts: Mapped[Any | None] = mapped_column(JSONType)
    output: Mapped[Any | None] = mapped_column(JSONType)
    error: Mapped[Any | None] = mapped_column(JSONType)
    side_effects: Mapped[Any | None] = mapped_column(JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    keyed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    replay: Mapped[str] = mapped_column(
        String(16), default=ReplayPolicy.AUTO.value, server_default=ReplayPolicy.AUTO.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    lease_token: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    #: What the step was called with, for people (replay decides by ``input_hash``): explicit
    #: steps' ``input``, durable tools' arguments, agent runs' input; cut to a preview when long
    #: (``_codec.bounded_json``).
    input: Mapped[Any | None] = mapped_column(JSONType)

    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_tidebase_steps_run_name"),)


class EventRow(Base):
    __tablename__ = "tidebase_events"

    run_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("tidebase_runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(64))
    step: Mapped[str | None] = mapped_column(String(1000))
    data: Mapped[Any | None] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class StateRow(Base):
    __tablename__ = "tidebase_state"

    run_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("tidebase_runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[Any | None] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class UsageRow(Base):
    __tablename__ = "tidebase_usage"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("tidebase_runs.run_id", ondelete="CASCADE")
    )
    dedupe_key: Mapped[str] = mapped_column(String(1100))
    step: Mapped[str | None] = mapped_column(String(1000))
    kind: Mapped[str] = mapped_column(String(32), default="llm", server_default="llm")
    provider: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(255))
    requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cost_usd: Mapped[float | None] = mapped_column(Float)
    lost: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("run_id", "dedupe_key", name="uq_tidebase_usage_run_dedupe"),
        Index("ix_tidebase_usage_model", "model"),
    )


class UsageDailyRow(Base):
    """Usage of pruned runs, summed per UTC day, pipeline and model, so usage totals outlive
    the runs (``Store.prune``). ``day`` is the day's start in epoch seconds; ``model`` is
    ``''`` for records without one (a key column cannot be NULL)."""

    __tablename__ = "tidebase_usage_daily"

    day: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    pipeline: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    records: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    lost_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: The sum of the costs the records carried; tokens of records without one are below.
    recorded_cost: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    unpriced_input: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    unpriced_output: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    unpriced_cached: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class ApprovalRow(Base):
    """A tool call an agent step stopped on, and the person's decision on it (recorded once)."""

    __tablename__ = "tidebase_approvals"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("tidebase_runs.run_id", ondelete="CASCADE")
    )
    step: Mapped[str] = mapped_column(String(1000))
    call_id: Mapped[str] = mapped_column(String(255))
    agent: Mapped[str] = mapped_column(String(255))
    tool: Mapped[str] = mapped_column(String(255))
    arguments: Mapped[str | None] = mapped_column(Text)
    decision: Mapped[str | None] = mapped_column(String(16))
    always: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("run_id", "step", "call_id", name="uq_tidebase_approvals_run_step_call"),
        Index("ix_tidebase_approvals_run_call", "run_id", "call_id"),
    )


class MessageRow(Base):
    """A message sent to a run on a topic; the one ``wait_for`` step that consumed it."""

    __tablename__ = "tidebase_messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("tidebase_runs.run_id", ondelete="CASCADE")
    )
    topic: Mapped[str] = mapped_column(String(255))
    payload: Mapped[Any | None] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    consumed_by: Mapped[str | None] = mapped_column(String(1000))
    consumed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_tidebase_messages_run_topic", "run_id", "topic", "id"),)


#: The library's tables (the Alembic version table aside).
TABLE_NAMES = tuple(sorted(Base.metadata.tables))
