"""Hostile values and names: each gets the library's own error (a ``TidebaseError`` naming the
step and the path to the value), never a foreign one, and nothing committed is lost (R13, I5).

Values nested 10,000 deep or containing themselves, lone surrogates and NUL characters, in step
outputs, step inputs, run state, pipeline arguments and results; lone surrogates, NUL and
over-long text in run ids and step names (explicit, nested and derived from an agent's name);
``usage_record`` with floats, strings, None, NaN, infinities and negatives. A value that some
backend can store is allowed to succeed, but then it must replay exactly; a value that can never
be stored (a cycle) and a name the library's rules refuse must raise. Every case runs on both
backends and checks that a prior run, and the steps its own run committed first, read back.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from agentkit_common import answers
from agents import Agent, Runner
from fault_hostile import (
    Outcome,
    check_prior_intact,
    expect_library_error,
    outcome,
)
from fault_report import REPORT, Checks

from tidebase_agents import (
    ConfigurationError,
    Run,
    Tidebase,
    TidebaseError,
    checkpointed_pipeline,
)

pytestmark = pytest.mark.faults

DEPTH = 10_000
BEFORE = "committed-before"


def deep_list() -> Any:
    value: Any = "bottom"
    for _ in range(DEPTH):
        value = [value]
    return value


def deep_dict() -> Any:
    value: Any = "bottom"
    for _ in range(DEPTH):
        value = {"a": value}
    return value


def cycle_list() -> Any:
    value: list[Any] = [1]
    value.append(value)
    return value


def cycle_dict() -> Any:
    value: dict[str, Any] = {"k": 1}
    value["self"] = value
    return value


VALUES: dict[str, Callable[[], Any]] = {
    "deep_list": deep_list,
    "deep_dict": deep_dict,
    "cycle_list": cycle_list,
    "cycle_dict": cycle_dict,
    "surrogate": lambda: "lone \ud800 surrogate",
    "surrogate_key": lambda: {"k\udfff": 1},
    "nul": lambda: "nul \x00 char",
    "nul_key": lambda: {"k\x00": 1},
}
#: Values no backend can store: they must raise.
NEVER_STORABLE = frozenset({"cycle_list", "cycle_dict"})


def same(a: Any, b: Any) -> bool:
    """Deep equality without recursion (values 10,000 deep overflow ``==``)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


def new_run_id() -> str:
    return f"hostile-{uuid.uuid4().hex[:10]}"


async def check_before_intact(tide: Tidebase, run_id: str, checks: Checks) -> None:
    """The step the hostile run committed before the hostile value still reads back."""
    steps = await outcome(lambda: tide.steps(run_id))
    if not checks.check(steps.error is None, "steps_unreadable", f"steps() {steps.describe()}"):
        return
    before = [(s.status, s.output) for s in steps.value if s.name == "before"]
    checks.check(
        before == [("completed", BEFORE)], "committed_step_lost", f"'before' is now {before}"
    )


def judge(
    checks: Checks, result: Outcome, what: str, *, must_raise: bool, names: tuple[str, ...]
) -> bool:
    """A hostile value: the library's own error naming ``names``, or (if allowed) success;
    True if it was stored."""
    if result.error is None and not must_raise:
        return True
    expect_library_error(checks, result, what, names=names)
    return False


# -- values -------------------------------------------------------------------------------------

SITES = (
    "step_output",
    "step_input",
    "state_set",
    "state_patch",
    "pipeline_input",
    "pipeline_args",
    "pipeline_result",
)


async def run_with(tide: Tidebase, run_id: str, site: str, value: Any) -> Outcome:
    """Put ``value`` at ``site`` of a run whose step ``before`` committed first."""

    async def body(run: Run, _input: Any) -> Any:
        await run.step("before", lambda: BEFORE)
        if site == "step_output":
            return await run.step("hostile", lambda: value)
        if site == "step_input":
            return await run.step("hostile", lambda: "fine", input=value)
        if site == "state_set":
            await run.state_set(value)
            return await run.state()
        if site == "state_patch":
            await run.state_patch({"hostile": value})
            return (await run.state())["hostile"]
        return value  # pipeline_result

    if site == "pipeline_input":
        return await outcome(lambda: tide.run("fault-values", body, run_id=run_id, input=value))
    if site == "pipeline_args":

        @checkpointed_pipeline("fault-values-args", tide=tide)
        async def pipeline(arg: Any) -> Any:
            return arg

        return await outcome(lambda: pipeline(value, run_id=run_id))
    return await outcome(lambda: tide.run("fault-values", body, run_id=run_id, input=None))


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("kind", sorted(VALUES))
async def test_hostile_value(shared_url: str, tide: Tidebase, kind: str, site: str) -> None:
    where = f"{kind} in {site} on {shared_url.split(':')[0]}"
    checks = Checks("hostile", where)
    REPORT.hostile_inputs[f"value:{kind}"] += 1
    run_id = new_run_id()
    value = VALUES[kind]()
    result = await run_with(tide, run_id, site, value)
    names = ("hostile", "$") if site.startswith("step") else ("$",)
    if judge(checks, result, site, must_raise=kind in NEVER_STORABLE, names=names):
        # Stored: it must come back exactly, from the checkpoint.
        again = await run_with(tide, run_id, site, value)
        expected = "fine" if site == "step_input" else VALUES[kind]()
        checks.check(
            again.error is None and same(again.value, expected),
            "stored_value_differs",
            f"replayed {again.describe()[:200]}",
        )
    if site not in ("pipeline_input", "pipeline_args"):
        await check_before_intact(tide, run_id, checks)
    await check_prior_intact(tide, checks)
    checks.done()


# -- run ids and step names -----------------------------------------------------------------------

BAD_RUN_IDS = {
    "surrogate": "run-\ud800",
    "nul": "run-\x00",
    "too_long": "r" * 256,
    "empty": "",
}


def run_id_calls(tide: Tidebase, run_id: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    async def body(run: Run, _input: Any) -> str:
        return "never"

    @checkpointed_pipeline("fault-run-ids", tide=tide)
    async def pipeline() -> str:
        return "never"

    return {
        "pipeline": lambda: pipeline(run_id=run_id),
        "resume": lambda: pipeline.resume(run_id),
        "enqueue": lambda: pipeline.enqueue(run_id=run_id),
        "run": lambda: tide.run("fault-run-ids", body, run_id=run_id),
        "get_run": lambda: tide.get_run(run_id),
        "steps": lambda: tide.steps(run_id),
        "events": lambda: tide.events(run_id),
        "state_versions": lambda: tide.state_versions(run_id),
        "usage_records": lambda: tide.usage_records(run_id),
        "cancel": lambda: tide.cancel(run_id),
        "requeue": lambda: tide.requeue(run_id),
    }


CALLS = (
    "pipeline",
    "resume",
    "enqueue",
    "run",
    "get_run",
    "steps",
    "events",
    "state_versions",
    "usage_records",
    "cancel",
    "requeue",
)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("kind", sorted(BAD_RUN_IDS))
async def test_hostile_run_id(shared_url: str, tide: Tidebase, kind: str, call: str) -> None:
    checks = Checks("hostile", f"run id {kind} in {call} on {shared_url.split(':')[0]}")
    REPORT.hostile_inputs[f"run_id:{kind}"] += 1
    result = await outcome(run_id_calls(tide, BAD_RUN_IDS[kind])[call])
    expect_library_error(checks, result, call, ConfigurationError)
    await check_prior_intact(tide, checks)
    checks.done()


LONG = "s" * 1001


async def ask_agent_named(name: str) -> Any:
    agent = Agent(name=name, instructions="Answer.", model=answers(lambda t: f"ok: {t}"))
    return (await Runner.run(agent, "hi")).final_output


STEP_NAMES: dict[str, Callable[[Run], Awaitable[Any]]] = {
    "surrogate": lambda run: run.step("bad \udc00 name", lambda: 1),
    "nul": lambda run: run.step("bad \x00 name", lambda: 1),
    "over_1000": lambda run: run.step(LONG, lambda: 1),
    "nested_over_1000": lambda run: run.step("o" * 600, lambda: run.step("i" * 500, lambda: 1)),
    "agent_name_over_1000": lambda run: ask_agent_named("a" * 1001),
    "agent_name_nul": lambda run: ask_agent_named("agent\x00x"),
    "agent_name_surrogate": lambda run: ask_agent_named("agent\ud800x"),
    "usage_model_nul": lambda run: run.usage_record(model="gpt\x00", input_tokens=1),
    "usage_model_surrogate": lambda run: run.usage_record(model="gpt\udc80", input_tokens=1),
}


@pytest.mark.parametrize("kind", sorted(STEP_NAMES))
async def test_hostile_step_name(shared_url: str, tide: Tidebase, kind: str) -> None:
    checks = Checks("hostile", f"step name {kind} on {shared_url.split(':')[0]}")
    REPORT.hostile_inputs[f"step_name:{kind}"] += 1
    run_id = new_run_id()

    async def body(run: Run, _input: Any) -> Any:
        await run.step("before", lambda: BEFORE)
        return await STEP_NAMES[kind](run)

    result = await outcome(lambda: tide.run("fault-names", body, run_id=run_id))
    # An explicit name breaks the library's naming rules; an agent's name is part of its
    # fingerprint too, whose hashing may refuse it first.
    expected = TidebaseError if kind.startswith("agent_") else ConfigurationError
    expect_library_error(checks, result, kind, expected)
    await check_before_intact(tide, run_id, checks)
    await check_prior_intact(tide, checks)
    checks.done()


# -- usage_record ---------------------------------------------------------------------------------

USAGE = [
    ("input_tokens", 1.5),
    ("input_tokens", "7"),
    ("input_tokens", None),
    ("input_tokens", math.nan),
    ("output_tokens", -1),
    ("cached_tokens", math.inf),
    ("reasoning_tokens", True),
    ("requests", 2.0),
    ("cost_usd", math.nan),
    ("cost_usd", -0.5),
    ("cost_usd", "1"),
    ("cost_usd", math.inf),
    ("kind", None),
    ("kind", "k" * 33),
]


@pytest.mark.parametrize(("field", "value"), USAGE, ids=[f"{f}={v!r}" for f, v in USAGE])
async def test_hostile_usage_record(
    shared_url: str, tide: Tidebase, field: str, value: Any
) -> None:
    checks = Checks("hostile", f"usage_record {field}={value!r} on {shared_url.split(':')[0]}")
    REPORT.hostile_inputs[f"usage_record:{field}"] += 1
    run_id = new_run_id()

    async def body(run: Run, _input: Any) -> Any:
        await run.step("before", lambda: BEFORE)
        await run.usage_record(model="gpt-4o-mini", **{field: value})
        return "recorded"

    result = await outcome(lambda: tide.run("fault-usage", body, run_id=run_id))
    expect_library_error(checks, result, "usage_record", ConfigurationError, names=(field,))
    usage = await outcome(lambda: tide.usage_records(run_id))
    checks.check(
        usage.error is None and usage.value == [],
        "bad_usage_recorded",
        f"usage after a refused record: {usage.describe()}",
    )
    await check_before_intact(tide, run_id, checks)
    await check_prior_intact(tide, checks)
    checks.done()


def test_values_are_what_they_claim() -> None:
    """The hostile values really are hostile (a check on the test's own inputs)."""
    assert "\ud800" in VALUES["surrogate"]() and "\x00" in VALUES["nul"]()
    depth, value = 0, deep_list()
    while isinstance(value, list):
        value, depth = value[0], depth + 1
    assert depth == DEPTH
    cycle = cycle_list()
    assert cycle[1] is cycle
    assert not same(deep_list(), [deep_list()]) and same(deep_dict(), deep_dict())
