"""Approvals and durable waits across real processes, on both backends (W1).

Each phase runs in a child process of its own (``waits_app`` scenarios): one starts the run
and parks it waiting for approval, another approves or rejects (or the CLI does), a third
invokes the run again. A crash inside the approved tool is an ``os._exit`` right after its
external write. Workers are ``tidebase-agents worker`` processes (``waits_worker_app``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit_common import CRASH_CODE, ExternalApi, read_lines
from wk_support import CLI, child_env, cli, stop_process, wait_for
from zygote import Forked, Zygote

from tidebase_agents import RunStatus, Tidebase

pytestmark = pytest.mark.crash


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    """Forks the child processes with the SDK already imported (see ``support/zygote.py``)."""
    server = Zygote(["waits_app"])
    yield server
    server.close()


class Children:
    """Runs ``waits_app`` scenarios, each in a fresh child process forked by the zygote."""

    def __init__(self, zygote: Zygote, directory: Path) -> None:
        self.zygote = zygote
        self.directory = directory / "children"
        self.count = 0

    def start(self, scenario: str, **kwargs: Any) -> Forked:
        self.count += 1
        return self.zygote.spawn(
            f"waits_app:{scenario}", kwargs, self.directory, f"{self.count}-{scenario}"
        )

    async def run(self, scenario: str, **kwargs: Any) -> tuple[int | None, dict[str, Any]]:
        """The child's exit status and its report (empty if it printed none)."""
        forked = self.start(scenario, **kwargs)
        status = await forked.wait(120)
        if status is None:
            raise AssertionError(f"{scenario} hung: {await forked.stop()}")
        return status, forked.report or {}

    async def ok(self, scenario: str, **kwargs: Any) -> dict[str, Any]:
        status, report = await self.run(scenario, **kwargs)
        assert status == 0 and report, f"{scenario}: {status} {report}"
        return report


@pytest.fixture
def children(zygote: Zygote, tmp_path: Path) -> Children:
    return Children(zygote, tmp_path)


async def run_status(url: str, run_id: str) -> RunStatus:
    tide = Tidebase(url)
    try:
        return (await tide.get_run(run_id)).status
    finally:
        await tide.close()


@pytest.mark.parametrize("nested", [False, True], ids=["direct", "agent-as-tool"])
async def test_paused_run_approved_by_another_process_runs_the_tool_once(
    db_url: str, tmp_path: Path, children: Children, nested: bool
) -> None:
    d = str(tmp_path)
    started = await children.ok("start_refund", url=db_url, run_id="p", directory=d, nested=nested)
    assert started["parked"] == "ApprovalRequired", started
    (pending,) = started["pending"]
    assert (pending["agent"], pending["tool"], pending["arguments"]) == (
        "payer",
        "refund",
        '{"amount":5}',
    )
    assert await run_status(db_url, "p") == RunStatus.WAITING
    assert not Path(d, "api-attempts.log").exists()

    assert await children.ok("decide", url=db_url, run_id="p", call_id=pending["call_id"]) == {
        "outcome": "ok",
        "decision": "approve",
    }
    resumed = await children.ok("resume_refund", url=db_url, run_id="p", directory=d)
    prefix = "manager: payer: " if nested else "payer: "
    assert resumed["result"] == f"{prefix}refunded 5 (T-1)"
    again = await children.ok("resume_refund", url=db_url, run_id="p", directory=d)
    assert again["result"] == resumed["result"]
    api = ExternalApi(d)
    assert len(api.attempt_rows()) == 1 and len(api.write_rows()) == 1


async def test_rejected_in_another_process_never_runs(
    db_url: str, tmp_path: Path, children: Children
) -> None:
    d = str(tmp_path)
    started = await children.ok("start_refund", url=db_url, run_id="r", directory=d)
    call_id = started["pending"][0]["call_id"]
    decided = await children.ok(
        "decide", url=db_url, run_id="r", call_id=call_id, approve=False, message="not allowed"
    )
    assert decided["decision"] == "reject"
    resumed = await children.ok("resume_refund", url=db_url, run_id="r", directory=d)
    assert resumed["result"] == "payer: not allowed"
    assert ExternalApi(d).attempt_rows() == []


async def test_crash_inside_an_approved_keyed_tool_re_executes_with_the_same_key(
    db_url: str, tmp_path: Path, children: Children
) -> None:
    d = str(tmp_path)
    started = await children.ok("start_refund", url=db_url, run_id="k", directory=d)
    await children.ok("decide", url=db_url, run_id="k", call_id=started["pending"][0]["call_id"])
    crashed, _ = await children.run(
        "resume_refund", url=db_url, run_id="k", directory=d, crash=True
    )
    assert crashed == CRASH_CODE
    resumed = await _until_unlocked(children, db_url, "k", d)
    assert resumed["result"] == "payer: refunded 5 (T-1)"
    api = ExternalApi(d)
    attempts = api.attempt_rows()
    assert len(attempts) == 2 and len({a["key"] for a in attempts}) == 1
    assert len(api.write_rows()) == 1


async def test_crash_inside_an_approved_unkeyed_tool_parks_it_for_review(
    db_url: str, tmp_path: Path, children: Children
) -> None:
    d = str(tmp_path)
    started = await children.ok("start_refund", url=db_url, run_id="u", directory=d, keyed=False)
    await children.ok("decide", url=db_url, run_id="u", call_id=started["pending"][0]["call_id"])
    crashed, _ = await children.run(
        "resume_refund", url=db_url, run_id="u", directory=d, keyed=False, crash=True
    )
    assert crashed == CRASH_CODE
    resumed = await _until_unlocked(children, db_url, "u", d, keyed=False)
    assert resumed["outcome"] == "StepNeedsReview", resumed
    assert await run_status(db_url, "u") == RunStatus.MANUAL_REVIEW
    assert len(ExternalApi(d).attempt_rows()) == 1  # never blindly repeated


async def _until_unlocked(
    children: Children, url: str, run_id: str, d: str, **kwargs: Any
) -> dict[str, Any]:
    """Resume in a new process once the dead executor's lease has expired."""
    for _ in range(60):
        _, report = await children.run(
            "resume_refund", url=url, run_id=run_id, directory=d, **kwargs
        )
        if report.get("outcome") != "RunLocked":
            return report
        await asyncio.sleep(0.5)
    raise AssertionError("the run stayed locked")


async def test_two_concurrent_deciders_of_one_call_exactly_one_wins(
    db_url: str, tmp_path: Path, children: Children
) -> None:
    started = await children.ok("start_refund", url=db_url, run_id="c", directory=str(tmp_path))
    call_id = started["pending"][0]["call_id"]
    # Both children are forked before either decides; the database orders them.
    deciders = [
        children.start("decide", url=db_url, run_id="c", call_id=call_id, approve=approve)
        for approve in (True, False)
    ]
    outcomes = []
    for forked in deciders:
        assert await forked.wait(120) == 0
        assert forked.report is not None
        outcomes.append(forked.report)
    kinds = sorted(o["outcome"] for o in outcomes)
    assert kinds == ["DecisionConflict", "ok"], outcomes
    (winner,) = [o["decision"] for o in outcomes if o["outcome"] == "ok"]
    tide = Tidebase(db_url)
    try:
        (record,) = await tide.approvals("c")
        decided = [e for e in await tide.events("c") if e.kind == "approval_decided"]
    finally:
        await tide.close()
    assert record.decision == winner and len(decided) == 1


async def test_cli_shows_waiting_runs_and_approves_them(
    db_url: str, tmp_path: Path, children: Children
) -> None:
    d = str(tmp_path)
    started = await children.ok("start_refund", url=db_url, run_id="cli", directory=d)
    call_id = started["pending"][0]["call_id"]
    listed = cli("runs", "list", "--status", "waiting", url=db_url)
    assert listed.returncode == 0 and "cli" in listed.stdout, listed.stderr
    shown = cli("runs", "show", "cli", url=db_url)
    assert shown.returncode == 0, shown.stderr
    assert call_id in shown.stdout and '{"amount":5}' in shown.stdout
    assert "pending" in shown.stdout and "waiting" in shown.stdout
    approved = cli("runs", "approve", "cli", call_id, url=db_url)
    assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr
    resumed = await children.ok("resume_refund", url=db_url, run_id="cli", directory=d)
    assert resumed["result"] == "payer: refunded 5 (T-1)"
    sent = cli("runs", "send", "cli", "topic", "{}", url=db_url)
    assert sent.returncode == 1 and "ended" in sent.stderr


def _worker(url: str, d: Path, name: str) -> subprocess.Popen[bytes]:
    with (d / f"{name}.log").open("wb") as fh:
        return subprocess.Popen(
            [
                *CLI,
                "--database-url",
                url,
                "worker",
                "--app",
                "waits_worker_app:tide",
                "--poll-interval",
                "0.2",
                "--reconcile-interval",
                "0.5",
                "--no-listen",
            ],
            env=child_env(WAITS_DIR=str(d)),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


async def test_durable_sleep_survives_a_restart_and_a_worker_resumes_it(
    db_url: str, tmp_path: Path, children: Children
) -> None:
    tide = Tidebase(db_url)
    try:
        run_id = await tide._enqueue("sleeper", {"args": [1.0], "kwargs": {}}, None)
        first = _worker(db_url, tmp_path, "w1")
        try:
            await wait_for(
                lambda: _status_is(tide, run_id, RunStatus.WAITING), "the sleep to park the run"
            )
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        second = _worker(db_url, tmp_path, "w2")
        try:
            await wait_for(
                lambda: _status_is(tide, run_id, RunStatus.COMPLETED), "a worker to finish it"
            )
        finally:
            stop_process(second)
        lines = read_lines(tmp_path / "sleeper.log")
        assert [ln.split()[0] for ln in lines] == ["before", "after"]
        assert lines[0].split()[1] == str(first.pid) and lines[1].split()[1] == str(second.pid)
        events = await tide.events(run_id)
        (parked,) = [e for e in events if e.kind == "run_waiting"]
        (done,) = [e for e in events if e.kind == "run_completed"]
        assert done.created_at >= dt.datetime.fromisoformat(parked.data["wake_at"])
    finally:
        await tide.close()


DIRECT_SLEEP = """
import asyncio, sys
import waits_worker_app as app
from tidebase_agents import RunWaiting

async def main() -> None:
    try:
        await app.sleeper.with_run_id(sys.argv[1])(1.0)
    except RunWaiting:
        print("parked")
    await app.tide.close()

asyncio.run(main())
"""


async def test_a_direct_call_run_that_sleeps_is_finished_by_a_worker_when_due(
    db_url: str, tmp_path: Path
) -> None:
    """P4 and W1 together: a run started by a direct call parks in ``sleep``; its caller
    exits; a worker serving the pipeline (``recover`` on) takes it once it is due."""
    tide = Tidebase(db_url)
    try:
        caller = subprocess.run(
            [sys.executable, "-c", DIRECT_SLEEP, "direct-sleeper"],
            env=child_env(url=db_url, WAITS_DIR=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert caller.stdout.strip() == "parked", caller.stdout + caller.stderr
        run = await tide.get_run("direct-sleeper")
        assert run.status == RunStatus.WAITING and run.queue is None
        worker = _worker(db_url, tmp_path, "w")
        try:
            await wait_for(
                lambda: _status_is(tide, "direct-sleeper", RunStatus.COMPLETED),
                "a worker to finish the direct-call run",
            )
        finally:
            stop_process(worker)
        lines = read_lines(tmp_path / "sleeper.log")
        assert [ln.split()[0] for ln in lines] == ["before", "after"]
        # The caller's process ran the first step, the worker the second.
        assert lines[0].split()[1] != str(worker.pid) and lines[1].split()[1] == str(worker.pid)
        assert (await tide.get_run("direct-sleeper")).output == "rested"
    finally:
        await tide.close()


async def test_a_queued_run_waiting_for_approval_is_resumed_by_a_worker_once_decided(
    db_url: str, tmp_path: Path, children: Children
) -> None:
    tide = Tidebase(db_url)
    worker = _worker(db_url, tmp_path, "w")
    try:
        run_id = await tide._enqueue(
            "refund", {"args": ["refund order 9", False], "kwargs": {}}, None
        )
        await wait_for(lambda: _status_is(tide, run_id, RunStatus.WAITING), "the run to park")
        (pending,) = await tide.approvals(run_id)
        decided = await children.ok("decide", url=db_url, run_id=run_id, call_id=pending.call_id)
        assert decided["decision"] == "approve"
        await wait_for(lambda: _status_is(tide, run_id, RunStatus.COMPLETED), "the worker")
        assert (await tide.get_run(run_id)).output == "payer: refunded 5 (T-1)"
        assert len(ExternalApi(tmp_path).write_rows()) == 1
    finally:
        stop_process(worker)
        await tide.close()


async def _status_is(tide: Tidebase, run_id: str, status: RunStatus) -> bool:
    return (await tide.get_run(run_id)).status == status


def test_the_refund_recipe_runs_offline(tmp_path: Path) -> None:
    """``python cookbook/refund_approval.py``, as the README says: parked, approved by the CLI
    in another process, finished by a third; one refund."""
    recipe = Path(__file__).parents[2] / "cookbook" / "refund_approval.py"
    proc = subprocess.run(
        [sys.executable, str(recipe)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "waiting for approval: issue_refund" in proc.stdout
    assert ": approved" in proc.stdout
    assert "Your refund is on its way (R-1)." in proc.stdout
    assert "refunds issued: 1 -> ['R-1']" in proc.stdout
