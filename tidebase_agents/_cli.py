"""The ``tidebase-agents`` command line (P2): migrate, inspect and operate runs, run workers.

Exit codes: 0 success; 1 error (unknown run or step, bad URL, refused operation); 2 usage
error; 3 database schema not migrated; 4 database unreachable. Errors are one line on stderr.
Listing commands print tables for people and take ``--json`` for scripts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from . import _codec
from ._config import ENV_URL, redact, resolve_database_url
from ._errors import ConfigurationError, DatabaseUnavailable, SchemaNotMigrated, TidebaseError
from ._inspect import attempt_of_tokens, error_text, parse_since
from ._pricing import load_prices, parse_group_by, record_cost
from ._store import DEFAULT_QUEUE, EventRecord, RunRecord, StepRecord, close_stores
from ._tidebase import Tidebase
from ._vocab import ReviewAction, RunStatus, StepStatus

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_MIGRATED = 3
EXIT_UNREACHABLE = 4

RUN_STATUSES = tuple(str(s) for s in RunStatus)
_STATUS_STYLE: dict[str, str] = {
    RunStatus.COMPLETED: "green",
    RunStatus.RUNNING: "cyan",
    RunStatus.QUEUED: "blue",
    RunStatus.FAILED: "red",
    RunStatus.FAILED_RETRYABLE: "yellow",
    RunStatus.MANUAL_REVIEW: "magenta",
    RunStatus.CANCELLED: "dim",
}

app = typer.Typer(
    name="tidebase-agents",
    help="Durable OpenAI Agents SDK pipelines: migrate, inspect and operate runs, run workers.\n\n"
    "Exit codes: 0 ok, 1 error, 2 usage, 3 schema not migrated, 4 database unreachable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
runs_app = typer.Typer(help="List, show, resume and cancel runs.", no_args_is_help=True)
steps_app = typer.Typer(help="Resolve steps parked in manual review.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(steps_app, name="steps")

out = Console(highlight=False, soft_wrap=False)


@dataclasses.dataclass
class _Options:
    database_url: str | None


def _url(ctx: typer.Context) -> str | None:
    options: _Options = ctx.find_root().obj
    return options.database_url


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _call(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` on a fresh loop, mapping library errors to exit codes and one-line messages."""

    async def main() -> T:
        try:
            return await fn()
        finally:
            await close_stores()

    try:
        return asyncio.run(main())
    except SchemaNotMigrated as exc:
        _fail(str(exc), EXIT_NOT_MIGRATED)
    except DatabaseUnavailable as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except (TidebaseError, OSError) as exc:
        _fail(str(exc))


def _json(value: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, dt.datetime):
            return o.isoformat()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return str(o)

    typer.echo(json.dumps(value, indent=2, default=default))


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _status(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


def _since(value: str | None) -> dt.datetime | None:
    """``30m``, ``2h``, ``7d`` ago, or an ISO-8601 timestamp (UTC if it has no offset)."""
    try:
        return parse_since(value)
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None


def _use_database(url: str | None) -> None:
    """Make ``--database-url`` the default of every ``Tidebase`` an imported app creates."""
    if url:
        os.environ[ENV_URL] = url


# -- global options ------------------------------------------------------------------------

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar=ENV_URL,
        metavar="URL",
        help="Database URL (postgresql://... or sqlite:///...). Default: $TIDEBASE_DATABASE_URL, "
        "else ./tidebase.db.",
        show_default=False,
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@app.callback()
def _root(ctx: typer.Context, database_url: DatabaseUrl = None) -> None:
    ctx.obj = _Options(database_url)


# -- migrate -------------------------------------------------------------------------------


@app.command()
def migrate(ctx: typer.Context, database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the tidebase tables (PostgreSQL is never migrated implicitly)."""
    url = database_url or _url(ctx)

    before, after = _call(lambda: Tidebase(url).migrate())
    typer.echo(f"migrated {redact(resolve_database_url(url))}: {before or 'empty'} -> {after}")


# -- runs ----------------------------------------------------------------------------------


def _run_dict(run: RunRecord) -> dict[str, Any]:
    return dataclasses.asdict(run)


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help=f"Only runs in this status: {', '.join(RUN_STATUSES)}.")
    ] = None,
    pipeline: Annotated[str | None, typer.Option(help="Only runs of this pipeline.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only runs of this queue.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Created since: 30m, 2h, 7d or an ISO timestamp.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise typer.BadParameter(
            f"{status!r} is not one of {', '.join(RUN_STATUSES)}", param_hint="--status"
        )
    created_since = _since(since)
    url = _url(ctx)

    runs = _call(
        lambda: Tidebase(url).list_runs(
            status=status or (),
            pipeline=pipeline or (),
            queue=queue or (),
            since=created_since,
            limit=limit,
        )
    )
    if as_json:
        _json([_run_dict(r) for r in runs])
        return
    table = Table(title=f"{len(runs)} run{'' if len(runs) == 1 else 's'}", title_justify="left")
    for col in ("run id", "pipeline", "status", "queue", "attempts", "created", "finished"):
        table.add_column(col, no_wrap=col == "run id")
    table.add_column("error", overflow="fold")
    for r in runs:
        table.add_row(
            r.run_id,
            r.pipeline,
            _status(r.status),
            r.queue or "-",
            f"{r.attempts}/{r.max_attempts}" if r.max_attempts else str(r.attempts),
            _when(r.created_at),
            _when(r.finished_at),
            error_text(r.error)[:120],
        )
    out.print(table)


def _timeline(
    run: RunRecord, steps: list[StepRecord], events: list[EventRecord]
) -> list[dict[str, Any]]:
    by_token = attempt_of_tokens(events)
    rows = []
    for s in steps:
        attempt = by_token.get(s.lease_token, s.lease_token)
        replays = max(run.attempts - attempt, 0) if s.status == StepStatus.COMPLETED else 0
        rows.append(
            {
                "step": s.name,
                "status": s.status,
                "attempts": s.attempts,
                "duration_ms": s.duration_ms,
                "executed_in_attempt": attempt,
                "replayed": replays,
                "side_effects": s.side_effects,
                "keyed": s.keyed,
                "started_at": s.started_at,
                "completed_at": s.completed_at,
                "error": s.error,
            }
        )
    return rows


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to show.")],
    prices: Annotated[
        str | None, typer.Option(help="JSON price table overriding the defaults.")
    ] = None,
    last_events: Annotated[
        int, typer.Option("--events", min=0, help="Show the last N events (0: all).")
    ] = 30,
    as_json: JsonFlag = False,
) -> None:
    """A run's step timeline (status, attempts, duration, executed or replayed), usage, events."""
    url = _url(ctx)
    table_prices = _prices(prices)

    async def go() -> tuple[RunRecord, list[StepRecord], list[EventRecord], list[Any]]:
        tide = Tidebase(url)
        run = await tide.get_run(run_id)
        return (
            run,
            await tide.steps(run_id),
            await tide.events(run_id),
            await tide.usage_records(run_id),
        )

    run, steps, events, usage = _call(go)
    timeline = _timeline(run, steps, events)
    usage_rows = [
        {**dataclasses.asdict(u), "cost_usd": record_cost(u, table_prices)} for u in usage
    ]
    total_cost = (
        round(sum(u["cost_usd"] for u in usage_rows), 6)
        if all(u["cost_usd"] is not None for u in usage_rows)
        else None
    )
    if as_json:
        _json(
            {
                "run": _run_dict(run),
                "steps": timeline,
                "usage": usage_rows,
                "cost_usd": total_cost,
                "events": [dataclasses.asdict(e) for e in events],
            }
        )
        return

    out.print(f"[bold]run[/] {run.run_id}  pipeline {run.pipeline}  status {_status(run.status)}")
    out.print(
        f"attempts {run.attempts}"
        + (f"/{run.max_attempts}" if run.max_attempts else "")
        + f"  queue {run.queue or '-'}  created {_when(run.created_at)}"
        + f"  finished {_when(run.finished_at)}"
        + (f"  lease {run.lease_owner}" if run.lease_owner else "")
    )
    if run.error:
        out.print(f"error: {error_text(run.error)}", markup=False)

    table = Table(title="steps", title_justify="left")
    for col in ("#", "step", "status", "attempts", "duration", "origin"):
        table.add_column(col, overflow="fold")
    for i, s in enumerate(timeline, 1):
        origin = f"executed in attempt {s['executed_in_attempt']}"
        if s["replayed"]:
            origin += f", replayed in {s['replayed']} later"
        table.add_row(
            str(i),
            s["step"],
            _status(s["status"]),
            str(s["attempts"]),
            _duration(s["duration_ms"]),
            origin,
        )
    out.print(table)

    if usage_rows:
        table = Table(title="usage", title_justify="left")
        for col in ("step", "model", "requests", "input", "output", "cached", "cost (USD)"):
            table.add_column(col, overflow="fold")
        for u in usage_rows:
            table.add_row(
                u["step"] or "-",
                u["model"] or "-",
                str(u["requests"]),
                str(u["input_tokens"]),
                str(u["output_tokens"]),
                str(u["cached_tokens"]),
                "-" if u["cost_usd"] is None else f"{u['cost_usd']:.6f}",
            )
        out.print(table)
        out.print(f"total cost: {'unknown' if total_cost is None else f'${total_cost:.6f}'}")

    shown = events[-last_events:] if last_events else events
    earlier = len(events) - len(shown)
    title = f"events ({earlier} earlier not shown; --events 0 shows all)" if earlier else "events"
    table = Table(title=title, title_justify="left")
    for col in ("seq", "at", "kind", "step", "data"):
        table.add_column(col, overflow="fold")
    for e in shown:
        table.add_row(
            str(e.seq),
            _when(e.created_at),
            e.kind,
            e.step or "",
            json.dumps(e.data, default=str) if e.data else "",
        )
    out.print(table)


@runs_app.command("resume")
def runs_resume(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to resume.")],
    app_spec: Annotated[
        str | None,
        typer.Option("--app", help="module:attr defining the pipeline; resume in this process."),
    ] = None,
    enqueue: Annotated[
        bool, typer.Option("--enqueue", help="Put the run back on the queue for workers.")
    ] = False,
    queue: Annotated[
        str | None, typer.Option(help="With --enqueue: the queue (default: the run's own).")
    ] = None,
) -> None:
    """Resume a run in this process (--app) or hand it back to the workers (--enqueue)."""
    if enqueue == (app_spec is not None):
        raise typer.BadParameter("give exactly one of --app module:attr or --enqueue")
    url = _url(ctx)
    if enqueue:
        status = _call(lambda: Tidebase(url).requeue(run_id, queue=queue))
        typer.echo(f"run {run_id}: {status}")
        return

    from ._pipeline import get_pipeline
    from ._worker import load_app

    _use_database(url)
    assert app_spec is not None

    async def resume() -> Any:
        load_app(app_spec)
        run = await Tidebase(url).get_run(run_id)
        return await get_pipeline(run.pipeline).resume(run_id)

    result = _call(resume)
    typer.echo(f"run {run_id}: completed")
    _json(_codec.encode(result, what="pipeline result"))


@runs_app.command("cancel")
def runs_cancel(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to cancel.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the run's events.")] = None,
) -> None:
    """Cancel a run; a running executor stops at its next step boundary. One-way."""
    url = _url(ctx)

    async def go() -> tuple[RunStatus, RunStatus]:
        tide = Tidebase(url)
        before = (await tide.get_run(run_id)).status
        return before, await tide.cancel(run_id, reason)

    before, after = _call(go)
    if after != RunStatus.CANCELLED:
        _fail(f"run {run_id} has already ended ({after}); it was not cancelled")
    typer.echo(
        f"run {run_id}: already cancelled"
        if before == RunStatus.CANCELLED
        else f"run {run_id}: cancelled (was {before})"
    )


# -- steps ---------------------------------------------------------------------------------


@steps_app.command("review")
def steps_review(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run.")],
    step: Annotated[str, typer.Argument(help="The step in manual_review (see `runs show`).")],
    retry: Annotated[bool, typer.Option("--retry", help="Execute the step again.")] = False,
    output: Annotated[
        str | None, typer.Option("--output", help="Record this JSON as the step's output.")
    ] = None,
    fail: Annotated[bool, typer.Option("--fail", help="Fail the step and the run.")] = False,
    no_enqueue: Annotated[
        bool,
        typer.Option(
            "--no-enqueue", help="Do not hand a queued run back to the workers afterwards."
        ),
    ] = False,
) -> None:
    """Resolve a step parked in manual review: --retry, --output JSON or --fail."""
    if retry + (output is not None) + fail != 1:
        raise typer.BadParameter("give exactly one of --retry, --output JSON, --fail")
    action = ReviewAction.RETRY if retry else ReviewAction.FAIL if fail else ReviewAction.OUTPUT
    value: Any = None
    if output is not None:
        try:
            value = json.loads(output)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--output") from None
    url = _url(ctx)

    async def go() -> tuple[StepRecord, RunStatus]:
        tide = Tidebase(url)
        record = await tide.review_step(run_id, step, action, value)
        run = await tide.get_run(run_id)
        if action != ReviewAction.FAIL and run.queue is not None and not no_enqueue:
            return record, await tide.requeue(run_id)
        return record, run.status

    record, run_status = _call(go)
    typer.echo(f"step {step} of run {run_id}: {record.status}; run: {run_status}")


# -- usage ---------------------------------------------------------------------------------


def _prices(path: str | None) -> Any:
    try:
        return load_prices(path)
    except TidebaseError as exc:
        _fail(str(exc))


@app.command()
def usage(
    ctx: typer.Context,
    by: Annotated[
        str, typer.Option(help="Group by a comma list of: pipeline, model, run.")
    ] = "pipeline,model",
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline.")] = None,
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Recorded since: 30m, 2h, 7d or an ISO timestamp.")
    ] = None,
    prices: Annotated[
        str | None,
        typer.Option(
            help='JSON price table {"model": {"input": .., "output": .., "cached_input": ..}} '
            "in USD per 1M tokens, overriding the defaults (also $TIDEBASE_PRICES_FILE)."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Token usage and cost, grouped by pipeline, model and/or run."""
    try:
        keys = parse_group_by(by)
    except TidebaseError as exc:
        raise typer.BadParameter(str(exc), param_hint="--by") from None
    _prices(prices)  # a bad price file is a usage error, reported before any database work
    recorded_since = _since(since)
    url = _url(ctx)
    report = _call(
        lambda: Tidebase(url).usage(
            keys, pipeline=pipeline, run_id=run_id, since=recorded_since, prices=prices
        )
    )
    if as_json:
        _json(report)
        return
    table = Table(title="usage", title_justify="left")
    for col in (*keys, "requests", "input", "output", "cached", "total", "cost (USD)"):
        table.add_column(col, overflow="fold")
    totals = dict.fromkeys(("requests", "input_tokens", "output_tokens", "cached_tokens"), 0)
    total_cost: float | None = 0.0
    for r in report:
        for k in totals:
            totals[k] += r[k]
        cost = r["cost_usd"]
        total_cost = None if cost is None or total_cost is None else total_cost + cost
        table.add_row(
            *(str(r[k]) if r[k] is not None else "-" for k in keys),
            str(r["requests"]),
            str(r["input_tokens"]),
            str(r["output_tokens"]),
            str(r["cached_tokens"]),
            str(r["total_tokens"]),
            "-" if cost is None else f"{cost:.6f}",
        )
    table.add_section()
    table.add_row(
        "total",
        *([""] * (len(keys) - 1)),
        *(str(v) for v in totals.values()),
        str(totals["input_tokens"] + totals["output_tokens"]),
        "-" if total_cost is None else f"{total_cost:.6f}",
    )
    out.print(table)
    lost = sum(r["lost_tokens"] for r in report)
    if lost:
        out.print(
            f"of these, {lost} tokens paid for work a resumed run did again (lost to crashes)"
        )
    unpriced = sorted({str(m) for r in report for m in r["unpriced_models"]})
    if unpriced:
        out.print(f"no price for: {', '.join(unpriced)} (add them with --prices FILE)")


# -- inspector -----------------------------------------------------------------------------


@app.command()
def ui(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to serve on; any but loopback needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8321,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="TIDEBASE_UI_TOKEN",
            help="Every request must carry it (Authorization: Bearer, or ?token= once).",
            show_default=False,
        ),
    ] = None,
    prices: Annotated[
        str | None, typer.Option(help="JSON price table overriding the defaults.")
    ] = None,
) -> None:
    """Serve the read-only run inspector (runs, step timelines, usage) in the browser."""
    try:
        from ._ui.server import BindRefused, check_bind, serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith(__package__ or "tidebase_agents"):
            raise
        _fail("the inspector needs the ui extra: pip install 'tidebase-agents[ui]'")
    try:
        check_bind(host, token)
    except BindRefused as exc:
        _fail(str(exc), EXIT_USAGE)
    _prices(prices)
    serve(host, port, database_url=_url(ctx), token=token, prices=prices)


# -- worker --------------------------------------------------------------------------------


@app.command()
def worker(
    ctx: typer.Context,
    app_spec: Annotated[
        str,
        typer.Option(
            "--app",
            help="module:attr to import (registers the pipelines; a Tidebase or "
            "pipeline there names the database).",
        ),
    ],
    queue: Annotated[
        list[str] | None, typer.Option("--queue", help="Queue to serve (repeatable).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Runs executed at once.")] = 4,
    pipeline: Annotated[
        list[str] | None,
        typer.Option("--pipeline", help="Only these pipelines (repeatable; default all)."),
    ] = None,
    lease_seconds: Annotated[
        float | None, typer.Option(help="Lease of a claimed run (default: the pipeline's).")
    ] = None,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds between polls when no notification arrives.")
    ] = 2.0,
    reconcile_interval: Annotated[
        float | None, typer.Option(help="Seconds between reconciler passes (default lease/2).")
    ] = None,
    grace: Annotated[
        float, typer.Option(help="On SIGTERM, seconds to let running pipelines finish.")
    ] = 30.0,
    retry_backoff: Annotated[
        float, typer.Option(help="First retry delay in seconds; doubles per attempt.")
    ] = 1.0,
    max_backoff: Annotated[float, typer.Option(help="Longest retry delay in seconds.")] = 300.0,
    listen: Annotated[
        bool, typer.Option("--listen/--no-listen", help="Wake on PostgreSQL NOTIFY.")
    ] = True,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Claim and execute queued runs until SIGTERM (graceful) or a second signal (immediate)."""
    from ._worker import WorkerOptions, run_worker

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    url = _url(ctx)
    _use_database(url)

    def serve() -> Awaitable[None]:
        options = WorkerOptions(
            queues=queue or [DEFAULT_QUEUE],
            concurrency=concurrency,
            pipelines=pipeline,
            lease_seconds=lease_seconds,
            poll_interval=poll_interval,
            reconcile_interval=reconcile_interval,
            grace_seconds=grace,
            retry_backoff=retry_backoff,
            max_backoff=max_backoff,
            listen=listen,
        )
        return run_worker(app_spec, options, database_url=url)

    _call(serve)


def main() -> None:
    """Console script entry point."""
    app()


if __name__ == "__main__":
    main()
