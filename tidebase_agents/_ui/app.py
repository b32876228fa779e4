"""The inspector's web application: read-only pages over one database (Starlette, Jinja2).

Every read goes through :class:`~tidebase_agents.Tidebase`. There are only GET routes. Every
stored value reaches the page through Jinja's autoescaping (SVG included), and the
Content-Security-Policy allows no inline script, so a ``<script>`` in a model's output is text.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import time
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import (
    ConfigurationError,
    DatabaseUnavailable,
    RunNotFound,
    SchemaNotMigrated,
    TidebaseError,
)
from .._inspect import error_text, parse_since, read_steps
from .._pricing import load_prices
from .._tidebase import Tidebase
from .._vocab import RunStatus
from . import charts, views

COOKIE = "tidebase_ui"
NAMES_TTL = 60.0
EVENTS_SHOWN = 500
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets) is this machine."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, without its port."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Security for every request and response.

    Responses get a strict Content-Security-Policy and related headers. With a token, a
    request must carry it: ``Authorization: Bearer``, or once as ``?token=``, which is
    exchanged for an HttpOnly cookie (compared in constant time). Without a token (a loopback
    bind), only requests addressed to a loopback name are served, so a web page cannot rebind
    its own name to this port and read the inspector.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.cookie = _cookie_value(self.token) if self.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        response = self._refusal(Request(scope))
        if response is not None:
            await response(scope, receive, send_secured)
        else:
            await self.app(scope, receive, send_secured)

    def _refusal(self, request: Request) -> Response | None:
        if self.token is None:
            if is_loopback(_host_name(request.headers.get("host", ""))):
                return None
            return PlainTextResponse("400: this inspector only answers to localhost", 400)
        assert self.cookie is not None
        offered = request.query_params.get("token")
        if offered is not None and hmac.compare_digest(offered.encode(), self.token):
            url = request.url.remove_query_params("token")
            target = url.path + (f"?{url.query}" if url.query else "")
            redirect = RedirectResponse(target, 303)
            redirect.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict")
            return redirect
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(bearer.encode(), self.token):
            return None
        if hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), self.cookie.encode()):
            return None
        return PlainTextResponse(
            "401: this inspector needs its token (Authorization: Bearer TOKEN, or open it once "
            "with ?token=TOKEN)",
            401,
            headers={"www-authenticate": "Bearer"},
        )


def _cookie_value(token: bytes) -> str:
    # The cookie proves the token was shown without being the token itself.
    return hmac.new(token, b"tidebase-ui-cookie", hashlib.sha256).hexdigest()


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tidebase_agents._ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=views.when,
        span=views.span,
        usd=views.usd,
        num=views.count,
        capped=views.capped,
        clock=lambda t: t.astimezone(dt.timezone.utc).strftime("%H:%M:%S"),
    )
    return env


def create_app(
    database_url: str | None = None,
    *,
    schema: str | None = None,
    token: str | None = None,
    prices: str | None = None,
    page_size: int = 50,
) -> Starlette:
    """The inspector for ``database_url`` (default ``$TIDEBASE_DATABASE_URL``, else
    ``./tidebase.db``; ``schema`` as ``Tidebase`` takes it). ``token`` makes every request
    prove it; ``prices`` is a JSON price table overriding the built-in one."""
    tide = Tidebase(database_url, schema=schema)
    table = load_prices(prices)
    templates = Jinja2Templates(env=_environment())

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        context.setdefault("refresh", None)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    known: dict[str, list[str]] = {}
    known_at = [-NAMES_TTL]

    async def names() -> dict[str, list[str]]:
        """The pipelines and queues runs have, for the filters' suggestions: counting them
        reads every run, so they are read at most once a minute."""
        if time.monotonic() - known_at[0] >= NAMES_TTL:
            for key, by in (("pipelines", "pipeline"), ("queues", "queue")):
                known[key] = sorted(str(v) for v in await tide.run_counts(by) if v)
            known_at[0] = time.monotonic()
        return known

    async def home(request: Request) -> Response:
        return RedirectResponse("/runs", 302)

    async def runs(request: Request) -> Response:
        filters = views.RunFilters.from_query(request.query_params)
        now = _now()
        since = filters.since_time(now)
        result = await tide.runs_page(
            status=filters.statuses,
            pipeline=filters.pipelines,
            queue=filters.queues,
            since=since,
            before=filters.cursor(),
            limit=page_size,
        )
        costs = await tide.run_costs([r.run_id for r in result.runs], prices=prices)
        # Counted without the status filter: each status box says what ticking it would show.
        status_counts = await tide.run_counts(
            "status",
            pipeline=filters.pipelines,
            queue=filters.queues,
            since=since,
            cap=views.COUNT_CAP,
        )
        shown = [s for s in status_counts if not filters.statuses or s in filters.statuses]
        return page(
            request,
            "runs.html",
            nav="runs",
            filters=filters,
            rows=views.run_rows(result.runs, costs, now),
            older=filters.query(before=views.cursor_text(result.next)) if result.next else None,
            newest=filters.query(before="") if filters.before else None,
            statuses=[str(s) for s in RunStatus],
            status_counts=status_counts,
            matching=sum(min(status_counts[s], views.COUNT_CAP) for s in shown),
            matching_capped=any(status_counts[s] > views.COUNT_CAP for s in shown),
            pipelines=(await names())["pipelines"],
            queues=(await names())["queues"],
            since_choices=_choices(filters.since),
            refresh=views.REFRESH_SECONDS
            if views.refreshes([r.status for r in result.runs])
            else None,
        )

    async def run(request: Request) -> Response:
        run_id = request.query_params.get("id", "")
        record = await tide.get_run(run_id)
        steps = await tide.steps(run_id)
        events = await tide.events(run_id)
        states = await tide.state_versions(run_id)
        usage = await tide.usage_records(run_id)
        now = _now()
        readings = read_steps(record, steps, events, now)
        step_views = views.step_views(record, readings, usage, table)
        usage_lines = views.usage_by_model(usage, table)
        status = views.run_status(record, now)
        return page(
            request,
            "run.html",
            nav="runs",
            run=record,
            status=status,
            took=views.span(((record.finished_at or now) - record.created_at).total_seconds()),
            timeline=charts.timeline(record, readings, events, now, views.origin),
            steps=step_views,
            pending=views.pending_items(record, step_views),
            usage=usage_lines,
            cost=views.total_cost(usage_lines) if usage_lines else None,
            arguments=views.payload(record.input),
            output=views.payload(record.output),
            error=views.payload(record.error),
            error_line=error_text(record.error)[:600],
            events=[
                views.EventView(e, views.payload(e.data, compact=True))
                for e in events[-EVENTS_SHOWN:]
            ],
            earlier_events=max(len(events) - EVENTS_SHOWN, 0),
            states=[views.StateView(s, views.payload(s.value)) for s in states],
            refresh=views.REFRESH_SECONDS if status.live else None,
        )

    async def usage(request: Request) -> Response:
        q = request.query_params
        bucket = q.get("bucket") or "day"
        by = q.get("by") or "model"
        since_text = q.get("since", "30d")
        pipeline = q.get("pipeline") or None
        if bucket not in views.BUCKETS or by not in ("model", "pipeline"):
            raise ConfigurationError(
                f"bucket must be one of {', '.join(views.BUCKETS)} and by model or pipeline"
            )
        since = parse_since(since_text, _now())
        rows = await tide.usage_over_time(
            views.BUCKETS[bucket], by, pipeline=pipeline, since=since, prices=prices
        )
        shown, note = bucket, None
        while views.bucket_count(rows, shown) > views.MAX_BARS and views.coarser(shown):
            shown = views.coarser(shown) or shown
            note = f"shown per {shown}: per {bucket} would draw too many bars"
            rows = await tide.usage_over_time(
                views.BUCKETS[shown], by, pipeline=pipeline, since=since, prices=prices
            )
        totals = await tide.usage(
            ("pipeline", "model"), pipeline=pipeline, since=since, prices=prices
        )
        return page(
            request,
            "usage.html",
            nav="usage",
            bucket=bucket,
            by=by,
            since=since_text,
            pipeline=pipeline or "",
            buckets=list(views.BUCKETS),
            since_choices=_choices(since_text),
            charts=views.usage_charts(rows, by, shown),
            note=note,
            totals=totals,
            pipelines=(await names())["pipelines"],
        )

    async def failed(request: Request, exc: Exception) -> Response:
        # Messages about the database would name it: say what is wrong, never where.
        if isinstance(exc, DatabaseUnavailable):
            code, message = 503, "The database is unreachable."
        elif isinstance(exc, SchemaNotMigrated):
            code, message = 503, "The database is not migrated: run `tidebase-agents migrate`."
        elif isinstance(exc, RunNotFound):
            code, message = 404, str(exc)
        elif isinstance(exc, ConfigurationError):
            code, message = 400, str(exc)
        else:
            code, message = 500, type(exc).__name__
        return page(request, "error.html", code, nav="", code=code, message=message)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await tide.close()

    return Starlette(
        routes=[
            Route("/", home),
            Route("/runs", runs),
            Route("/run", run),
            Route("/usage", usage),
            Mount(
                "/static", StaticFiles(packages=[("tidebase_agents._ui", "static")]), name="static"
            ),
        ],
        middleware=[Middleware(Guard, token=token)],
        exception_handlers={TidebaseError: failed},
        lifespan=lifespan,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _choices(current: str) -> list[str]:
    return list(views.SINCE_CHOICES) + (
        [current] if current and current not in views.SINCE_CHOICES else []
    )
