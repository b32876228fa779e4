"""A private PostgreSQL 15 cluster for fault tests: restart it, kill it, freeze it, fill its disk.

The shared server at ``TIDEBASE_TEST_PG_URL`` must never be frozen or killed, so fault tests get a
cluster of their own: ``initdb`` in a temporary directory, a free port on 127.0.0.1, trust
authentication, ``fsync=off``. The postmaster is a direct child of the test process (so a killed
one is reaped here) and dies with it (``PR_SET_PDEATHSIG``); as root, it runs as the ``postgres``
OS user, since ``initdb`` refuses root.

Faults: :meth:`PgCluster.restart` (fast shutdown, start), :meth:`PgCluster.kill9` (SIGKILL of
the postmaster; its backends exit on their own) followed by :meth:`PgCluster.start` (crash
recovery), :meth:`PgCluster.freeze` / :meth:`PgCluster.thaw` (SIGSTOP / SIGCONT of the postmaster
and every process it forked), :meth:`PgCluster.terminate_backends` (``pg_terminate_backend`` of
every connection to a database) and a "disk full" trigger (:func:`install_disk_full`,
:meth:`PgCluster.disk_full`): the next N writes of ``tidebase_steps`` fail with SQLSTATE 53100.

The fixtures :func:`fault_cluster` (one cluster per session) and :func:`cluster_db` (a fresh
migrated database on it per test, the cluster thawed, running and disarmed again afterwards)
are imported by ``tests/faults/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_BIN = Path(os.environ.get("TIDEBASE_FAULT_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: Prefix of the temporary directories clusters live in (stale ones are cleaned on start).
DIR_PREFIX = "tidebase-pgcluster-"
_PR_SET_PDEATHSIG = 1

#: Written to postgresql.conf: fast and small. ``fsync=off`` only matters if the machine
#: crashes; ``synchronous_commit`` stays on, or a SIGKILLed postmaster would lose commits.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "60",
    "log_min_messages": "warning",
    "log_connections": "off",
}

DISK_FULL_SQL = """
CREATE TABLE IF NOT EXISTS public.fault_flags (name text PRIMARY KEY, budget bigint NOT NULL);
CREATE SEQUENCE IF NOT EXISTS public.fault_disk_full_seq;
CREATE OR REPLACE FUNCTION public.fault_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  budget bigint;
BEGIN
  SELECT f.budget INTO budget FROM public.fault_flags f WHERE f.name = 'disk_full';
  -- The sequence is not transactional: a write that fails still uses up its share.
  IF budget IS NOT NULL AND (budget < 0 OR nextval('public.fault_disk_full_seq') <= budget) THEN
    RAISE EXCEPTION 'could not extend file "base/tidebase_steps": No space left on device'
      USING ERRCODE = '53100', HINT = 'Check free disk space.';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS fault_disk_full ON tidebase.tidebase_steps;
CREATE TRIGGER fault_disk_full BEFORE INSERT OR UPDATE ON tidebase.tidebase_steps
  FOR EACH ROW EXECUTE FUNCTION public.fault_disk_full();
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command may contain spaces and parentheses: fields start after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def reap_stale() -> None:
    """Stop clusters left behind by test processes that died without tearing them down."""
    for base in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        owner = base / "owner.pid"
        try:
            owner_pid = int(owner.read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner_pid):
            continue
        lock = base / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(lock.read_text().splitlines()[0])
            if "postgres" in Path(f"/proc/{pid}/cmdline").read_text():
                for child in _children_of(pid):
                    _signal(child, signal.SIGCONT)
                _signal(pid, signal.SIGCONT)
                _signal(pid, signal.SIGQUIT)
        shutil.rmtree(base, ignore_errors=True)


class PgCluster:
    """One private PostgreSQL cluster (see the module docstring)."""

    def __init__(self) -> None:
        self.bin = PG_BIN
        self.base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        (self.base / "owner.pid").write_text(str(os.getpid()))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen: list[int] = []
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root.
            pw = pwd.getpwnam(os.environ.get("TIDEBASE_FAULT_PG_USER", "postgres"))
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    # -- lifecycle -------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            cwd=self.base,
            **self._as,
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tidebase fault tests\n")
            for name, value in {
                **SETTINGS,
                "port": str(self.port),
                "unix_socket_directories": f"'{self.base}'",
            }.items():
                conf.write(f"{name} = {value}\n")

    def start(self, timeout: float = 60.0) -> None:
        """Start the postmaster (crash recovery after :meth:`kill9`) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.base,
                preexec_fn=_die_with_parent,
                **self._as,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres did not start in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
            timeout=30,
        )
        return result.returncode == 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): open transactions roll back, clients are disconnected."""
        if not self.running:
            return
        self.thaw()
        _signal(self.pid, signal.SIGINT)
        try:
            assert self.proc is not None
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill9(self, timeout: float = 30.0) -> None:
        """SIGKILL the postmaster, as a crash would; wait until its backends have gone too."""
        if not self.running:
            return
        assert self.proc is not None
        children = _children_of(self.pid)
        for pid in children:  # a frozen backend cannot notice that its postmaster died
            _signal(pid, signal.SIGCONT)
        self.frozen = []
        _signal(self.pid, signal.SIGKILL)
        self.proc.wait(timeout)
        # Backends exit on their own once they see the postmaster gone; a new postmaster
        # refuses to start while any of them still holds the old shared memory.
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in children):
            if time.monotonic() > deadline:
                for pid in children:
                    _signal(pid, signal.SIGKILL)
            time.sleep(0.02)

    def freeze(self) -> None:
        """SIGSTOP the postmaster, then every process it forked: the server stops answering,
        connections stay open."""
        if not self.running or self.frozen:
            return
        _signal(self.pid, signal.SIGSTOP)
        self.frozen = [self.pid]
        for pid in _children_of(self.pid):
            _signal(pid, signal.SIGSTOP)
            self.frozen.append(pid)

    def thaw(self) -> None:
        """SIGCONT what :meth:`freeze` stopped (backends first, then the postmaster)."""
        for pid in reversed(self.frozen):
            _signal(pid, signal.SIGCONT)
        self.frozen = []

    def destroy(self) -> None:
        """Stop the cluster however it is, and remove its directory."""
        try:
            self.thaw()
            self.stop()
            if self.running:
                self.kill9()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- SQL -------------------------------------------------------------------------------

    def sql(self, database: str, statement: str) -> list[str]:
        """Run ``statement`` (one or several, ``;``-separated) on ``database`` with psql; the
        result rows as text. Synchronous, so it works from inside an event loop too."""
        result = subprocess.run(
            [
                str(self.bin / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PGCONNECT_TIMEOUT": "15"},
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed on {database}: {result.stderr.strip()}")
        return result.stdout.splitlines()

    def terminate_backends(self, database: str) -> int:
        """``pg_terminate_backend`` every connection to ``database``; how many there were."""
        rows = self.sql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = {_literal(database)} AND pid <> pg_backend_pid()",
        )
        return len(rows)

    def disk_full(self, database: str, writes: int = -1) -> None:
        """Fail the next ``writes`` step writes of ``database`` (all of them if negative) with
        SQLSTATE 53100 ``disk_full``. Needs :func:`install_disk_full` first."""
        self.sql(
            database,
            "ALTER SEQUENCE fault_disk_full_seq RESTART; "
            f"INSERT INTO fault_flags VALUES ('disk_full', {int(writes)}) "
            "ON CONFLICT (name) DO UPDATE SET budget = excluded.budget",
        )

    def disk_ok(self, database: str) -> None:
        self.sql(database, "DELETE FROM fault_flags WHERE name = 'disk_full'")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _die_with_parent() -> None:
    # If the test process dies without tearing the cluster down, the postmaster goes with it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def install_disk_full(cluster: PgCluster, database: str) -> None:
    cluster.sql(database, DISK_FULL_SQL)


def cluster_available() -> str | None:
    """Why no private cluster can be made here, or None if one can."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {PG_BIN} (set TIDEBASE_FAULT_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(os.environ.get("TIDEBASE_FAULT_PG_USER", "postgres"))
        except KeyError:
            return "running as root and there is no 'postgres' OS user to run PostgreSQL as"
    return None


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fault_cluster() -> Iterator[tuple[PgCluster, str]]:
    """A running private cluster and the name of a migrated template database on it."""
    from harness import REQUIRE_PG

    reason = cluster_available()
    if reason is not None:
        if REQUIRE_PG:
            pytest.fail(f"a private PostgreSQL cluster is required for fault tests: {reason}")
        pytest.skip(reason)
    reap_stale()
    cluster = PgCluster()
    try:
        cluster.init()
        cluster.start()
        template = "tidebase_fault_tpl"
        cluster.sql("postgres", f'CREATE DATABASE "{template}"')

        from tidebase_agents import Tidebase

        async def migrate() -> None:
            tide = Tidebase(cluster.url(template))
            await tide.migrate()
            await tide.close()

        asyncio.run(migrate())
        install_disk_full(cluster, template)
        yield cluster, template
    finally:
        cluster.destroy()


@pytest.fixture
def cluster_db(fault_cluster: tuple[PgCluster, str]) -> Iterator[tuple[PgCluster, str, str]]:
    """``(cluster, database name, URL)``: a fresh migrated database on the private cluster,
    with the disk-full trigger installed. Afterwards the cluster is thawed, running and
    disarmed again, whatever the test did to it."""
    cluster, template = fault_cluster
    name = f"tidebase_f_{uuid.uuid4().hex[:10]}"
    cluster.sql("postgres", f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield cluster, name, cluster.url(name)
    finally:
        cluster.thaw()
        if not cluster.running:
            cluster.start()
        cluster.sql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
