"""A durable tool's own machinery failing: it never reaches the model, and a keyed tool is
recognised as keyed however its body reads the key (R3, R5, R15).

- A process killed inside a keyed tool, right after its external write, is resumed in a fresh
  process: the tool re-executes once with the same key, whether its body calls
  ``idempotency_key()`` by name, through a closure variable or through an import alias, and
  nothing is parked for review.
- A tool whose result cannot be checkpointed (a plain object, a cycle, a lone surrogate, a
  value nested 10,000 deep) stops the agent run with ``CheckpointSerializationError`` at the
  caller; the model is never handed the error, so it never calls the tool again under a new key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fault_apps
import pytest
from fault_hostile import expect_library_error, outcome
from fault_kit import Effects
from fault_report import REPORT, Checks
from fault_trials import Attempt, finish
from zygote import Zygote

from tidebase_agents import CheckpointSerializationError, Tidebase

pytestmark = pytest.mark.faults


async def ticketing_child(
    zygote: Zygote, url: str, workdir: Path, run_id: str, variant: str, label: str, crash: bool
) -> Attempt:
    child = zygote.spawn(
        "fault_apps:ticketing_attempt",
        {"url": url, "workdir": str(workdir), "run_id": run_id, "variant": variant, "crash": crash},
        workdir / "logs",
        label,
    )
    return await finish(child, label, 120)


@pytest.mark.parametrize("variant", ["direct", "closure", "alias"])
async def test_crash_inside_keyed_tool_reexecutes_with_the_same_key(
    backend_url: str, zygote: Zygote, tmp_path: Path, variant: str
) -> None:
    checks = Checks("machinery", f"crash in a tool keyed {variant} on {backend_url.split(':')[0]}")
    REPORT.kill_points[f"tool keyed {variant}"] += 1
    REPORT.kills += 1
    run_id = f"ticket-{variant}"
    first = await ticketing_child(zygote, backend_url, tmp_path, run_id, variant, "crash", True)
    assert first.killed, first.describe()
    second = await ticketing_child(zygote, backend_url, tmp_path, run_id, variant, "resume", False)
    checks.check(
        second.outcome == "ok",
        "keyed_call_parked" if second.outcome == "StepNeedsReview" else "resume_failed",
        second.describe(),
    )
    fx = Effects(tmp_path / "effects.db")
    attempts, effects = fx.rows("attempts"), fx.rows("effects")
    checks.check(len(effects) == 1, "keyed_effect_not_once", f"{len(effects)} tickets opened")
    checks.check(
        len(attempts) == 2 and len({a["key"] for a in attempts}) == 1,
        "keyed_call_under_several_keys",
        f"requests {[(a['key'], a['pid']) for a in attempts]}",
    )
    if second.outcome == "ok" and second.report is not None:
        checks.check(second.report["output"] == "opened T-bug", "output_differs", second.describe())
    tide = Tidebase(backend_url)
    steps = {s.name: s for s in await tide.steps(run_id)}
    await tide.close()
    tools = [s for name, s in steps.items() if "/tool:open_ticket:" in name]
    checks.check(
        [(s.status, s.attempts, s.keyed) for s in tools] == [("completed", 2, True)],
        "tool_step_wrong",
        f"tool steps {[(s.name, s.status, s.attempts, s.keyed) for s in tools]}",
    )
    checks.done()


def _cycle() -> Any:
    value: list[Any] = []
    value.append(value)
    return value


def _deep() -> Any:
    value: Any = 0
    for _ in range(10_000):
        value = [value]
    return value


UNSTORABLE = {
    "object": object,
    "cycle": _cycle,
    "surrogate": lambda: "ticket \ud800",
    "deep": _deep,
}


@pytest.mark.parametrize("kind", sorted(UNSTORABLE))
async def test_unstorable_tool_result_stops_the_agent_run(
    backend_url: str, tmp_path: Path, kind: str
) -> None:
    checks = Checks("machinery", f"tool returns {kind} on {backend_url.split(':')[0]}")
    REPORT.hostile_inputs[f"tool_result:{kind}"] += 1
    pipeline = fault_apps.ticketing(backend_url, tmp_path, "direct", returns=UNSTORABLE[kind]())
    try:
        result = await outcome(lambda: pipeline(run_id=f"unstorable-{kind}"))
        steps = await outcome(lambda: pipeline.tide.steps(f"unstorable-{kind}"))
    finally:
        await pipeline.tide.close()
    expect_library_error(
        checks, result, "the pipeline", CheckpointSerializationError, names=("open_ticket",)
    )
    calls = len(pipeline.model.calls)
    checks.check(calls == 1, "error_reached_model", f"the model was called {calls} times")
    effects = Effects(tmp_path / "effects.db").rows("effects")
    checks.check(len(effects) == 1, "keyed_effect_not_once", f"{len(effects)} tickets opened")
    checks.check(steps.error is None, "steps_unreadable", steps.describe())
    running = [s.name for s in steps.value or [] if s.status == "running"]
    checks.check(not running, "step_left_running", f"steps left running: {running}")
    checks.done()
