"""Settings from the environment (explicit arguments win), database URL spellings, schema
names and the version, without a database."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import subprocess

import pytest
from sqlalchemy import create_engine
from wk_support import CLI

import tidebase_agents
from tidebase_agents import ConfigurationError, Tidebase, WorkerOptions, checkpointed_pipeline
from tidebase_agents._config import resolve_database_url, resolve_schema
from tidebase_agents._worker import ENV_KINDS, env_name

ENGINE_ENV = {
    "TIDEBASE_LEASE_SECONDS": "12",
    "TIDEBASE_HEARTBEAT_SECONDS": "2.5",
    "TIDEBASE_RETRY_BACKOFF": "0.05",
    "TIDEBASE_MAX_PAYLOAD_BYTES": "2048",
}


def test_tidebase_settings_come_from_the_environment_unless_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = Tidebase().settings
    assert (defaults.lease_seconds, defaults.heartbeat_interval) == (30.0, 10.0)
    for name, value in ENGINE_ENV.items():
        monkeypatch.setenv(name, value)
    settings = Tidebase().settings
    assert (settings.lease_seconds, settings.heartbeat_interval) == (12.0, 2.5)
    assert (settings.retry_backoff, settings.max_payload_bytes) == (0.05, 2048)
    given = Tidebase(lease_seconds=60, heartbeat_seconds=5, retry_backoff=1, max_payload_bytes=9)
    assert dataclasses.astuple(given.settings) == (60.0, 1.0, 9, 5.0)
    # A decorated pipeline's Tidebase reads them the same way; its own argument wins.
    monkeypatch.setenv("TIDEBASE_LEASE_SECONDS", "7")

    @checkpointed_pipeline("settings-env")
    async def from_env() -> None: ...

    @checkpointed_pipeline("settings-given", lease_seconds=3)
    async def given_lease() -> None: ...

    assert (from_env.tide.lease_seconds, given_lease.tide.lease_seconds) == (7.0, 3.0)


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("TIDEBASE_LEASE_SECONDS", "soon", "TIDEBASE_LEASE_SECONDS='soon' is not a valid float"),
        ("TIDEBASE_LEASE_SECONDS", "-1", "lease_seconds must be positive"),
        ("TIDEBASE_HEARTBEAT_SECONDS", "45", "heartbeat_seconds must be positive and below"),
        ("TIDEBASE_MAX_PAYLOAD_BYTES", "1.5", "is not a valid int"),
        ("TIDEBASE_SCHEMA", "bad-name", "invalid schema name 'bad-name'"),
    ],
)
def test_bad_settings_in_the_environment_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=needle.replace("(", r"\(")):
        Tidebase(schema=None).schema  # noqa: B018 (the schema is resolved on use)


def test_worker_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(ENV_KINDS) == {f.name for f in dataclasses.fields(WorkerOptions)}
    assert WorkerOptions.from_env() == WorkerOptions()
    env = {
        "QUEUES": "gpu, default",
        "CONCURRENCY": "16",
        "PIPELINES": "a,b",
        "LEASE_SECONDS": "40",
        "POLL_INTERVAL": "0.5",
        "RECONCILE_INTERVAL": "9",
        "GRACE_SECONDS": "120",
        "RETRY_BACKOFF": "3",
        "MAX_BACKOFF": "60",
        "LISTEN": "off",
        "RECOVER_INTERVAL": "0.25",
    }
    for option, value in env.items():
        monkeypatch.setenv(f"TIDEBASE_WORKER_{option}", value)
    assert {env_name(f) for f in ENV_KINDS} == {f"TIDEBASE_WORKER_{o}" for o in env}
    options = WorkerOptions.from_env()
    assert options == WorkerOptions(
        queues=["gpu", "default"],
        concurrency=16,
        pipelines=["a", "b"],
        lease_seconds=40.0,
        poll_interval=0.5,
        reconcile_interval=9.0,
        grace_seconds=120.0,
        retry_backoff=3.0,
        max_backoff=60.0,
        listen=False,
        recover_interval=0.25,
    )
    # Explicit options win; a plain WorkerOptions reads no environment.
    assert WorkerOptions.from_env(concurrency=2, listen=True).concurrency == 2
    assert WorkerOptions.from_env(concurrency=2, listen=True).listen is True
    assert WorkerOptions().concurrency == 4
    monkeypatch.setenv("TIDEBASE_WORKER_CONCURRENCY", "many")
    with pytest.raises(ConfigurationError, match="TIDEBASE_WORKER_CONCURRENCY='many'"):
        WorkerOptions.from_env()
    with pytest.raises(ConfigurationError, match="unknown worker options: speed"):
        WorkerOptions.from_env(speed=3)


def test_every_postgres_driver_spelling_means_asyncpg() -> None:
    rest = "app:secret@db:5432/app"
    for spelling in (
        "postgresql",
        "postgres",
        "postgresql+asyncpg",
        "postgresql+psycopg",
        "postgresql+psycopg2",
        "postgresql+psycopg_async",
    ):
        assert resolve_database_url(f"{spelling}://{rest}") == f"postgresql+asyncpg://{rest}"
    with pytest.raises(ConfigurationError, match="unsupported PostgreSQL driver"):
        resolve_database_url(f"postgresql+pg8000://{rest}")


def test_an_application_engine_lends_its_url_and_credentials() -> None:
    engine = create_engine("postgresql+psycopg://app:secret@db:5432/app")
    tide = Tidebase(engine=engine)
    assert resolve_database_url(tide.database_url) == "postgresql+asyncpg://app:secret@db:5432/app"
    assert tide.describe() == "postgresql+asyncpg://app:***@db:5432/app (schema tidebase)"
    with pytest.raises(ConfigurationError, match="either database_url= or engine="):
        Tidebase("sqlite://", engine=engine)
    with pytest.raises(ConfigurationError, match="engine= takes a SQLAlchemy Engine"):
        Tidebase(engine="postgresql://db/app")


def test_schema_names() -> None:
    assert resolve_schema() == "tidebase"
    assert Tidebase(schema="agents_1").schema == "agents_1"
    for bad in ("", "1abc", "a b", 'x"y', "pg_toast", "x" * 64):
        with pytest.raises(ConfigurationError):
            Tidebase(schema=bad or "?")


def test_version_comes_from_the_package_metadata() -> None:
    expected = importlib.metadata.version("tidebase-agents")
    assert tidebase_agents.__version__ == expected
    out = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, f"tidebase-agents {expected}\n")
