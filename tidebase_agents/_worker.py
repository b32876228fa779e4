"""The queue worker: claims queued runs, executes them under their lease, and recovers the runs
of executors that died (P1).

A worker claims due runs of the pipelines registered in its process, executes each through
``CheckpointedPipeline.run_claimed`` (whose runtime heartbeats the claim's lease), and settles
what the execution left behind: a retryable run is requeued with exponential backoff or failed
at ``max_attempts``; a run parked in ``manual_review``, cancelled, completed or taken over is
left alone. Every worker also adopts, every ``recover_interval``, the running runs of its
pipelines whose holder provably died (its process gone on this machine, its PostgreSQL session
gone) or whose lease expired, direct-call runs included (P4), and runs the reconciler loop; an
advisory lock elects the one reconciler that acts in each pass. On PostgreSQL the worker wakes on ``LISTEN tidebase_runs`` and polls as a
fallback; on SQLite it polls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib
import logging
import os
import random
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from ._config import env_setting, resolve_database_url, resolve_schema
from ._errors import ConfigurationError
from ._pipeline import CheckpointedPipeline, registered_pipelines
from ._store import DEFAULT_QUEUE, Backoff, Claim, Store, get_store, utcnow
from ._store.retention import PruneFilter
from ._tidebase import Tidebase
from ._vocab import RunStatus

log = logging.getLogger("tidebase_agents.worker")
#: Seconds a worker's retention pass waits between batches.
PRUNE_PAUSE = 0.05


def load_app(spec: str, app_dir: str | os.PathLike[str] | None = None) -> Any:
    """Import ``module:attr`` (or ``module``) and return it (importing registers the
    pipelines). ``app_dir`` is put first on ``sys.path``, as uvicorn and celery do with
    their working directory."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ConfigurationError(f"--app must be module:attr or module, got {spec!r}")
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if not os.path.isdir(path):
            raise ConfigurationError(f"app directory {path} does not exist")
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f" (looked in {os.path.abspath(app_dir)} and sys.path)" if app_dir else ""
        raise ConfigurationError(
            f"cannot import app module {module_name!r}: {exc}{where}"
        ) from None
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def app_database(app: Any, database_url: str | None = None) -> tuple[str | None, str | None]:
    """The database and schema an app object names: a ``Tidebase``'s, a pipeline's ``.tide``
    ones, else ``database_url`` and the default schema."""
    tide = app if isinstance(app, Tidebase) else getattr(app, "tide", None)
    if not isinstance(tide, Tidebase):
        return database_url, None
    return tide.database_url or database_url, tide.schema


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How a worker runs: the same options for :func:`run_worker`, :class:`Worker` and the
    ``tidebase-agents worker`` command.

    ``lease_seconds`` defaults to the longest lease of the served pipelines' ``Tidebase``;
    ``reconcile_interval`` to half of it. ``grace_seconds`` bounds how long a stopping worker
    waits for running pipelines before cancelling them and requeueing their runs.
    :meth:`from_env` reads each option from ``TIDEBASE_WORKER_<OPTION>``.
    """

    queues: Sequence[str] = (DEFAULT_QUEUE,)
    concurrency: int = 4
    #: Only these pipelines (default: every registered pipeline on the worker's database).
    pipelines: Sequence[str] | None = None
    lease_seconds: float | None = None
    poll_interval: float = 2.0
    reconcile_interval: float | None = None
    grace_seconds: float = 30.0
    #: First requeue delay of a retryable run (seconds); doubles per attempt up to max_backoff.
    retry_backoff: float = 1.0
    max_backoff: float = 300.0
    #: Wake on PostgreSQL NOTIFY (else poll only).
    listen: bool = True
    #: How often to look for runs of the served pipelines whose holder died (seconds).
    recover_interval: float = 1.0
    #: Seconds between retention passes over the served pipelines that set ``retention``.
    retention_interval: float = 600.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if (
            self.poll_interval <= 0
            or self.recover_interval <= 0
            or self.retention_interval <= 0
            or self.grace_seconds < 0
            or (self.lease_seconds or 1) <= 0
        ):
            raise ConfigurationError(
                "poll_interval, recover_interval, retention_interval and lease_seconds must be "
                "positive, grace_seconds not negative"
            )
        if not self.queues:
            raise ConfigurationError("a worker needs at least one queue")

    @classmethod
    def from_env(cls, **options: Any) -> WorkerOptions:
        """Options from ``TIDEBASE_WORKER_QUEUES`` (comma-separated),
        ``TIDEBASE_WORKER_CONCURRENCY``, ``..._PIPELINES``, ``..._LEASE_SECONDS``,
        ``..._POLL_INTERVAL``, ``..._RECONCILE_INTERVAL``, ``..._GRACE_SECONDS``,
        ``..._RETRY_BACKOFF``, ``..._MAX_BACKOFF``, ``..._LISTEN`` (1/0, true/false),
        ``..._RECOVER_INTERVAL`` and ``..._RETENTION_INTERVAL``;
        ``options`` given here win over the environment, which wins over the defaults."""
        unknown = set(options) - set(ENV_KINDS)
        if unknown:
            raise ConfigurationError(f"unknown worker options: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, kind in ENV_KINDS.items():
            value = env_setting(env_name(name), kind)
            if value is not None:
                values[name] = value
        return cls(**{**values, **options})


#: How each worker option is read from its environment variable (see ``env_name``).
ENV_KINDS = {
    "queues": "list",
    "concurrency": "int",
    "pipelines": "list",
    "lease_seconds": "float",
    "poll_interval": "float",
    "reconcile_interval": "float",
    "grace_seconds": "float",
    "retry_backoff": "float",
    "max_backoff": "float",
    "listen": "bool",
    "recover_interval": "float",
    "retention_interval": "float",
}


def _direct(served: dict[str, CheckpointedPipeline[Any, Any]]) -> list[str]:
    """The served pipelines whose direct-call runs workers finish: after their holder died,
    and once they wake up from a wait (``recover=False`` opts out)."""
    return [name for name, p in served.items() if p.recover]


def env_name(option: str) -> str:
    """The environment variable of a worker option: ``TIDEBASE_WORKER_<OPTION>``."""
    return f"TIDEBASE_WORKER_{option.upper()}"


class Worker:
    """Claims and executes queued runs of the pipelines registered in this process."""

    def __init__(
        self,
        database_url: str | None = None,
        options: WorkerOptions | None = None,
        *,
        owner: str | None = None,
        schema: str | None = None,
    ) -> None:
        options = options or WorkerOptions.from_env()
        self.options = options
        self.database_url = resolve_database_url(database_url)
        self.schema = resolve_schema(schema)
        self.queues = list(options.queues)
        self.concurrency = options.concurrency
        self.pipeline_names = list(options.pipelines) if options.pipelines is not None else None
        self.lease_seconds = options.lease_seconds
        self.poll_interval = options.poll_interval
        self.reconcile_interval = options.reconcile_interval
        self.grace_seconds = options.grace_seconds
        self.backoff = Backoff(options.retry_backoff, options.max_backoff)
        self.owner = owner or f"worker:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        #: Whether the LISTEN connection is up (else the worker is polling).
        self.listening = False
        #: Run status after each execution was settled (``queued`` = requeued for a retry),
        #: or ``interrupted`` for executions cut short by shutdown.
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._tasks: dict[asyncio.Task[None], Claim] = {}
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._wake = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, *, force: bool = False) -> None:
        """Stop claiming and shut down; ``force`` skips the grace period."""
        self._stopping.set()
        if force:
            self._force.set()
        self._wake.set()

    def served_pipelines(self) -> dict[str, CheckpointedPipeline[Any, Any]]:
        """The registered pipelines this worker executes: those that use its database."""
        registered = registered_pipelines()
        names = self.pipeline_names if self.pipeline_names is not None else sorted(registered)
        missing = [n for n in names if n not in registered]
        if missing:
            raise ConfigurationError(f"pipelines not registered in this process: {missing}")
        served = {}
        for name in names:
            pipeline = registered[name]
            tide = pipeline.tide
            if (resolve_database_url(tide.database_url), tide.schema) == (
                self.database_url,
                self.schema,
            ):
                served[name] = pipeline
            else:
                log.warning("not serving pipeline %r: it uses another database", name)
        if not served:
            raise ConfigurationError(
                "no registered pipeline uses this worker's database; import the module that "
                "defines your pipelines (--app module:attr)"
            )
        return served

    async def run(self) -> None:
        """Work until :meth:`stop` (or cancellation), then shut down gracefully."""
        store = get_store(self.database_url, self.schema)
        await store.open()
        served = self.served_pipelines()
        lease = self.lease_seconds or max(p.tide.lease_seconds for p in served.values())
        reconciler = asyncio.create_task(self._reconcile_loop(store, lease))
        recoverer = asyncio.create_task(self._recover_loop(store, served, lease))
        listener = asyncio.create_task(self._listen(store)) if self.options.listen else None
        retention = asyncio.create_task(self._retention_loop(store, served))
        log.info(
            "worker %s: pipelines %s, queues %s, concurrency %d",
            self.owner,
            sorted(served),
            self.queues,
            self.concurrency,
        )
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                timeout = await self._fill(store, served, lease)
                if timeout is None or self._stopping.is_set():
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.CancelledError:
            self._force.set()
            raise
        finally:
            self._stopping.set()
            await self._shutdown()
            if listener is not None:
                listener.cancel()  # its connection is terminated in its finally
            # The reconciler ends after its current pass: cancelling a pass midway could
            # strand its pooled connection in a half-closed state.
            tasks = (reconciler, recoverer, retention, listener)
            await asyncio.wait([t for t in tasks if t is not None])
            log.info("worker %s stopped", self.owner)

    async def _fill(
        self, store: Store, served: dict[str, CheckpointedPipeline[Any, Any]], lease: float
    ) -> float | None:
        """Claim runs for the free slots; return how long to wait, or None to go on at once."""
        free = self.concurrency - len(self._tasks)
        if free <= 0:
            return self.poll_interval  # a finishing run sets the wake event
        try:
            direct = _direct(served)
            claims = await store.claim(
                owner=self.owner,
                lease_seconds=lease,
                queues=self.queues,
                pipelines=list(served),
                limit=free,
                direct=direct,
            )
            if len(claims) == free:
                due = None
            else:
                due = await store.next_due(
                    queues=self.queues, pipelines=list(served), direct=direct
                )
        except Exception as exc:
            log.warning("claiming failed (%s); retrying in %.1fs", exc, self.poll_interval)
            return self.poll_interval
        self._start(store, claims, served)
        if len(claims) == free:
            return None
        if due is None:
            return self.poll_interval
        # Wake when the next delayed or backed-off run is due; never spin on a run that
        # another claimer holds locked.
        return min(self.poll_interval, max((due - utcnow()).total_seconds(), 0.1))

    def _start(
        self,
        store: Store,
        claims: Sequence[Claim],
        served: dict[str, CheckpointedPipeline[Any, Any]],
    ) -> None:
        for c in claims:
            task = asyncio.create_task(self._execute(store, c, served[c.pipeline]))
            self._tasks[task] = c
            task.add_done_callback(self._finished)

    async def _recover_loop(
        self, store: Store, served: dict[str, CheckpointedPipeline[Any, Any]], lease: float
    ) -> None:
        """Adopt runs of the served pipelines whose holder died, as free slots allow (P4)."""
        direct = _direct(served)
        while not self._stopping.is_set():
            free = self.concurrency - len(self._tasks)
            if free > 0:
                try:
                    claims = await store.adopt(
                        owner=self.owner,
                        lease_seconds=lease,
                        pipelines=list(served),
                        queues=self.queues,
                        direct=direct,
                        limit=free,
                    )
                except Exception as exc:
                    log.warning("looking for runs whose holder died failed: %s", exc)
                else:
                    if claims and not self._stopping.is_set():
                        log.info("adopted runs whose holder died: %s", [c.run_id for c in claims])
                        self._start(store, claims, served)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.options.recover_interval)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._wake.set()

    async def _execute(
        self, store: Store, c: Claim, pipeline: CheckpointedPipeline[Any, Any]
    ) -> None:
        interrupted = False
        raised = ""
        try:
            await pipeline.run_claimed(c.run_id, owner=self.owner, claim_token=c.token)
            # Returning means the run is completed (its end was written under this claim's
            # lease, or it had ended so before): nothing to settle.
            self.outcomes[RunStatus.COMPLETED] += 1
            log.info("run %s attempt %d ended completed", c.run_id, c.attempt)
            return
        except asyncio.CancelledError:
            # Only the shutdown cancels an execution; the run goes back on the queue below.
            interrupted = True
        except Exception as exc:
            # Parking, cancellation, a lost lease or a failing step: the run's status says
            # which, and settling below acts on it. None of these stops the worker.
            raised = f" ({type(exc).__name__}: {exc})"
        try:
            status = await store.settle_claim(c, self.backoff, interrupted=interrupted)
        except Exception as exc:
            # The run stays under this claim's lease; the reconciler requeues it on expiry.
            log.warning("could not settle run %s: %s", c.run_id, exc)
            return
        self.outcomes["interrupted" if interrupted else status] += 1
        log.info("run %s attempt %d ended %s%s", c.run_id, c.attempt, status, raised)

    async def _shutdown(self) -> None:
        """Let running pipelines finish within the grace period, then cancel and requeue."""
        tasks = set(self._tasks)
        if not tasks:
            return
        log.info("waiting up to %.0fs for %d running pipelines", self.grace_seconds, len(tasks))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_seconds
        force = asyncio.create_task(self._force.wait())
        try:
            while tasks and not force.done() and (remaining := deadline - loop.time()) > 0:
                done, _ = await asyncio.wait(
                    {*tasks, force}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                tasks -= done
        finally:
            force.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _reconcile_loop(self, store: Store, lease: float) -> None:
        interval = self.reconcile_interval or max(lease / 2, 0.5)
        while not self._stopping.is_set():
            try:
                report = await store.reconcile(self.backoff, orphan_grace=lease)
            except Exception as exc:
                log.warning("reconciler pass failed: %s", exc)
            else:
                if report.requeued or report.failed or report.cancelled:
                    log.info(
                        "reconciler: requeued %s, failed %s, cancelled %s",
                        report.requeued,
                        report.failed,
                        report.cancelled,
                    )
                    self._wake.set()
            # Jitter keeps workers started together from contending in lockstep.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval * (0.5 + random.random()))

    async def _retention_loop(
        self, store: Store, served: dict[str, CheckpointedPipeline[Any, Any]]
    ) -> None:
        """Prune the ended runs of served pipelines that outlived their ``retention``."""
        kept = {name: p.retention for name, p in served.items() if p.retention is not None}
        while kept and not self._stopping.is_set():
            for name, retention in kept.items():
                try:
                    # A short pause between batches leaves the database to the runs.
                    n = await store.prune(
                        PruneFilter(utcnow() - retention, pipelines=(name,)),
                        pause=PRUNE_PAUSE,
                        stop=self._stopping,
                    )
                except Exception as exc:
                    log.warning("retention pass for %s failed: %s", name, exc)
                else:
                    if n:
                        log.info("retention: pruned %d ended runs of %s", n, name)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.options.retention_interval)

    async def _listen(self, store: Store) -> None:
        keepalive = max(self.poll_interval * 5, 10.0)
        while True:
            listener = None
            try:
                listener = await store.listen(self._on_notify)
                if listener is None:
                    return  # this database cannot push: poll only
                self.listening = True
                self._wake.set()  # a run may have been enqueued while nobody listened
                while True:
                    await asyncio.sleep(keepalive)
                    await listener.ping(timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN unavailable (%s); polling every %.1fs", exc, self.poll_interval)
            finally:
                self.listening = False
                if listener is not None:
                    listener.close()
            await asyncio.sleep(keepalive)

    def _on_notify(self, queue: str) -> None:
        if queue in self.queues:
            self._wake.set()


async def run_worker(
    app: str | Any = None,
    options: WorkerOptions | None = None,
    *,
    database_url: str | None = None,
    app_dir: str | os.PathLike[str] | None = None,
    install_signal_handlers: bool = True,
    **overrides: Any,
) -> None:
    """Run a :class:`Worker` until SIGTERM or SIGINT (a second signal skips the grace period).

    ``app`` is ``"module:attr"`` / ``"module"`` or the object itself (a ``Tidebase``, a
    pipeline, anything); importing it registers the pipelines (``app_dir`` is put first on
    ``sys.path`` for the import). The database is the app's ``Tidebase`` URL if it names one,
    else ``database_url``, else ``$TIDEBASE_DATABASE_URL``. ``overrides`` are
    :class:`WorkerOptions` fields (``concurrency=8``) applied over ``options``, which default
    to :meth:`WorkerOptions.from_env`.
    """
    target = load_app(app, app_dir) if isinstance(app, str) else app
    try:
        if options is None:
            options = WorkerOptions.from_env(**overrides)
        else:
            options = dataclasses.replace(options, **overrides)
    except TypeError as exc:
        raise ConfigurationError(f"run_worker: {exc}") from None
    url, schema = app_database(target, database_url)
    worker = Worker(url, options, schema=schema)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if install_signal_handlers else ()
    for sig in signals:
        loop.add_signal_handler(sig, lambda: worker.stop(force=worker.stopping))
    try:
        await worker.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
