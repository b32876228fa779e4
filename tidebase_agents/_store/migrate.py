"""The packaged Alembic migrations: run on a connection the store hands in, or by Alembic itself
from an ``alembic.ini`` (``script_location = tidebase_agents:migrations``).

On PostgreSQL the tables and their version table live in a schema of their own (default
``tidebase``), so an application's own Alembic history and autogenerate never see them.
Migrations run with ``search_path`` set to that schema, then the *home* schema: where the
tables of a release before the schema lived (found through their version table), else the
connection's default schema. Unqualified DDL thus lands in the library's schema, and revision
``0003_own_schema`` moves an older installation's tables out of its home.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy import inspect as sa_inspect

from .._config import redact, resolve_schema
from .._errors import ConfigurationError, SchemaNotMigrated
from .tables import TABLE_NAMES, VERSION_TABLE

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: The revision that moved the tables into their own schema.
OWN_SCHEMA_REVISION = "0003_own_schema"
#: ``Config.attributes`` keys through which the store hands env.py its settings.
SCHEMA_ATTRIBUTE = "tidebase_schema"
HOME_ATTRIBUTE = "tidebase_home_schema"


@contextlib.contextmanager
def quiet_alembic() -> Iterator[None]:
    """Keep Alembic's INFO lines out of the application's logs while the library migrates
    (unless the application set the ``alembic`` logger's level itself)."""
    logger = logging.getLogger("alembic")
    if logger.level != logging.NOTSET:
        yield
        return
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(logging.NOTSET)


def alembic_config(
    connection: Any = None, schema: str | None = None, output: io.StringIO | None = None
) -> Any:
    """An Alembic config for the packaged migrations, optionally bound to ``connection``."""
    with quiet_alembic():  # Alembic's first import logs its plugins at INFO
        from alembic.config import Config

    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    if schema is not None:
        cfg.attributes[SCHEMA_ATTRIBUTE] = schema
    return cfg


def migration_schema(config: Any) -> str:
    """The schema migrations put the tables in: the store's, else the ``schema`` option of
    the ``alembic.ini`` section, else ``$TIDEBASE_SCHEMA``, else ``tidebase``."""
    given = config.attributes.get(SCHEMA_ATTRIBUTE) or config.get_main_option("schema")
    return resolve_schema(given)


def revision_schema() -> str | None:
    """The schema a migration revision being run works in: the library's on PostgreSQL, None
    on SQLite. Revisions name it on every operation, since an application's own ``env.py``
    may run them with a ``search_path`` that does not find the library's tables."""
    from alembic import context, op

    if op.get_context().dialect.name != "postgresql":
        return None
    return migration_schema(context.config)


def run_alembic(sync_conn: Any, direction: str, revision: str, schema: str | None) -> None:
    """``alembic upgrade|stamp revision`` on ``sync_conn``."""
    with quiet_alembic():
        from alembic import command

        getattr(command, direction)(alembic_config(sync_conn, schema), revision)


def read_revision(sync_conn: Any, schema: str | None) -> str | None:
    """The tidebase revision recorded in the database, or None if it has none."""
    if not sa_inspect(sync_conn).has_table(VERSION_TABLE, schema=schema):
        return None
    table = f'"{schema}".{VERSION_TABLE}' if schema else VERSION_TABLE
    revision: str | None = sync_conn.execute(text(f"SELECT version_num FROM {table}")).scalar()
    return revision


@functools.lru_cache(maxsize=1)
def _revisions() -> tuple[frozenset[str], frozenset[str]]:
    """(every packaged revision, those from before the tables had a schema of their own)."""
    with quiet_alembic():
        from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    every = frozenset(s.revision for s in script.walk_revisions())
    before = frozenset(
        s.revision for s in script.iterate_revisions(OWN_SCHEMA_REVISION, "base")
    ) - {OWN_SCHEMA_REVISION}
    return every, before


def _head() -> str | None:
    with quiet_alembic():
        from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


# -- PostgreSQL: where the tables are -------------------------------------------------------

_WHERE_TABLES = text(
    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND c.relname IN :names ORDER BY 1, 2"
).bindparams(bindparam("names", expanding=True))


def _tables_by_schema(conn: Any) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for schema, name in conn.execute(_WHERE_TABLES, {"names": [*TABLE_NAMES, VERSION_TABLE]}):
        found.setdefault(schema, set()).add(name)
    return found


def home_schema(conn: Any, schema: str) -> str:
    """Where tables of a release before the library had its own schema live (the schema of
    their version table, if one records such a release), else the connection's default."""
    _every, before = _revisions()
    legacy = []
    for where, names in _tables_by_schema(conn).items():
        if where != schema and VERSION_TABLE in names:
            revision = conn.execute(text(f'SELECT version_num FROM "{where}".{VERSION_TABLE}'))
            if revision.scalar() in before:
                legacy.append(where)
    if len(legacy) > 1:
        raise ConfigurationError(
            f"tidebase tables of an earlier release exist in several schemas "
            f"({', '.join(legacy)}); migrate them one at a time with search_path set to one"
        )
    if legacy:
        return legacy[0]
    current = conn.execute(text("SELECT current_schema()")).scalar()
    return str(current) if current and current != schema else "public"


def schema_state(conn: Any, schema: str) -> tuple[str | None, str]:
    """The library's revision in ``schema`` (None if it has none) and what the database
    holds, said for a message ("is at ...", "has no tidebase tables ...")."""
    revision = read_revision(conn, schema)
    if revision is not None:
        return revision, f"is at {revision} (schema {schema})"
    found = _tables_by_schema(conn)
    if found.get(schema, set()) - {VERSION_TABLE}:
        return None, (
            f"has tidebase tables in schema {schema} but no record of their revision "
            f"(`tidebase-agents migrate` says what to do)"
        )
    home = home_schema(conn, schema)
    if VERSION_TABLE in found.get(home, set()):
        older = read_revision(conn, home)
        return None, f"has the tables of an earlier release (at {older}) in schema {home}"
    return None, f"has no tidebase tables (schema {schema})"


def prepare_postgres(conn: Any, schema: str, home: str | None = None) -> str:
    """Create the library's schema and point this transaction's ``search_path`` at it, then
    at the home schema; return the home schema."""
    home = home or home_schema(conn, schema)
    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    conn.execute(text(f'SET LOCAL search_path TO "{schema}", "{home}"'))
    return home


def refuse_unversioned(conn: Any, schema: str | None) -> None:
    """Raise :class:`SchemaNotMigrated` if tidebase tables exist although no version table
    of the library's records them (the first migration would collide with them)."""
    inspector = sa_inspect(conn)
    places = [None] if schema is None else [None, schema]
    existing = sorted(
        {name for where in places for name in TABLE_NAMES if inspector.has_table(name, where)}
    )
    if not existing:
        return
    fix = (
        "if they are at revision REV, record it with `tidebase-agents migrate --stamp REV`; "
        "else drop them"
    )
    found = _recorded_elsewhere(conn) if conn.dialect.name == "postgresql" else None
    if found is not None:
        table, revision = found
        fix = (
            f"{table} (an application's own version table) records the library's revision "
            f"{revision}: an application's Alembic ran the library's migrations (keep "
            f"tidebase_agents out of its version_locations). Delete that row "
            f"(DELETE FROM {table} WHERE version_num = '{revision}'), then run "
            f"`tidebase-agents migrate --stamp {revision}` and `tidebase-agents migrate`"
        )
    where = f"schema {schema}" if schema else "the database"
    raise SchemaNotMigrated(
        f"{redact(str(conn.engine.url))} has tidebase tables ({', '.join(existing)}) that no "
        f"{VERSION_TABLE} in {where} records; {fix}."
    )


def _recorded_elsewhere(conn: Any) -> tuple[str, str] | None:
    """An Alembic version table other than the library's that holds one of its revisions."""
    every, _before = _revisions()
    candidates = conn.execute(
        text(
            "SELECT table_schema, table_name FROM information_schema.columns "
            "WHERE column_name = 'version_num' AND table_name <> :ours "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ),
        {"ours": VERSION_TABLE},
    ).all()
    for where, table in candidates:
        rows = conn.execute(text(f'SELECT version_num FROM "{where}"."{table}"')).scalars()
        for revision in rows:
            if revision in every:
                return f"{where}.{table}", str(revision)
    return None


# -- offline (``tidebase-agents migrate --sql``) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class OfflinePlan:
    """Where offline migration SQL starts: the database's revision and home schema (None
    when the database could not be read)."""

    revision: str | None
    home: str | None


def plan_offline(sync_conn: Any, schema: str) -> OfflinePlan:
    home = home_schema(sync_conn, schema)
    revision = read_revision(sync_conn, schema)
    if revision is None and home != schema:
        revision = read_revision(sync_conn, home)
    return OfflinePlan(revision, home)


def offline_sql(url: str, schema: str, plan: OfflinePlan) -> str:
    """The SQL (Alembic offline mode) that upgrades a database at ``plan.revision`` to head."""
    if plan.revision is not None and plan.revision == _head():
        return f"-- the database is at {plan.revision}: nothing to migrate\n"
    output = io.StringIO()
    cfg = alembic_config(schema=schema, output=output)
    cfg.set_main_option("sqlalchemy.url", url)
    if plan.home is not None:
        cfg.attributes[HOME_ATTRIBUTE] = plan.home
    target = "head" if plan.revision is None else f"{plan.revision}:head"
    with quiet_alembic():
        from alembic import command

        command.upgrade(cfg, target, sql=True)
    return output.getvalue()
