"""The packaged Alembic migrations, run on a connection the store hands in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from .tables import VERSION_TABLE

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(connection: Any = None) -> Any:
    """An Alembic config for the packaged migrations, optionally bound to ``connection``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def run_alembic(sync_conn: Any, direction: str, revision: str) -> None:
    from alembic import command

    getattr(command, direction)(alembic_config(sync_conn), revision)


def read_revision(sync_conn: Any) -> str | None:
    """The tidebase revision recorded in the database, or None if it has none."""
    if not sa_inspect(sync_conn).has_table(VERSION_TABLE):
        return None
    revision: str | None = sync_conn.execute(
        text(f"SELECT version_num FROM {VERSION_TABLE}")
    ).scalar()
    return revision
