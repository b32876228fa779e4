"""The ``tidebase-agents`` command line (P2): migrate, inspect and operate runs, run workers.

Exit codes: 0 success; 1 error (unknown run or step, bad URL, refused operation, a pipeline
that raised); 2 usage error; 3 database schema not migrated; 4 database unreachable. Errors
are one line on stderr, never a traceback. Listings print one record a line, fitted to the
terminal (``$COLUMNS``; 120 columns when output is not a terminal), and take ``--json`` for
scripts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import click
import typer

from . import __version__, _codec
from ._config import ENV_SCHEMA, ENV_URL, missing_sqlite_file
from ._errors import ConfigurationError, DatabaseUnavailable, SchemaNotMigrated, TidebaseError
from ._inspect import attempts, error_text, parse_since
from ._pricing import load_prices, parse_group_by, record_cost
from ._store import (
    ApprovalRecord,
    EventRecord,
    MessageRecord,
    RunRecord,
    StepRecord,
    StepsReset,
    close_stores,
)
from ._text import Column, columns, one_line, output_width, wrapped
from ._tidebase import Tidebase
from ._vocab import (
    EVENT_OF_REVIEW,
    PRUNABLE_RUN_STATUSES,
    EventKind,
    ReviewAction,
    RunStatus,
    StepStatus,
)

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_MIGRATED = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130

RUN_STATUSES = tuple(str(s) for s in RunStatus)
PRUNABLE_STATUSES = tuple(str(s) for s in RunStatus if s in PRUNABLE_RUN_STATUSES)
_STATUS_COLOUR: dict[str, str] = {
    RunStatus.COMPLETED: "green",
    RunStatus.RUNNING: "cyan",
    RunStatus.QUEUED: "blue",
    RunStatus.FAILED: "red",
    RunStatus.FAILED_RETRYABLE: "yellow",
    RunStatus.MANUAL_REVIEW: "magenta",
    RunStatus.WAITING: "blue",
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
runs_app = typer.Typer(
    help="List, show, resume, cancel, fork and prune runs; decide approvals, send messages.",
    no_args_is_help=True,
)
steps_app = typer.Typer(
    help="Resolve steps parked in manual review; reset a run to a step.", no_args_is_help=True
)
app.add_typer(runs_app, name="runs")
app.add_typer(steps_app, name="steps")


@dataclasses.dataclass
class _Options:
    database_url: str | None
    schema: str | None
    verbose: bool


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def _tide(ctx: typer.Context, *, existing: bool = False, url: str | None = None) -> Tidebase:
    """The ``Tidebase`` of the global options. ``existing``: the command only reads or changes
    what is there, so a missing SQLite file is an error rather than a new empty database."""
    options: _Options = ctx.find_root().obj
    url = url or options.database_url
    try:
        missing = missing_sqlite_file(url) if existing else None
        tide = Tidebase(url, schema=options.schema)
    except TidebaseError as exc:
        _fail(str(exc))
    if missing is not None:
        _fail(
            f"no SQLite database at {missing} (nothing was created): give --database-url or "
            f"set {ENV_URL}, or run from the folder that holds it"
        )
    if options.verbose:
        typer.echo(f"database: {tide.describe()}", err=True)
    return tide


def _call(fn: Callable[[], Awaitable[T]], context: str | None = None) -> T:
    """Run ``fn`` on a fresh loop; any error becomes one line on stderr and an exit code
    (``context`` prefixes the message)."""

    async def main() -> T:
        try:
            return await fn()
        finally:
            await close_stores()

    def said(message: str) -> str:
        return f"{context}: {message}" if context else message

    try:
        return asyncio.run(main())
    except SchemaNotMigrated as exc:
        _fail(said(str(exc)), EXIT_NOT_MIGRATED)
    except DatabaseUnavailable as exc:
        _fail(said(str(exc)), EXIT_UNREACHABLE)
    except TidebaseError as exc:
        _fail(said(str(exc)))
    except KeyboardInterrupt:
        _fail(said("interrupted"), EXIT_INTERRUPTED)
    except (click.exceptions.Exit, click.ClickException, click.Abort):
        raise
    except Exception as exc:
        _fail(said(f"{type(exc).__name__}: {exc}"))


def _json(value: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, dt.datetime):
            return o.isoformat()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return str(o)

    typer.echo(json.dumps(value, indent=2, default=default))


def _echo(lines: Sequence[str]) -> None:
    for line in lines:
        typer.echo(line)


def _when(value: dt.datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return value.astimezone(dt.timezone.utc).strftime(fmt) if value else "-"


def _duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _coloured() -> bool:

    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _status_style(value: str, padded: str) -> str:
    colour = _STATUS_COLOUR.get(value)
    return typer.style(padded, fg=colour) if colour and _coloured() else padded


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _since(value: str | None) -> dt.datetime | None:
    """``30m``, ``2h``, ``7d`` ago, or an ISO-8601 timestamp (UTC if it has no offset)."""
    try:
        return parse_since(value)
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None


def _many(values: Sequence[str] | None) -> list[str]:
    """Values of a repeatable option, each possibly a comma list."""
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def _use_database(url: str | None, schema: str | None) -> None:
    """Make the global options the defaults of every ``Tidebase`` an imported app creates."""

    if url:
        os.environ[ENV_URL] = url
    if schema:
        os.environ[ENV_SCHEMA] = schema


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
AppDir = Annotated[
    str | None,
    typer.Option(
        "--app-dir",
        metavar="DIR",
        help="Import the app from DIR (default: the working directory).",
        show_default=False,
    ),
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tidebase-agents {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    database_url: DatabaseUrl = None,
    schema: Annotated[
        str | None,
        typer.Option(
            envvar=ENV_SCHEMA,
            metavar="NAME",
            help="PostgreSQL schema of the tables. Default: $TIDEBASE_SCHEMA, else tidebase.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Say which database is used (on stderr).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    ctx.obj = _Options(database_url, schema, verbose)


# -- migrate -------------------------------------------------------------------------------


@app.command()
def migrate(
    ctx: typer.Context,
    database_url: DatabaseUrl = None,
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the DDL (PostgreSQL) instead of applying it.")
    ] = False,
    stamp: Annotated[
        str | None,
        typer.Option(
            metavar="REVISION",
            help="Record REVISION as applied without running anything (for tables created "
            "another way).",
        ),
    ] = None,
) -> None:
    """Create or upgrade the tidebase tables (PostgreSQL is never migrated implicitly)."""
    tide = _tide(ctx, url=database_url)
    if sql:
        typer.echo(_call(tide.migration_sql), nl=False)
        return
    before, after = _call(lambda: tide.migrate(stamp=stamp))
    verb = "stamped" if stamp else "migrated"
    typer.echo(f"{verb} {tide.describe()}: {before or 'empty'} -> {after}")


# -- runs ----------------------------------------------------------------------------------


def _run_dict(run: RunRecord) -> dict[str, Any]:
    return dataclasses.asdict(run)


MultiOption = list[str] | None


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    status: Annotated[
        MultiOption,
        typer.Option(
            help=f"Only runs in this status (repeatable, or a comma list): "
            f"{', '.join(RUN_STATUSES)}."
        ),
    ] = None,
    pipeline: Annotated[
        MultiOption, typer.Option(help="Only runs of this pipeline (repeatable).")
    ] = None,
    queue: Annotated[
        MultiOption, typer.Option(help="Only runs of this queue (repeatable).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Created since: 30m, 2h, 7d or an ISO timestamp.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List runs, newest first, one a line (`runs show RUN_ID` has the whole error)."""
    statuses = _many(status)
    for value in statuses:
        if value not in RUN_STATUSES:
            raise typer.BadParameter(
                f"{value!r} is not one of {', '.join(RUN_STATUSES)}", param_hint="--status"
            )
    created_since = _since(since)
    tide = _tide(ctx, existing=True)

    runs = _call(
        lambda: tide.list_runs(
            status=statuses,
            pipeline=_many(pipeline),
            queue=_many(queue),
            since=created_since,
            limit=limit,
        )
    )
    if as_json:
        _json([_run_dict(r) for r in runs])
        return
    _echo(_runs_table(runs, output_width()))


def _runs_table(runs: list[RunRecord], width: int) -> list[str]:
    cols = [
        Column("RUN", [r.run_id for r in runs]),
        Column("PIPELINE", [r.pipeline for r in runs], shrink=True, min_width=12),
        Column("STATUS", [str(r.status) for r in runs], style=_status_style),
    ]
    optional = []
    if any(r.queue for r in runs):
        optional.append(Column("QUEUE", [r.queue or "-" for r in runs], shrink=True))
    optional.append(
        Column(
            "TRIES",
            [f"{r.attempts}/{r.max_attempts}" if r.max_attempts else str(r.attempts) for r in runs],
        )
    )
    optional.append(Column("CREATED (UTC)", [_when(r.created_at, "%m-%d %H:%M") for r in runs]))
    if any(r.error for r in runs):
        optional.append(
            Column(
                "ERROR",
                [error_text(r.error) for r in runs],
                shrink=True,
                min_width=24,
                shrink_order=1,  # cut the pipeline name before the error
            )
        )
    # Narrow output: the error column goes first, then the others, never id or status.
    shown = cols + optional
    while optional and len(columns(shown, width)[0]) > width:
        optional.pop()
        shown = cols + optional
    lines = columns(shown, width)
    hidden = [c for c in ("QUEUE", "TRIES", "CREATED (UTC)", "ERROR") if _absent(c, shown, runs)]
    note = f"; {', '.join(hidden)} hidden at this width" if hidden else ""
    return [f"{_plural(len(runs), 'run')}, newest first{note}", *(lines if runs else [])]


def _absent(header: str, shown: list[Column], runs: list[RunRecord]) -> bool:
    relevant = {
        "QUEUE": any(r.queue for r in runs),
        "ERROR": any(r.error for r in runs),
    }.get(header, bool(runs))
    return relevant and all(c.header != header for c in shown)


_STEP_FAILURES = (
    EventKind.STEP_FAILED_RETRYABLE,
    EventKind.STEP_FAILED,
    EventKind.STEP_MANUAL_REVIEW,
)
_REVIEWS = frozenset(EVENT_OF_REVIEW.values())


def _span(first: int, last: int) -> str:
    return f"attempt {first}" if first == last else f"attempts {first}-{last}"


def _timeline(
    run: RunRecord, steps: list[StepRecord], events: list[EventRecord]
) -> list[dict[str, Any]]:
    by_token, attempt_at = attempts(events)
    copied_from = _lineage(events).get("from_run")
    by_step: dict[str, list[EventRecord]] = {}
    for e in events:
        if e.step:
            by_step.setdefault(e.step, []).append(e)
    rows = []
    for s in steps:
        attempt = by_token.get(s.lease_token, s.lease_token)
        completed = s.status == StepStatus.COMPLETED
        replayed_in = list(range(attempt + 1, run.attempts + 1)) if completed else []
        history = by_step.get(s.name, [])
        failures = [
            {"attempt": attempt_at[e.seq], "status": str(e.kind), "error": e.data}
            for e in history
            if e.kind in _STEP_FAILURES
        ]
        in_doubt = None
        started_in = None
        for e in history:
            if e.kind == EventKind.STEP_STARTED:
                started_in = attempt_at[e.seq]
            elif e.kind == EventKind.STEP_IN_DOUBT:
                data = e.data if isinstance(e.data, dict) else {}
                in_doubt = {
                    "died_in_attempt": started_in,
                    "found_in_attempt": attempt_at[e.seq],
                    "action": data.get("action"),
                }
                started_in = attempt_at[e.seq]
        rows.append(
            {
                "step": s.name,
                "status": s.status,
                "attempts": s.attempts,
                "duration_ms": s.duration_ms,
                "executed_in_attempt": attempt,
                # A fork's copies carry token 0: no execution of this run wrote them.
                "copied_from": copied_from if s.lease_token == 0 else None,
                "replayed": len(replayed_in),
                "replayed_in": replayed_in,
                "in_doubt": in_doubt,
                "failures": failures,
                "reviewed": [str(e.kind) for e in history if e.kind in _REVIEWS],
                "live": s.status == StepStatus.RUNNING and _holds(run, s.lease_token),
                "input": s.input,
                "idempotency_key": s.idempotency_key,
                "side_effects": s.side_effects,
                "keyed": s.keyed,
                "started_at": s.started_at,
                "completed_at": s.completed_at,
                "error": s.error,
            }
        )
    return rows


def _origin(run: RunRecord, s: dict[str, Any]) -> str:
    """How a step came to be where it is, in words: executed, replayed, in doubt, parked."""
    said = []
    for f in s["failures"]:
        if f["status"] != EventKind.STEP_MANUAL_REVIEW or s["status"] != StepStatus.MANUAL_REVIEW:
            said.append(f"failed in attempt {f['attempt']} ({error_text(f['error'])})")
    doubt = s["in_doubt"]
    if doubt is not None:
        died = doubt["died_in_attempt"]
        who = f"attempt {died} died during it" if died else "its executor died during it"
        if doubt["action"] == StepStatus.MANUAL_REVIEW:
            said.append(
                f"in doubt: {who} (an external write without an idempotency key); parked for "
                f"review in attempt {doubt['found_in_attempt']}"
            )
        else:
            said.append(
                f"in doubt: {who}; re-executed in attempt {doubt['found_in_attempt']} with the "
                f"same idempotency key"
            )
    status = s["status"]
    attempt = s["executed_in_attempt"]
    if EventKind.STEP_REVIEW_OUTPUT in s["reviewed"]:
        said.append("output supplied by an operator")
    elif s["copied_from"]:
        said.append(f"copied from run {s['copied_from']} when it was forked")
    elif status == StepStatus.COMPLETED:
        said.append(f"executed in attempt {attempt}")
    if s["replayed_in"]:
        said.append(f"replayed from its checkpoint in {_span(s['replayed_in'][0], run.attempts)}")
    if status == StepStatus.RUNNING:
        if s["live"]:
            said.append(f"running in attempt {attempt}")
        else:
            said.append(
                f"in doubt: started in attempt {attempt}, whose executor is gone; the next "
                + (
                    "attempt re-executes it with the same idempotency key"
                    if s["keyed"]
                    else "attempt parks it for review"
                )
            )
    elif status == StepStatus.MANUAL_REVIEW:
        said.append(
            f"waits for review: `tidebase-agents steps review {run.run_id} {s['step']} "
            f"--retry | --output JSON | --fail`"
        )
    elif status == StepStatus.FAILED:
        said.append("failed for good")
    elif status == StepStatus.WAITING:
        said.append(f"waiting since attempt {attempt}; the run is parked")
    elif status == StepStatus.FAILED_RETRYABLE and not s["failures"]:
        said.append("to run again in the next attempt")
    return "; ".join(said)


def _holds(run: RunRecord, token: int) -> bool:
    """Whether the execution that wrote under ``token`` still holds the run's lease."""
    now = dt.datetime.now(dt.timezone.utc)
    return (
        run.status == RunStatus.RUNNING
        and run.lease_token == token
        and run.lease_expires_at is not None
        and run.lease_expires_at > now
    )


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
    """A run and its steps (status, attempts, duration, executed / replayed / in doubt,
    input, idempotency key, error), usage and events."""
    tide = _tide(ctx, existing=True)
    table_prices = _prices(prices)

    async def go() -> tuple[RunRecord, list[StepRecord], list[EventRecord], list[Any], Waits]:
        run = await tide.get_run(run_id)
        return (
            run,
            await tide.steps(run_id),
            await tide.events(run_id),
            await tide.usage_records(run_id),
            (await tide.approvals(run_id), await tide.messages(run_id)),
        )

    run, steps, events, usage, (approvals, messages) = _call(go)
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
                "approvals": [dataclasses.asdict(a) for a in approvals],
                "messages": [dataclasses.asdict(m) for m in messages],
            }
        )
        return
    width = output_width()
    _echo(_run_lines(run, width, _lineage(events)))
    _echo(_wait_lines(run, approvals, messages, width))
    typer.echo("")
    typer.echo(_plural(len(timeline), "step"))
    for i, s in enumerate(timeline, 1):
        _echo(_step_lines(run, i, s, width))
    if usage_rows:
        typer.echo("")
        _echo(_usage_lines(usage_rows, total_cost, width))
    shown = events[-last_events:] if last_events else events
    earlier = len(events) - len(shown)
    typer.echo("")
    typer.echo(
        f"{_plural(len(events), 'event')}"
        + (f" ({earlier} earlier not shown; --events 0 shows all)" if earlier else "")
    )
    _echo(
        columns(
            [
                Column("SEQ", [str(e.seq) for e in shown]),
                Column("AT (UTC)", [_when(e.created_at, "%H:%M:%S") for e in shown]),
                Column("KIND", [e.kind for e in shown]),
                Column("STEP", [e.step or "" for e in shown], shrink=True, min_width=12),
                Column(
                    "DATA",
                    [json.dumps(e.data, default=str) if e.data else "" for e in shown],
                    shrink=True,
                ),
            ],
            width,
        )
    )


def _lineage(events: list[EventRecord]) -> dict[str, Any]:
    """Where a forked run came from (the data of its ``run_forked`` event), else empty."""
    first = events[0] if events else None
    if first is None or first.kind != EventKind.RUN_FORKED or not isinstance(first.data, dict):
        return {}
    return first.data


def _run_lines(run: RunRecord, width: int, lineage: dict[str, Any]) -> list[str]:
    attempts = f"{run.attempts}" + (f" of at most {run.max_attempts}" if run.max_attempts else "")
    fields = [
        ("run", run.run_id),
        ("pipeline", run.pipeline),
        ("status", _status_style(run.status, str(run.status))),
        ("attempts", attempts),
        ("queue", run.queue or "-"),
        ("created", f"{_when(run.created_at)} UTC"),
        ("finished", f"{_when(run.finished_at)} UTC" if run.finished_at else "-"),
    ]
    if lineage:
        at = f"at step {lineage['from_step']}" if lineage.get("from_step") else "whole"
        fields.append(("forked", f"from {lineage.get('from_run')} {at}"))
    if run.lease_owner:
        until = f" until {_when(run.lease_expires_at)} UTC" if run.lease_expires_at else ""
        fields.append(("lease", f"{run.lease_owner}{until}"))
    lines = [f"{label:<9} {value}" for label, value in fields]
    if run.error:
        lines += wrapped(f"{'error':<9}", error_text(run.error), width)
    return lines


Waits = tuple[list[ApprovalRecord], list[MessageRecord]]


def _wait_lines(
    run: RunRecord, approvals: list[ApprovalRecord], messages: list[MessageRecord], width: int
) -> list[str]:
    """What a run waits for (W1): its wake-up time, its tool calls awaiting approval (with
    their arguments) and how each was decided, and the messages sent to it."""
    lines: list[str] = []
    if run.status == RunStatus.WAITING:
        wake = f"{_when(run.scheduled_at)} UTC" if run.scheduled_at else "a decision or a message"
        lines.append(f"{'waits':<9} until {wake}")
    if approvals:
        lines += ["", _plural(len(approvals), "tool call") + " needing approval"]
    for a in approvals:
        if a.decision is None:
            state = f"pending: tidebase-agents runs approve|reject {run.run_id} {a.call_id}"
        else:
            state = f"{a.decision}d" + (" (always)" if a.always else "")
            state += f" at {_when(a.decided_at)} UTC" if a.decided_at else ""
            state += f": {a.message}" if a.message else ""
        lines.append(f"  {a.call_id}  {a.agent} -> {a.tool}")
        lines += wrapped("arguments:", a.arguments or "", width, indent=4, max_lines=3)
        lines += wrapped("", state, width, indent=4)
    if messages:
        lines += ["", _plural(len(messages), "message")]
    for m in messages:
        taken = f"taken by {m.consumed_by}" if m.consumed_by else "not taken yet"
        text = json.dumps(m.payload, ensure_ascii=False, default=str)
        lines += wrapped(f"  {m.id}  {m.topic} ({taken}):", text, width, indent=4, max_lines=2)
    return lines


def _step_lines(run: RunRecord, i: int, s: dict[str, Any], width: int) -> list[str]:
    tries = _plural(s["attempts"], "try").replace("trys", "tries")
    head = f"{i:>2}. {s['step']}"
    lines = [head]
    summary = f"{s['status']}, {tries}, {_duration(s['duration_ms'])}"
    if s["side_effects"]:
        summary += f"; side effects: {', '.join(s['side_effects'])}"
    lines += wrapped("", f"{summary}; {_origin(run, s)}", width, indent=4)
    recorded = s["input"]
    if isinstance(recorded, dict) and recorded.get("truncated") is True and "preview" in recorded:
        label = f"input ({recorded.get('bytes')} bytes, its start kept):"
        lines += wrapped(label, str(recorded["preview"]), width, indent=4, max_lines=3)
    elif recorded is not None:
        text = json.dumps(recorded, ensure_ascii=False, sort_keys=True, default=str)
        lines += wrapped("input:", text, width, indent=4, max_lines=3)
    if s["side_effects"] or s["keyed"]:
        lines.append(f"    idempotency key: {s['idempotency_key']}")
    if s["error"]:
        lines += wrapped("error:", error_text(s["error"]), width, indent=4)
    return lines


def _usage_lines(
    usage_rows: list[dict[str, Any]], total_cost: float | None, width: int
) -> list[str]:
    def cost(value: float | None) -> str:
        return "-" if value is None else f"{value:.6f}"

    lines = ["usage"]
    lines += columns(
        [
            Column("STEP", [u["step"] or "-" for u in usage_rows], shrink=True, min_width=12),
            Column("MODEL", [u["model"] or "-" for u in usage_rows], shrink=True),
            Column("REQ", [str(u["requests"]) for u in usage_rows]),
            Column("INPUT", [str(u["input_tokens"]) for u in usage_rows]),
            Column("OUTPUT", [str(u["output_tokens"]) for u in usage_rows]),
            Column("CACHED", [str(u["cached_tokens"]) for u in usage_rows]),
            Column("COST (USD)", [cost(u["cost_usd"]) for u in usage_rows]),
        ],
        width,
    )
    lines.append(f"total cost: {'unknown' if total_cost is None else f'${total_cost:.6f}'}")
    return lines


@runs_app.command("resume")
def runs_resume(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to resume.")],
    app_spec: Annotated[
        str | None,
        typer.Option(
            "--app", help="module:attr (or module) defining the pipeline; resume in this process."
        ),
    ] = None,
    app_dir: AppDir = None,
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
    if enqueue:
        tide = _tide(ctx, existing=True)
        status = _call(lambda: tide.requeue(run_id, queue=queue))
        typer.echo(f"run {run_id}: {status}")
        return

    from ._pipeline import get_pipeline
    from ._worker import load_app

    tide = _tide(ctx, existing=True)
    options: _Options = ctx.find_root().obj
    _use_database(options.database_url, options.schema)
    assert app_spec is not None

    async def resume() -> Any:
        load_app(app_spec, app_dir or ".")
        run = await tide.get_run(run_id)
        return await get_pipeline(run.pipeline).resume(run_id)

    result = _call(resume, context=f"run {run_id} did not complete")
    typer.echo(f"run {run_id}: completed")
    _json(_codec.encode(result, what="pipeline result"))


@runs_app.command("approve")
def runs_approve(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The waiting run.")],
    call_id: Annotated[str, typer.Argument(help="The tool call to approve (see runs show).")],
    always: Annotated[
        bool, typer.Option("--always", help="Also approve later calls of this tool in the run.")
    ] = False,
) -> None:
    """Approve a tool call a waiting run stopped on; recorded once. Once every call is decided
    the run continues when invoked again (a worker does so at once for a queued run)."""
    tide = _tide(ctx, existing=True)
    record = _call(lambda: tide.approve(run_id, call_id, always=always))
    typer.echo(f"tool call {call_id} of run {run_id}: {record.decision}d")


@runs_app.command("reject")
def runs_reject(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The waiting run.")],
    call_id: Annotated[str, typer.Argument(help="The tool call to reject (see runs show).")],
    message: Annotated[
        str | None, typer.Option(help="What the model is told instead of the tool's output.")
    ] = None,
) -> None:
    """Reject a tool call a waiting run stopped on: it never executes; recorded once."""
    tide = _tide(ctx, existing=True)
    record = _call(lambda: tide.reject(run_id, call_id, message=message))
    typer.echo(f"tool call {call_id} of run {run_id}: {record.decision}ed")


@runs_app.command("send")
def runs_send(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to send to.")],
    topic: Annotated[str, typer.Argument(help="The topic its wait_for listens on.")],
    payload: Annotated[str, typer.Argument(help="The message, as JSON.")],
) -> None:
    """Send a message to a run: its first wait_for(TOPIC) that has not taken one gets it,
    exactly once, whether it waits already or starts later."""
    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="PAYLOAD") from None
    tide = _tide(ctx, existing=True)
    message_id = _call(lambda: tide.send(run_id, topic, value))
    typer.echo(f"message {message_id} sent to run {run_id} on topic {topic}")


@runs_app.command("cancel")
def runs_cancel(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to cancel.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the run's events.")] = None,
) -> None:
    """Cancel a run; a running executor stops at its next step boundary. One-way."""
    tide = _tide(ctx, existing=True)

    async def go() -> tuple[RunStatus, RunStatus]:
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


@runs_app.command("fork")
def runs_fork(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to fork.")],
    from_step: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="STEP",
            help="Re-run from this step (see `runs show`); default: the first step that did "
            "not complete.",
        ),
    ] = None,
    new_run_id: Annotated[
        str | None, typer.Option("--run-id", help="The new run's id (default: generated).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Start a new run with RUN_ID's arguments and the checkpoints recorded before STEP; it
    replays those and executes STEP and everything after it. RUN_ID is left as it is."""
    tide = _tide(ctx, existing=True)

    async def go() -> tuple[RunRecord, EventRecord]:
        new = await tide.fork(run_id, from_step=from_step, new_run_id=new_run_id)
        return await tide.get_run(new), (await tide.events(new))[0]

    run, forked = _call(go)
    data = forked.data if isinstance(forked.data, dict) else {}
    if as_json:
        _json({"run": _run_dict(run), "forked": data})
        return
    where = f"at step {forked.step}" if forked.step else "after its last step"
    typer.echo(
        f"run {run.run_id}: forked from {run_id} {where} "
        f"({_plural(int(data.get('steps_copied', 0)), 'checkpoint')} copied); {run.status}"
    )
    typer.echo(
        f"the workers of queue {run.queue} will execute it"
        if run.status == RunStatus.QUEUED
        else f"execute it: tidebase-agents runs resume {run.run_id} --app module:attr "
        f"(or --enqueue)"
    )


@runs_app.command("prune")
def runs_prune(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Prune runs that ended before this: 30d, 12h, 90m ago, or an ISO timestamp.",
        ),
    ],
    status: Annotated[
        MultiOption,
        typer.Option(
            help=f"Only runs that ended so (repeatable, or a comma list): "
            f"{', '.join(PRUNABLE_STATUSES)} (default: all of them)."
        ),
    ] = None,
    pipeline: Annotated[
        MultiOption, typer.Option(help="Only runs of this pipeline (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count the runs that would go; delete nothing.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Delete ended runs with their steps, events, state and usage records, in small batches.

    Their token usage stays in `usage` totals as daily rollups. Queued, running, parked and
    waiting runs are never pruned.
    """
    try:
        before = parse_since(older_than)
    except ConfigurationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    assert before is not None  # a required option is never empty
    statuses = _many(status)
    for value in statuses:
        if value not in PRUNABLE_STATUSES:
            raise typer.BadParameter(
                f"{value!r} cannot be pruned: only {', '.join(PRUNABLE_STATUSES)} runs",
                param_hint="--status",
            )
    tide = _tide(ctx, existing=True)
    n = _call(
        lambda: tide.prune(before, statuses=statuses, pipeline=_many(pipeline), dry_run=dry_run)
    )
    shown = statuses or list(PRUNABLE_STATUSES)
    if as_json:
        _json({"runs": n, "dry_run": dry_run, "ended_before": before, "statuses": shown})
        return
    verb = "would prune" if dry_run else "pruned"
    typer.echo(
        f"{verb} {_plural(n, 'run')} ({', '.join(shown)}) that ended before {_when(before)} UTC"
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
    tide = _tide(ctx, existing=True)

    async def go() -> tuple[StepRecord, RunStatus]:
        record = await tide.review_step(run_id, step, action, value)
        run = await tide.get_run(run_id)
        if action != ReviewAction.FAIL and run.queue is not None and not no_enqueue:
            return record, await tide.requeue(run_id)
        return record, run.status

    record, run_status = _call(go)
    typer.echo(f"step {step} of run {run_id}: {record.status}; run: {run_status}")


@steps_app.command("reset")
def steps_reset(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run.")],
    step: Annotated[str, typer.Argument(help="The first step to run again (see `runs show`).")],
    no_enqueue: Annotated[
        bool,
        typer.Option(
            "--no-enqueue", help="Do not hand a queued run back to the workers afterwards."
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Discard STEP's checkpoint and every one recorded after it, so the run's next
    invocation executes them again. Their usage stays in the ledger, marked lost."""
    tide = _tide(ctx, existing=True)

    async def go() -> tuple[StepsReset, RunStatus]:
        reset = await tide.reset_step(run_id, step)
        run = await tide.get_run(run_id)
        if run.queue is not None and run.status == RunStatus.FAILED_RETRYABLE and not no_enqueue:
            return reset, await tide.requeue(run_id)
        return reset, run.status

    reset, status = _call(go)
    if as_json:
        _json({**dataclasses.asdict(reset), "status": status})
        return
    typer.echo(
        f"run {run_id}: {_plural(len(reset.discarded), 'checkpoint')} discarded from step "
        f"{step} on, {_plural(reset.state_versions_discarded, 'state version')}, "
        f"{_plural(reset.usage_superseded, 'usage record')} marked lost; run: {status}"
    )


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
    tide = _tide(ctx, existing=True)
    report = _call(
        lambda: tide.usage(
            keys, pipeline=pipeline, run_id=run_id, since=recorded_since, prices=prices
        )
    )
    if as_json:
        _json(report)
        return
    totals = dict.fromkeys(("requests", "input_tokens", "output_tokens", "cached_tokens"), 0)
    total_cost: float | None = 0.0
    for r in report:
        for k in totals:
            totals[k] += r[k]
        cost = r["cost_usd"]
        total_cost = None if cost is None or total_cost is None else total_cost + cost
    rows = [
        [
            *(str(r[k]) if r[k] is not None else "-" for k in keys),
            str(r["requests"]),
            str(r["input_tokens"]),
            str(r["output_tokens"]),
            str(r["cached_tokens"]),
            str(r["total_tokens"]),
            "-" if r["cost_usd"] is None else f"{r['cost_usd']:.6f}",
        ]
        for r in report
    ]
    rows.append(
        [
            "total",
            *([""] * (len(keys) - 1)),
            *(str(v) for v in totals.values()),
            str(totals["input_tokens"] + totals["output_tokens"]),
            "-" if total_cost is None else f"{total_cost:.6f}",
        ]
    )
    headers = [*(k.upper() for k in keys), "REQ", "INPUT", "OUTPUT", "CACHED", "TOTAL", "COST"]
    _echo(
        columns(
            [
                Column(h, [row[i] for row in rows], shrink=i < len(keys), min_width=12)
                for i, h in enumerate(headers)
            ],
            output_width(),
        )
    )
    lost = sum(r["lost_tokens"] for r in report)
    if lost:
        typer.echo(
            f"of these, {lost} tokens paid for work a resumed run did again (lost to crashes)"
        )
    unpriced = sorted({str(m) for r in report for m in r["unpriced_models"]})
    if unpriced:
        typer.echo(f"no price for: {', '.join(unpriced)} (add them with --prices FILE)")


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
    options: _Options = ctx.find_root().obj
    serve(
        host,
        port,
        database_url=options.database_url,
        schema=options.schema,
        token=token,
        prices=prices,
    )


# -- worker --------------------------------------------------------------------------------


@app.command()
def worker(
    ctx: typer.Context,
    app_spec: Annotated[
        str,
        typer.Option(
            "--app",
            help="module:attr or module to import (registers the pipelines; a Tidebase or "
            "pipeline there names the database).",
        ),
    ],
    app_dir: AppDir = None,
    queue: Annotated[
        MultiOption,
        typer.Option(
            "--queue",
            help="Queue to serve (repeatable; default $TIDEBASE_WORKER_QUEUES, else default).",
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Runs executed at once (default 4).")
    ] = None,
    pipeline: Annotated[
        MultiOption,
        typer.Option("--pipeline", help="Only these pipelines (repeatable; default all)."),
    ] = None,
    lease_seconds: Annotated[
        float | None, typer.Option(help="Lease of a claimed run (default: the pipeline's).")
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(help="Seconds between polls when no notification arrives (default 2)."),
    ] = None,
    reconcile_interval: Annotated[
        float | None, typer.Option(help="Seconds between reconciler passes (default lease/2).")
    ] = None,
    recover_interval: Annotated[
        float | None,
        typer.Option(help="Seconds between looks for runs whose executor died (default 1)."),
    ] = None,
    grace: Annotated[
        float | None,
        typer.Option(help="On SIGTERM, seconds to let running pipelines finish (default 30)."),
    ] = None,
    retry_backoff: Annotated[
        float | None,
        typer.Option(help="First retry delay in seconds; doubles per attempt (default 1)."),
    ] = None,
    max_backoff: Annotated[
        float | None, typer.Option(help="Longest retry delay in seconds (default 300).")
    ] = None,
    listen: Annotated[
        bool | None,
        typer.Option("--listen/--no-listen", help="Wake on PostgreSQL NOTIFY (default on)."),
    ] = None,
    retention_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between pruning passes for pipelines with a retention (default 600)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Claim and execute queued runs until SIGTERM (graceful) or a second signal (immediate).

    Options not given come from TIDEBASE_WORKER_<OPTION> (TIDEBASE_WORKER_CONCURRENCY, ...),
    else their defaults.
    """
    from ._worker import WorkerOptions, run_worker

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tide = _tide(ctx)
    options: _Options = ctx.find_root().obj
    _use_database(options.database_url, options.schema)
    given = {
        "queues": _many(queue) or None,
        "concurrency": concurrency,
        "pipelines": _many(pipeline) or None,
        "lease_seconds": lease_seconds,
        "poll_interval": poll_interval,
        "reconcile_interval": reconcile_interval,
        "recover_interval": recover_interval,
        "grace_seconds": grace,
        "retry_backoff": retry_backoff,
        "max_backoff": max_backoff,
        "listen": listen,
        "retention_interval": retention_interval,
    }
    try:
        worker_options = WorkerOptions.from_env(**{k: v for k, v in given.items() if v is not None})
    except TidebaseError as exc:
        _fail(str(exc))

    def serve() -> Awaitable[None]:
        return run_worker(
            app_spec, worker_options, database_url=tide.database_url, app_dir=app_dir or "."
        )

    _call(serve)


def main() -> None:
    """Console script entry point."""
    app()


if __name__ == "__main__":
    main()
