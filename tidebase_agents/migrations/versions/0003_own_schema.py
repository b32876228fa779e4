"""the tables in a PostgreSQL schema of their own; steps record their input

Moves the tables of an earlier release (with their rows, indexes, constraints and sequences,
and the version table) from where ``search_path`` finds them into the library's schema
(default ``tidebase``), so that an application's own Alembic autogenerate never sees them.
SQLite has no schemas: its tables stay as they are. Adds ``tidebase_steps.input``, what each
step was called with, for people to read.

Revision ID: 0003_own_schema
Revises: 0002_drop_cancel_requested
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from tidebase_agents._store.migrate import revision_schema

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# Frozen at this revision (the version table last: a failure leaves the history consistent).
TABLES = (
    "tidebase_runs",
    "tidebase_steps",
    "tidebase_events",
    "tidebase_state",
    "tidebase_usage",
    "tidebase_alembic_version",
)

revision: str = "0003_own_schema"
down_revision: str | None = "0002_drop_cancel_requested"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _move_into(schema: str) -> str:
    # One DO block, so offline SQL (--sql) moves whatever the database holds, like online.
    # String concatenation, not format(): no % or : for a driver to take as a parameter.
    names = ", ".join(_literal(t) for t in TABLES)
    return f"""DO $$
DECLARE
    t text;
    found text;
BEGIN
    FOREACH t IN ARRAY ARRAY[{names}] LOOP
        SELECT n.nspname INTO found FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = to_regclass(quote_ident(t));
        IF found IS NOT NULL AND found <> {_literal(schema)} THEN
            EXECUTE 'ALTER TABLE ' || quote_ident(found) || '.' || quote_ident(t)
                || ' SET SCHEMA ' || quote_ident({_literal(schema)});
        END IF;
    END LOOP;
END $$"""


def _move_out_of(schema: str) -> str:
    # Back to the first schema of search_path other than the library's (public by default).
    names = ", ".join(_literal(t) for t in TABLES)
    return f"""DO $$
DECLARE
    t text;
    home text;
BEGIN
    SELECT s INTO home FROM unnest(current_schemas(false)) AS s
        WHERE s <> {_literal(schema)} LIMIT 1;
    IF home IS NULL THEN
        home := 'public';
    END IF;
    FOREACH t IN ARRAY ARRAY[{names}] LOOP
        IF to_regclass(quote_ident({_literal(schema)}) || '.' || quote_ident(t)) IS NOT NULL THEN
            EXECUTE 'ALTER TABLE ' || quote_ident({_literal(schema)}) || '.' || quote_ident(t)
                || ' SET SCHEMA ' || quote_ident(home);
        END IF;
    END LOOP;
END $$"""


def upgrade() -> None:
    schema = revision_schema()
    if schema is not None:
        op.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        op.execute(_move_into(schema))
    with op.batch_alter_table("tidebase_steps", schema=schema) as batch_op:
        batch_op.add_column(sa.Column("input", JSON, nullable=True))


def downgrade() -> None:
    schema = revision_schema()
    with op.batch_alter_table("tidebase_steps", schema=schema) as batch_op:
        batch_op.drop_column("input")
    if schema is not None:
        op.execute(_move_out_of(schema))
