"""What the CLI prints, on SQLite and PostgreSQL, run in this process as a console script runs
(no terminal: CliRunner's output is not one): one run a line at 80 columns and without a
terminal, repeatable filters, each field `runs show` gives a step, `-v`, read-only commands
on an SQLite file that does not exist, and a resumed pipeline that raises."""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tidebase_agents import Run, StepNeedsReview, Tidebase
from tidebase_agents._cli import app
from tidebase_agents._store import close_stores

STATUS = re.compile(
    r"\b(queued|running|completed|failed|failed_retryable|manual_review|cancelled)\b"
)
LONG_ERROR = "the model gateway answered 503 while the request was retried\nsecond line " * 3


class Crash(BaseException):
    """Ends an execution in the middle of a step, as a process dying there would."""


def prepare(work: Callable[[Tidebase], Awaitable[Any]], url: str) -> None:
    async def main() -> None:
        tide = Tidebase(url)
        try:
            await work(tide)
        finally:
            await close_stores()

    asyncio.run(main())


def invoke(url: str, *args: str, columns: int | None = None, **env: str | None) -> Any:
    result = CliRunner().invoke(
        app,
        ["--database-url", url, *args],
        env={"COLUMNS": None if columns is None else str(columns), **env},
    )
    return result


def ok(result: Any) -> list[str]:
    assert result.exit_code == 0, (result.exit_code, result.output)
    return str(result.stdout).splitlines()


def failed(result: Any, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    line = str(result.stderr)
    assert line.count("\n") == 1 and "Traceback" not in line, line
    return line


async def seven_runs(tide: Tidebase) -> None:
    """Six runs of one pipeline that failed with a long two-line error (default run ids, 36
    characters each), one completed run of a pipeline with a long name."""

    async def boom(run: Run, inp: Any) -> None:
        raise RuntimeError(LONG_ERROR)

    async def fine(run: Run, inp: Any) -> str:
        return "ok"

    for _ in range(6):
        with pytest.raises(RuntimeError):
            await tide.run("gateway", boom)
    await tide.run("research-pipeline-with-a-rather-long-name", fine, run_id="done-1")


def listing(lines: list[str], width: int) -> list[str]:
    """The run lines of `runs list`, checked: a summary line, a header, each run on one line
    within ``width``, its whole status readable."""
    summary, header, *rows = lines
    assert summary.startswith("7 runs, newest first"), summary
    assert header.split()[:3] == ["RUN", "PIPELINE", "STATUS"]
    assert len(rows) == 7
    for row in lines:
        assert len(row) <= width, (len(row), row)
    for row in rows:
        assert STATUS.search(row), row
        assert re.match(r"(run-[0-9a-f]{32}|done-1) ", row), row
    return rows


def test_runs_list_at_80_columns_is_one_run_a_line(db_url: str) -> None:
    prepare(seven_runs, db_url)
    rows = listing(ok(invoke(db_url, "runs", "list", columns=80)), 80)
    assert sum("failed_retryable" in r for r in rows) == 6
    assert rows[0].startswith("done-1") and "completed" in rows[0]  # newest first
    assert re.search(r" research-pipel\S*… ", rows[0]), rows[0]  # a long name, cut


def test_runs_list_without_a_terminal_cuts_errors_and_show_has_them_whole(db_url: str) -> None:
    prepare(seven_runs, db_url)
    lines = ok(invoke(db_url, "runs", "list"))
    rows = listing(lines, 120)
    failing = [r for r in rows if "failed_retryable" in r]
    assert all(re.search(r"  RuntimeError: the model \S*…$", r) for r in failing), failing
    assert "second line" not in "".join(failing)  # cut, on one line
    run_id = failing[0].split()[0]
    text = "\n".join(ok(invoke(db_url, "runs", "show", run_id, columns=80)))
    assert " ".join(text.split()).count(" ".join(LONG_ERROR.split())) == 1
    assert all(len(line) <= 80 for line in text.splitlines() if not line.startswith("run "))


def test_runs_list_filters_repeat(db_url: str) -> None:
    async def runs(tide: Tidebase) -> None:
        async def fine(run: Run, inp: Any) -> str:
            return "ok"

        async def boom(run: Run, inp: Any) -> None:
            raise RuntimeError("no")

        await tide.run("p1", fine, run_id="a")
        with pytest.raises(RuntimeError):
            await tide.run("p2", boom, run_id="b")
        await tide.run("p3", fine, run_id="c")
        await tide._enqueue("p1", None, None, run_id="q1", queue="slow")
        await tide._enqueue("p2", None, None, run_id="q2", queue="fast")

    prepare(runs, db_url)

    def ids(*args: str) -> list[str]:
        return sorted(line.split()[0] for line in ok(invoke(db_url, "runs", "list", *args))[2:])

    assert ids("--status", "completed", "--status", "failed_retryable") == ["a", "b", "c"]
    assert ids("--status", "completed,queued") == ["a", "c", "q1", "q2"]
    assert ids("--pipeline", "p1", "--pipeline", "p2") == ["a", "b", "q1", "q2"]
    assert ids("--queue", "slow", "--queue", "fast", "--status", "queued") == ["q1", "q2"]
    assert ids("--pipeline", "p1", "--queue", "slow") == ["q1"]
    bad = invoke(db_url, "runs", "list", "--status", "completed,bogus")
    assert bad.exit_code == 2 and "'bogus' is not one of" in bad.stderr  # a usage error


# -- each field `runs show` gives a step -------------------------------------------------------


def show(url: str, run_id: str) -> dict[str, str]:
    """`runs show` at 80 columns: each step's entry as one line (wrapping undone), by name."""
    lines = ok(invoke(url, "runs", "show", run_id, columns=80))
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    section = "\n".join(lines).split("\n\n")[1]
    entries = re.split(r"^ *\d+\. ", section, flags=re.M)[1:]
    return {
        entry.split("\n", 1)[0].strip(): " ".join(entry.split("\n", 1)[1].split())
        for entry in entries
    }


def test_runs_show_gives_each_steps_input(db_url: str) -> None:
    async def run(tide: Tidebase) -> None:
        async def body(run: Run, topic: str) -> str:
            await run.step("plain", lambda: 1)
            await run.step("search", lambda: "x", input={"query": topic, "top": 3})
            return await run.step("big", lambda: "y", input={"text": "z" * 6000})

        await tide.run("inputs", body, run_id="in-1", input="tides")

    prepare(run, db_url)
    steps = show(db_url, "in-1")
    assert "input:" not in steps["plain"]
    assert 'input: {"query": "tides", "top": 3}' in steps["search"]
    assert 'input (6011 bytes, its start kept): {"text":"zzzz' in steps["big"]
    assert steps["big"].endswith("…")


def test_runs_show_gives_the_idempotency_key_of_side_effecting_steps(db_url: str) -> None:
    async def run(tide: Tidebase) -> None:
        async def body(run: Run, inp: Any) -> None:
            await run.step("pay", lambda: 1, side_effects=["payments"], idempotency_key="order-7")
            await run.step("mail", lambda: 2, side_effects=["mail"])
            await run.step("think", lambda: 3)

        await tide.run("keys", body, run_id="keys-1")

    prepare(run, db_url)
    steps = show(db_url, "keys-1")
    assert "side effects: payments" in steps["pay"]
    assert "idempotency key: order-7" in steps["pay"]
    assert re.search(r"idempotency key: tb-[0-9a-f]{40}$", steps["mail"]), steps["mail"]
    assert "idempotency key" not in steps["think"]


def test_runs_show_gives_each_steps_error(db_url: str) -> None:
    async def run(tide: Tidebase) -> None:
        async def body(run: Run, inp: Any) -> None:
            def fail() -> None:
                raise ValueError("the quota of the search API is spent " * 4)

            await run.step("search", fail, replay="never")

        with pytest.raises(ValueError):
            await tide.run("errors", body, run_id="err-1")

    prepare(run, db_url)
    steps = show(db_url, "err-1")
    assert steps["search"].startswith("failed, 1 try")
    message = " ".join(("the quota of the search API is spent " * 4).split())
    assert f"error: ValueError: {message}" in steps["search"]
    assert steps["search"].endswith("spent")  # the whole message, not cut


def test_runs_show_says_a_step_was_replayed(db_url: str) -> None:
    async def run(tide: Tidebase) -> None:
        attempts: list[int] = []

        async def body(run: Run, inp: Any) -> str:
            await run.step("research", lambda: "notes")
            attempts.append(run.attempt)
            if len(attempts) < 3:
                raise RuntimeError("interrupted")
            return "done"

        for _ in range(2):
            with pytest.raises(RuntimeError):
                await tide.run("replays", body, run_id="rep-1")
        await tide.run("replays", body, run_id="rep-1")

    prepare(run, db_url)
    steps = show(db_url, "rep-1")
    assert (
        "executed in attempt 1; replayed from its checkpoint in attempts 2-3" in steps["research"]
    )


def crash_in_side_effect(key: str | None) -> Callable[[Tidebase], Awaitable[Any]]:
    """Attempt 1 dies inside a side-effecting step (its intent record is left running);
    attempt 2 finds the step in doubt."""

    async def run(tide: Tidebase) -> None:
        calls: list[int] = []

        async def body(run: Run, inp: Any) -> str:
            def send() -> str:
                calls.append(run.attempt)
                if len(calls) == 1:
                    raise Crash
                return "sent"

            return await run.step("send", send, side_effects=["mail"], idempotency_key=key)

        with pytest.raises(Crash):
            await tide.run("doubt", body, run_id="doubt-1")
        try:
            await tide.run("doubt", body, run_id="doubt-1")
        except StepNeedsReview:
            assert key is None

    return run


def test_runs_show_says_a_keyed_step_in_doubt_was_re_executed(db_url: str) -> None:
    prepare(crash_in_side_effect("mail-42"), db_url)
    steps = show(db_url, "doubt-1")
    assert steps["send"].startswith("completed, 2 tries")
    assert (
        "in doubt: attempt 1 died during it; re-executed in attempt 2 with the same "
        "idempotency key" in steps["send"]
    )
    assert "executed in attempt 1" not in steps["send"]


def test_runs_show_says_an_unkeyed_step_in_doubt_was_parked(db_url: str) -> None:
    prepare(crash_in_side_effect(None), db_url)
    steps = show(db_url, "doubt-1")
    assert steps["send"].startswith("manual_review")
    assert (
        "in doubt: attempt 1 died during it (an external write without an idempotency key); "
        "parked for review in attempt 2" in steps["send"]
    )
    assert "waits for review: `tidebase-agents steps review doubt-1 send" in steps["send"]


# -- databases ---------------------------------------------------------------------------------


def test_read_only_commands_do_not_create_a_missing_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TIDEBASE_DATABASE_URL", raising=False)
    runner = CliRunner()
    for args in (
        ["runs", "list"],
        ["runs", "show", "r"],
        ["runs", "cancel", "r"],
        ["runs", "resume", "r", "--enqueue"],
        ["steps", "review", "r", "s", "--retry"],
        ["usage"],
    ):
        line = failed(runner.invoke(app, args))
        assert f"no SQLite database at {tmp_path / 'tidebase.db'} (nothing was created)" in line
    elsewhere = tmp_path / "data" / "runs.db"
    line = failed(runner.invoke(app, ["--database-url", f"sqlite:///{elsewhere}", "runs", "list"]))
    assert f"no SQLite database at {elsewhere}" in line
    assert list(tmp_path.iterdir()) == []
    # migrate creates it; then the same commands read it.
    assert runner.invoke(app, ["migrate"]).exit_code == 0
    assert ok(runner.invoke(app, ["runs", "list"])) == ["0 runs, newest first"]


def test_verbose_says_which_database_without_its_password(db_url: str) -> None:
    prepare(lambda tide: tide.migrate(), db_url)
    url = db_url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores the password
    result = invoke(url, "-v", "runs", "list")
    assert result.exit_code == 0, result.output
    (line,) = str(result.stderr).splitlines()
    if db_url.startswith("postgres"):
        assert re.fullmatch(
            r"database: postgresql\+asyncpg://postgres:\*\*\*@.+ \(schema tidebase\)", line
        )
    else:
        assert line == f"database: sqlite+aiosqlite:///{db_url.split(':///', 1)[1]}"
    assert "s3cret" not in result.output


def test_runs_resume_of_a_pipeline_that_raises_is_one_line(db_url: str, tmp_path: Path) -> None:
    app_dir = tmp_path / "project"
    app_dir.mkdir()
    (app_dir / "raising_app.py").write_text(
        textwrap.dedent(
            """
            from tidebase_agents import checkpointed_pipeline, current_run

            @checkpointed_pipeline("raising")
            async def raising(n: int) -> int:
                await current_run().step("first", lambda: n)
                raise RuntimeError(f"step two broke on {n}\\nwith details")
            """
        )
    )

    async def run(tide: Tidebase) -> None:
        data = {"args": [3], "kwargs": {}}
        from tidebase_agents._hashing import sha256_hex

        await tide._enqueue("raising", data, sha256_hex(data), run_id="raise-1")

    prepare(run, db_url)
    result = invoke(
        db_url, "runs", "resume", "raise-1", "--app", "raising_app", "--app-dir", str(app_dir)
    )
    line = failed(result)
    assert (
        line
        == "error: run raise-1 did not complete: RuntimeError: step two broke on 3 with details\n"
    )
