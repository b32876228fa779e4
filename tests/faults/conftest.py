"""Fixtures of the fault-injection suite, and its summary at the end of the session.

``TIDEBASE_FAULT_TRIALS`` sets the number of randomized trials per family (a short run by
default); ``TIDEBASE_FAULT_SEED`` replays one trial; ``TIDEBASE_FAULT_REPORT`` names a file the
summary is also written to as JSON.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_hostile import make_prior_run
from fault_report import REPORT
from harness import pg_admin, pg_url_of
from pgcluster import cluster_db as cluster_db
from pgcluster import fault_cluster as fault_cluster
from zygote import Zygote

from tidebase_agents import Tidebase

#: Modules the zygote imports once for all children (the SDK, the library, the CLI).
PRELOAD = ["fault_kit", "fault_apps", "tidebase_agents._cli"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault injection (tests/faults)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT.empty():
        return
    terminalreporter.section("fault injection summary")
    for line in REPORT.lines():
        terminalreporter.write_line(line)
    REPORT.write()


@pytest.fixture(scope="session")
def zygote() -> Iterator[Zygote]:
    """Forks fresh child processes with the SDK already imported (see ``support/zygote.py``)."""
    server = Zygote(PRELOAD)
    yield server
    server.close()


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _database(backend: str, directory: Path, pg_template: str | None) -> Iterator[str]:
    """A fresh migrated database: an SQLite file, or a database on the shared PostgreSQL
    server (whose own processes are never faulted)."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'tidebase.db'}"
        return
    if pg_template is None:
        pytest.skip("PostgreSQL not reachable (set TIDEBASE_TEST_REQUIRE_PG=1 to require it)")
    name = f"tidebase_k_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    try:
        yield pg_url_of(name)
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def backend_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_template: str | None
) -> Iterator[str]:
    """A fresh database for each fault trial, on each backend."""
    yield from _database(request.param, tmp_path, pg_template)


@pytest.fixture(scope="module", params=BACKENDS)
def shared_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_template: str | None,
) -> Iterator[str]:
    """One database per test module and backend: hostile cases each use runs of their own,
    and every case checks that the runs committed before it still read back."""
    yield from _database(request.param, tmp_path_factory.mktemp("shared"), pg_template)


@pytest.fixture
async def tide(shared_url: str) -> AsyncIterator[Tidebase]:
    """A ``Tidebase`` on the module's database, which holds the prior run every hostile case
    must leave readable."""
    tide = Tidebase(shared_url)
    await make_prior_run(tide)
    yield tide
    await tide.close()
