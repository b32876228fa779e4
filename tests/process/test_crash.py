"""Crash tests (R5, R1 across processes): a real child process dies (``os._exit`` or SIGKILL)
at a chosen point and the run is resumed by another process once the dead executor's short
lease (1 s) has expired.

Executions are counted in a log file the step functions append to (see ``child_support``).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from child_support import (
    crash_between,
    crash_effect,
    finish,
    read_lines,
    run_scenario,
    start,
    wait_file_or_exit,
)

from tidebase_agents import StepNeedsReview, Tidebase

pytestmark = pytest.mark.crash


async def records(db_url: str, run_id: str) -> tuple[Any, dict[str, Any], list[Any]]:
    tide = Tidebase(db_url)
    try:
        run = await tide.get_run(run_id)
        steps = {s.name: s for s in await tide.steps(run_id)}
        events = await tide.store.get_events(run_id)
        return run, steps, events
    finally:
        await tide.close()


async def test_r5_killed_between_steps_resumes_without_rerunning_finished_steps(
    db_url: str, tmp_path: Path
) -> None:
    """R5/R1: a process dying between steps (os._exit after s2) leaves s1 and s2 completed;
    another process resumes after the lease expires, replays them with their recorded types
    and never re-runs them; s3 runs once."""
    log = tmp_path / "log"
    crashed = await run_scenario(
        "crash_between", url=db_url, run_id="cb", log=str(log), phase="crash"
    )
    assert crashed.returncode == 17, crashed.stderr
    assert read_lines(log) == ["s1", "s2"]
    run, steps, _ = await records(db_url, "cb")
    assert run.status == "running"  # the dead executor still "holds" it
    assert {n: s.status for n, s in steps.items()} == {"s1": "completed", "s2": "completed"}

    # Resume in this process (not the one that died), once the 1 s lease has expired.
    resumed = await crash_between(db_url, "cb", str(log), phase="resume")
    assert read_lines(log) == ["s1", "s2", "s3"], "a finished step ran again"
    assert resumed["types"] == ["Point", "Box", "tuple", "datetime", "bytes", "set"]
    assert resumed["p"] == {"x": 1, "y": 2, "tags": ["a"]}
    assert resumed["when"] == "2024-05-01T12:00:00+00:00"

    run, steps, events = await records(db_url, "cb")
    assert run.status == "completed"
    assert run.attempts == 2
    assert all(s.status == "completed" and s.attempts == 1 for s in steps.values())
    kinds = [e.kind for e in events]
    assert kinds.count("lease_taken_over") == 1
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def kill_inside_charge(db_url: str, tmp_path: Path, run_id: str, keyed: bool) -> Path:
    """Run crash_effect in a child and SIGKILL it inside the side-effecting step."""
    log = tmp_path / "log"
    proc = await start(
        "crash_effect",
        url=db_url,
        run_id=run_id,
        log=str(log),
        dir=str(tmp_path),
        keyed=keyed,
        phase="crash",
    )
    try:
        await wait_file_or_exit(tmp_path / "inside", proc)
    finally:
        proc.kill()
    res = await finish(proc)
    assert res.returncode == -signal.SIGKILL
    return log


async def test_r5_killed_inside_keyed_side_effect_reexecutes_once_with_the_same_key(
    db_url: str, tmp_path: Path
) -> None:
    """R5: a keyed external write left in doubt by a SIGKILLed process is re-executed exactly
    once on resume, with the same idempotency key; the attempt count and an event record it."""
    log = await kill_inside_charge(db_url, tmp_path, "ck", keyed=True)
    key = "charge-key-ck"
    assert read_lines(log) == ["prepare", f"charge key={key}"]
    _, steps, _ = await records(db_url, "ck")
    assert steps["charge"].status == "running"  # the intent record of the in-doubt write
    assert steps["charge"].idempotency_key == key

    # Resume in this process (not the one that died), once the 1 s lease has expired.
    out = await crash_effect(db_url, "ck", str(log), str(tmp_path), keyed=True, phase="resume")
    assert out == {"result": {"charged": True}}
    assert read_lines(log) == ["prepare", f"charge key={key}", f"charge key={key}", "notify"]

    run, steps, events = await records(db_url, "ck")
    assert run.status == "completed"
    charge = steps["charge"]
    assert (charge.status, charge.attempts, charge.idempotency_key, charge.keyed) == (
        "completed",
        2,
        key,
        True,
    )
    in_doubt = [e for e in events if e.kind == "step_in_doubt"]
    assert len(in_doubt) == 1
    assert in_doubt[0].step == "charge"
    assert in_doubt[0].data == {"action": "reexecute", "idempotency_key": key}


async def test_r5_killed_inside_unkeyed_side_effect_parks_for_review_without_refiring(
    db_url: str, tmp_path: Path
) -> None:
    """R5/R4: an unkeyed external write left in doubt parks as manual_review: resuming raises
    StepNeedsReview and the side effect does not fire again; after an operator supplies its
    output the run finishes without firing it."""
    log = await kill_inside_charge(db_url, tmp_path, "cu", keyed=False)
    assert read_lines(log) == ["prepare", "charge key=None"]

    for _ in range(2):
        with pytest.raises(StepNeedsReview) as info:
            await crash_effect(db_url, "cu", str(log), str(tmp_path), keyed=False, phase="resume")
        assert info.value.step == "charge"
    assert read_lines(log) == ["prepare", "charge key=None"], "the in-doubt write fired again"

    run, steps, events = await records(db_url, "cu")
    assert run.status == "manual_review"
    assert steps["charge"].status == "manual_review"
    assert steps["charge"].attempts == 1
    in_doubt = [e for e in events if e.kind == "step_in_doubt"]
    assert [(e.step, e.data["action"]) for e in in_doubt] == [("charge", "manual_review")]

    tide = Tidebase(db_url)
    try:
        await tide.review_step("cu", "charge", "output", {"charged": "by operator"})
    finally:
        await tide.close()
    out = await crash_effect(db_url, "cu", str(log), str(tmp_path), keyed=False, phase="resume")
    assert out == {"result": {"charged": "by operator"}}
    assert read_lines(log) == ["prepare", "charge key=None", "notify"]
