"""The run inspector in a real headless browser (Chromium driven by Selenium), over databases
seeded by real pipelines on SQLite and PostgreSQL (P2: runs, step timelines, usage).

Every read of the page goes through one ``execute_script`` call, so a self-refresh swapping
the page between two reads cannot mix two versions of it.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import fresh_pg_database, pg_admin, pg_url_of
from ui_support import (
    DIGESTS,
    HOSTILE,
    HOSTILE_STEP,
    IN_DOUBT,
    PARKED,
    PAYLOAD,
    PRICED_MODELS,
    PROBE,
    REQUIRE_BROWSER,
    RESUMED,
    SCRIPTED_MODEL,
    SEEDED,
    browser_missing,
    chromium,
    seed,
    served,
)

from tidebase_agents import Tidebase

pytestmark = pytest.mark.browser

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGE_SIZE = 4

ROWS = (
    "return [...document.querySelectorAll('tr.run')].map(r => [r.dataset.runId, r.dataset.status])"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = browser_missing()
    if reason is not None:
        if REQUIRE_BROWSER:
            pytest.fail(
                f"the browser tests are required (TIDEBASE_TEST_REQUIRE_BROWSER=1): {reason}"
            )
        pytest.skip(reason)
    with chromium() as driver:
        yield driver


class Inspector:
    def __init__(self, base: str, url: str, backend: str, driver: Any) -> None:
        self.base, self.url, self.backend, self.driver = base, url, backend, driver

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def read(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def rows(self, path: str) -> list[list[str]]:
        self.open(path)
        return self.read(ROWS)  # type: ignore[no-any-return]

    def run_ids(self, path: str) -> list[str]:
        return [run_id for run_id, _ in self.rows(path)]

    async def steps(self, run_id: str) -> list[str]:
        tide = Tidebase(self.url)
        try:
            return [s.name for s in await tide.steps(run_id)]
        finally:
            await tide.close()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def inspector(
    request: pytest.FixtureRequest,
    browser: Any,
    tmp_path_factory: pytest.TempPathFactory,
    pg_template: str | None,
) -> Iterator[Inspector]:
    """The inspector over a freshly seeded database, served on a loopback port."""
    from tidebase_agents._ui.app import create_app

    directory = tmp_path_factory.mktemp(f"inspector-{request.param}")
    database = None
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'tidebase.db'}"
    else:
        if pg_template is None:
            pytest.skip("PostgreSQL not reachable (set TIDEBASE_TEST_REQUIRE_PG=1 to require it)")
        database = fresh_pg_database(pg_template)
        url = pg_url_of(database)
    try:
        asyncio.run(seed(url, directory))
        with served(create_app(url, page_size=PAGE_SIZE)) as base:
            yield Inspector(base, url, request.param, browser)
    finally:
        if database is not None:
            pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def test_runs_page_lists_every_seeded_run_once_across_its_pages(inspector: Inspector) -> None:
    seen: list[list[str]] = []
    path: str | None = "/runs"
    pages = 0
    while path is not None:
        seen += inspector.rows(path)
        pages += 1
        assert len(seen) <= len(SEEDED), "paging went round in circles"
        path = inspector.read(
            "const a = document.querySelector('nav.pages a.older');"
            "return a ? a.getAttribute('href') : null"
        )
    statuses = dict((run_id, status) for run_id, status in seen)
    assert sorted(r for r, _ in seen) == sorted(SEEDED)  # each exactly once
    assert pages == -(-len(SEEDED) // PAGE_SIZE)
    assert statuses[RESUMED] == "completed"
    assert statuses[PARKED] == "manual_review"
    assert statuses[IN_DOUBT] == "running"
    assert statuses[PROBE] == "queued"
    newest = inspector.read(
        "const a = document.querySelector('nav.pages a[rel=first]'); return a && a.textContent"
    )
    assert newest is not None  # a deep page links back to the newest


def test_filters_narrow_the_runs_and_live_in_the_url(inspector: Inspector) -> None:
    assert inspector.run_ids("/runs?status=manual_review") == [PARKED]
    both = inspector.run_ids("/runs?status=manual_review&status=running")
    assert sorted(both) == sorted([PARKED, IN_DOUBT])
    assert sorted(inspector.run_ids("/runs?pipeline=digest")) == sorted(DIGESTS)
    assert inspector.run_ids("/runs?queue=mail") == [PROBE]
    assert inspector.run_ids("/runs?since=2000-01-01T00:00:00&pipeline=probe") == [PROBE]
    assert inspector.run_ids("/runs?since=2999-01-01T00:00:00") == []

    # The form writes the same query: tick a status on a filtered page and submit.
    inspector.open("/runs?pipeline=digest")
    inspector.read(
        "document.querySelector('input[name=status][value=failed]').checked = true;"
        "document.querySelector('form.filters').submit()"
    )
    query = inspector.read(
        "const q = new URLSearchParams(location.search);"
        "return [location.pathname, q.getAll('status'), q.get('pipeline')]"
    )
    assert query == ["/runs", ["failed"], "digest"]
    assert inspector.read(ROWS) == []
    assert inspector.read("return document.querySelector('p.empty').textContent") == (
        "No run matches."
    )


def test_run_page_draws_replayed_and_executed_steps_on_a_timeline(inspector: Inspector) -> None:
    names = asyncio.run(inspector.steps(RESUMED))
    researcher, writer = "agent:researcher#1", "agent:writer#1"
    (tool,) = [n for n in names if n.startswith(researcher + "/tool:create_ticket:")]
    assert sorted(names) == sorted([researcher, tool, writer])
    inspector.open(f"/run?id={RESUMED}")
    svg = inspector.read(
        """
        const svg = document.querySelector('svg.timeline');
        return {
          bars: [...svg.querySelectorAll('g.step-row')].map(g => ({
            step: g.dataset.step,
            cls: g.querySelector('rect.step-bar').getAttribute('class'),
            labelX: Number(g.querySelector('text.step-label').getAttribute('x')),
          })),
          attempts: [...svg.querySelectorAll('g.segment')].map(g => g.dataset.attempt),
          marks: [...svg.querySelectorAll('circle.replay-mark')].map(c => c.dataset.attempt),
          origins: Object.fromEntries([...document.querySelectorAll('details.step')].map(
            d => [d.querySelector('.step-name').textContent,
                  d.querySelector('summary .muted').textContent])),
        }
        """
    )
    bars = {b["step"]: b for b in svg["bars"]}
    assert [b["step"] for b in svg["bars"]] == [researcher, tool, writer]  # children after parents
    assert set(bars[researcher]["cls"].split()) >= {"step-bar", "status-completed", "replayed"}
    assert set(bars[tool]["cls"].split()) >= {"status-completed", "replayed"}
    assert set(bars[writer]["cls"].split()) >= {"status-completed", "executed"}
    assert "replayed" not in bars[writer]["cls"].split()
    assert bars[tool]["labelX"] > bars[researcher]["labelX"] == bars[writer]["labelX"]
    assert svg["attempts"] == ["1", "2"]
    assert svg["marks"] == ["2", "2"]  # the researcher and its tool, replayed in attempt 2
    assert svg["origins"][researcher] == "executed in attempt 1, replayed in 1 later attempt"
    assert svg["origins"][writer] == "executed in attempt 2"

    if inspector.backend == "sqlite":  # the README's pictures
        DOCS.mkdir(exist_ok=True)
        inspector.driver.save_screenshot(str(DOCS / "inspector-run.png"))
        inspector.open("/runs?pipeline=agentkit-research&pipeline=digest")
        inspector.driver.save_screenshot(str(DOCS / "inspector-runs.png"))


def test_parked_step_says_what_happened_and_the_commands_that_resolve_it(
    inspector: Inspector,
) -> None:
    # The parked tool call (its agent step's journaled model turn is the other step).
    (step,) = [s for s in asyncio.run(inspector.steps(PARKED)) if "/tool:" in s]
    inspector.open(f"/run?id={PARKED}")
    page = inspector.read(
        """
        const item = document.querySelector('#pending .pending-item.kind-manual_review');
        return {
          happened: item.querySelector('p').textContent,
          commands: [...item.querySelectorAll('code.command')].map(c => c.textContent),
          bars: [...document.querySelectorAll('svg.timeline rect.step-bar')]
            .map(b => b.getAttribute('class')),
        }
        """
    )
    review = ["tidebase-agents", "steps", "review", PARKED, step]
    assert page["commands"] == [
        shlex.join([*review, "--retry"]),
        shlex.join([*review, "--output", "JSON"]),
        shlex.join([*review, "--fail"]),
    ]
    # The step name holds '#': quoted, a shell reads the command back as the same arguments.
    assert "'" in page["commands"][0]
    assert shlex.split(page["commands"][0]) == [*review, "--retry"]
    assert "in doubt" in page["happened"] and "ticketing-api" in page["happened"]
    assert any("status-manual_review" in bar.split() for bar in page["bars"])


def test_in_doubt_step_is_drawn_as_such_and_says_how_to_resume(inspector: Inspector) -> None:
    inspector.open(f"/run?id={IN_DOUBT}")
    page = inspector.read(
        """
        const item = document.querySelector('#pending .pending-item.kind-in_doubt');
        return {
          happened: item.querySelector('p').textContent,
          commands: [...item.querySelectorAll('code.command')].map(c => c.textContent),
          bars: [...document.querySelectorAll('svg.timeline rect.step-bar')].map(
            b => b.getAttribute('class')),
        }
        """
    )
    assert any({"status-running", "in-doubt"} <= set(c.split()) for c in page["bars"])
    assert "idempotency key" in page["happened"]
    assert page["commands"] == [
        shlex.join(["tidebase-agents", "runs", "resume", IN_DOUBT, "--app", "MODULE:ATTR"])
    ]


def test_usage_chart_draws_bars_for_each_seeded_model(inspector: Inspector) -> None:
    inspector.open("/usage?bucket=hour&since=24h&by=model")
    page = inspector.read(
        """
        const bars = id => [...document.querySelectorAll(`#${id} svg.chart rect.chart-bar`)]
          .map(b => ({title: b.querySelector('title').textContent,
                      height: Number(b.getAttribute('height'))}));
        return {
          tokens: bars('tokens-chart'),
          cost: bars('cost-chart'),
          legend: [...document.querySelectorAll('ul.legend.series li')].map(
            li => li.textContent.trim()),
        }
        """
    )
    models = {SCRIPTED_MODEL, *PRICED_MODELS}
    assert set(page["legend"]) == models
    assert {t["title"].split(" · ")[1].split(":")[0] for t in page["tokens"]} == models
    assert all(b["height"] > 0 for b in page["tokens"])
    # Only priced models cost something; the scripted model's tokens are unpriced.
    assert {t["title"].split(" · ")[1].split(":")[0] for t in page["cost"]} == set(PRICED_MODELS)


def test_stored_markup_renders_as_text_and_runs_no_script(inspector: Inspector) -> None:
    inspector.open(f"/run?id={HOSTILE}")
    page = inspector.read(
        """
        return {
          pwned: window.__pwned === undefined ? null : window.__pwned,
          title: document.title,
          text: document.querySelector('main').innerText,
          scripts: [...document.scripts].map(s => s.getAttribute('src')),
          images: document.querySelectorAll('img').length,
          label: document.querySelector('svg.timeline text.step-label title').textContent,
          output: document.querySelector('details.step pre:last-of-type').textContent,
        }
        """
    )
    assert page["pwned"] is None
    assert page["title"] == f"Run {HOSTILE} · tidebase inspector"
    assert PAYLOAD in page["text"]  # visible, as text
    assert len(page["scripts"]) == 1 and page["scripts"][0].endswith("/static/inspector.js")
    assert page["images"] == 0
    assert page["label"] == HOSTILE_STEP  # the SVG drew the step name as text
    assert PAYLOAD in page["output"]
    logs = inspector.driver.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e["message"]], logs

    inspector.open("/runs?pipeline=hostile <b>pipeline</b>")
    cells = inspector.read(
        "return [...document.querySelectorAll('td.pipeline')].map("
        "td => [td.textContent, td.children.length])"
    )
    assert cells == [["hostile <b>pipeline</b>", 0]]


def test_a_live_page_refreshes_itself_until_its_runs_settle(inspector: Inspector) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    assert inspector.rows("/runs?pipeline=probe") == [[PROBE, "queued"]]
    assert inspector.read("return document.getElementById('live').dataset.refresh") == "3"

    async def cancel() -> None:
        tide = Tidebase(inspector.url)
        try:
            await tide.cancel(PROBE, "settled by the refresh test")
        finally:
            await tide.close()

    asyncio.run(cancel())
    WebDriverWait(inspector.driver, 20, poll_frequency=0.2).until(
        lambda d: d.execute_script(ROWS) == [[PROBE, "cancelled"]]
    )
    assert inspector.read("return 'refresh' in document.getElementById('live').dataset") is False
