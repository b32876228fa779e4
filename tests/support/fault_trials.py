"""The test side of fault trials: run attempts in fresh processes, resolve reviews, check a run.

An attempt is one execution of the ``orders`` run (:mod:`fault_kit`) in a child forked by the
zygote; it may be killed at a point, killed after a delay, or paused at a gate while the test
injects a database fault. :func:`observe` reads back what a run left (through the public API)
and what the external systems saw; :func:`check_run` compares it with a fault-free run.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

from fault_kit import KEYED_TOOLS, Effects, args_hash
from fault_report import Checks
from zygote import Zygote

from tidebase_agents import Tidebase

#: Outcomes after which invoking the run again is the right thing to do.
RETRYABLE = frozenset({"LeaseLost", "RunLocked", "DatabaseUnavailable"})
_TOOL_STEP = re.compile(r"(?:^|/)tool:(?P<tool>\w+):(?P<hash>[0-9a-f]{12})#\d+$")


_REPLAY = os.environ.get("TIDEBASE_FAULT_SEED")
#: Seeds of this session's trials derive from it (random unless set, printed with each trial).
BASE_SEED = int(
    os.environ.get("TIDEBASE_FAULT_BASE_SEED") or random.SystemRandom().randrange(10**6)
)


def trial_indices(variable: str, default: int, per: int = 1) -> list[int]:
    """Trials of a family: ``$variable`` of them (``default`` when unset) shared among ``per``
    parametrizations, at least one each; a single one when ``$TIDEBASE_FAULT_SEED`` replays."""
    if _REPLAY:
        return [0]
    total = int(os.environ.get(variable) or default)
    return list(range(max(1, -(-total // per))))


def seed_of(index: int, variant: int = 0) -> int:
    """The seed of trial ``index`` (``variant`` tells parametrizations apart)."""
    if _REPLAY:
        return int(_REPLAY)
    return BASE_SEED * 1000 + index * 10 + variant


@dataclasses.dataclass
class Attempt:
    """How one child process ended."""

    label: str
    status: int | None  # exit status; None: it hung and was killed
    report: dict[str, Any] | None
    stderr: str

    @property
    def killed(self) -> bool:
        return self.status == -signal.SIGKILL

    @property
    def outcome(self) -> str:
        if self.status is None:
            return "hang"
        if self.killed:
            return "killed"
        if self.report is None:
            return f"exit {self.status} without a report"
        return str(self.report["outcome"])

    def describe(self) -> str:
        report = self.report or {}
        text = f"{self.label}: {self.outcome}"
        if report.get("error_type"):
            text += f" ({report['error_type']}: {report.get('message', '')[:300]})"
        if self.status is None or self.report is None:
            text += f"\n{self.stderr[-3000:]}"
        return text


def spawn_attempt(
    zygote: Zygote,
    url: str,
    workdir: Path,
    run_id: str,
    label: str,
    **options: Any,
) -> Any:
    for marker in ("started", "gate.reached", "gate.open"):
        (workdir / marker).unlink(missing_ok=True)
    return zygote.spawn(
        "fault_kit:attempt",
        {"url": url, "workdir": str(workdir), "run_id": run_id, **options},
        workdir / "logs",
        label,
    )


async def finish(child: Any, label: str, timeout: float) -> Attempt:
    """Wait for a child; a child still running after ``timeout`` is a hang (killed)."""
    status = await child.wait(timeout)
    if status is None:
        return Attempt(label, None, None, await child.stop())
    return Attempt(label, status, child.report, child.stderr[-6000:])


async def run_attempt(
    zygote: Zygote,
    url: str,
    workdir: Path,
    run_id: str,
    label: str,
    *,
    kill_after: float | None = None,
    timeout: float = 120.0,
    **options: Any,
) -> Attempt:
    """Run one attempt to its end; ``kill_after`` SIGKILLs it that long after it started."""
    child = spawn_attempt(zygote, url, workdir, run_id, label, **options)
    if kill_after is not None:
        deadline = time.monotonic() + 60
        while not (workdir / "started").exists() and child.returncode is None:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
        await asyncio.sleep(kill_after)
        child.kill()
    return await finish(child, label, timeout)


async def wait_gate(child: Any, workdir: Path, timeout: float = 90.0) -> bool:
    """Wait until the child pauses at its gate; False if it ended (or hung) before."""
    deadline = time.monotonic() + timeout
    while not (workdir / "gate.reached").exists():
        if child.returncode is not None or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def open_gate(workdir: Path) -> None:
    (workdir / "gate.open").touch()


# -- what a run left behind -----------------------------------------------------------------------


@dataclasses.dataclass
class Observed:
    status: str
    output: Any
    steps: dict[str, str]
    usage: list[tuple[Any, ...]]
    usage_keys: list[str]
    state: list[Any]
    event_seqs: list[int]
    effects: collections.Counter[str]
    keys: dict[str, set[str | None]]


async def observe(url: str, run_id: str, workdir: Path) -> Observed:
    tide = Tidebase(url)
    try:
        run = await tide.get_run(run_id)
        steps = await tide.steps(run_id)
        usage = await tide.usage_records(run_id)
        state = await tide.state_versions(run_id)
        events = await tide.events(run_id)
    finally:
        await tide.close()
    fx = Effects(workdir / "effects.db")
    keys: dict[str, set[str | None]] = collections.defaultdict(set)
    for row in fx.rows("attempts"):
        keys[row["call"]].add(row["key"])
    return Observed(
        status=str(run.status),
        output=run.output,
        steps={s.name: str(s.status) for s in steps},
        usage=sorted(
            (
                u.step or "",
                u.kind,
                u.provider or "",
                u.model or "",
                u.requests,
                u.input_tokens,
                u.output_tokens,
                u.cached_tokens,
                u.reasoning_tokens,
                u.total_tokens,
            )
            for u in usage
        ),
        usage_keys=[u.dedupe_key for u in usage],
        state=[v.value for v in state],
        event_seqs=[e.seq for e in events],
        effects=collections.Counter(row["call"] for row in fx.rows("effects")),
        keys=dict(keys),
    )


def tool_of_call(call: str) -> str:
    return call.split(":", 1)[0]


def check_run(checks: Checks, ref: Observed, got: Observed) -> None:
    """The invariants of a run that completed after faults, against a fault-free run."""
    checks.check(got.status == "completed", "run_not_completed", f"run is {got.status}")
    checks.check(
        got.output == ref.output,
        "output_differs",
        f"output {json.dumps(got.output)[:300]} != fault-free {json.dumps(ref.output)[:300]}",
    )
    unfinished = {n: s for n, s in got.steps.items() if s != "completed"}
    checks.check(not unfinished, "step_not_completed", f"steps after completion: {unfinished}")
    extra, missing = set(got.steps) - set(ref.steps), set(ref.steps) - set(got.steps)
    checks.check(
        not extra and not missing,
        "steps_differ",
        f"extra steps {sorted(extra)}, missing {sorted(missing)}",
    )
    for call in sorted(set(ref.effects) | set(got.effects)):
        n = got.effects[call]
        keyed = tool_of_call(call) in KEYED_TOOLS
        if call not in ref.effects:
            checks.check(
                False, "unexpected_effect", f"{call} happened {n}x; the fault-free run never"
            )
        elif keyed:
            checks.check(n == 1, "keyed_effect_not_once", f"{call} happened {n} times")
        else:
            checks.check(n <= 1, "unkeyed_effect_repeated", f"{call} happened {n} times")
            checks.check(n >= 1, "effect_missing", f"{call} never happened")
    for call, keys in sorted(got.keys.items()):
        if tool_of_call(call) in KEYED_TOOLS:
            checks.check(
                len(keys) == 1, "keyed_call_under_several_keys", f"{call} was sent under {keys}"
            )
    duplicates = [k for k, n in collections.Counter(got.usage_keys).items() if n > 1]
    checks.check(not duplicates, "usage_duplicate", f"usage recorded twice: {duplicates}")
    checks.check(
        got.usage == ref.usage,
        "usage_differs",
        f"usage ledger {got.usage} != fault-free {ref.usage}",
    )
    checks.check(
        got.event_seqs == list(range(1, len(got.event_seqs) + 1)),
        "event_gap",
        f"event sequence {got.event_seqs}",
    )
    checks.check(got.state == ref.state, "state_differs", f"state {got.state} != {ref.state}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def check_logs(checks: Checks, workdir: Path) -> None:
    """What the children logged: tool errors the model saw (R15), failures of ``close()``."""
    seen = _lines(workdir / "model-saw-errors.log")
    checks.check(not seen, "error_reached_model", f"the model was handed {seen[:3]}")
    closing = _lines(workdir / "close-errors.log")
    checks.check(not closing, "close_failed", f"Tidebase.close() raised {closing[:3]}")


# -- operator review ------------------------------------------------------------------------------


def _effect_of(step: str, workdir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(tool, the effect row of the step's logical call or None) for a parked step."""
    found = _TOOL_STEP.search(step)
    tool = found["tool"] if found else step if step in ("ship", "audit") else None
    for row in Effects(workdir / "effects.db").rows("effects"):
        if row["tool"] != tool:
            continue
        if found is None or args_hash(json.loads(row["args"]))[:12] == found["hash"]:
            return tool, row
    return tool, None


async def resolve_reviews(url: str, run_id: str, workdir: Path, checks: Checks) -> list[str]:
    """Resolve every parked step as an operator would: look at the external system, supply
    the output it recorded if the effect happened, else let the step run again."""
    tide = Tidebase(url)
    resolved = []
    try:
        for step in await tide.steps(run_id):
            if step.status != "manual_review":
                continue
            tool, effect = _effect_of(step.name, workdir)
            checks.check(tool is not None, "unexpected_review", f"{step.name} parked for review")
            checks.check(
                tool not in KEYED_TOOLS,
                "keyed_call_parked",
                f"keyed {step.name} parked for review ({(step.error or {}).get('message')})",
            )
            action = "retry" if effect is None else "output"
            try:
                await tide.review_step(
                    run_id, step.name, action, output=None if effect is None else effect["result"]
                )
            except Exception as exc:
                checks.check(False, "review_failed", f"{action} {step.name}: {exc!r}")
            resolved.append(f"{step.name}: {action}")
    finally:
        await tide.close()
    return resolved


async def complete_run(
    zygote: Zygote,
    url: str,
    workdir: Path,
    run_id: str,
    checks: Checks,
    *,
    prefix: str,
    max_attempts: int = 8,
) -> list[Attempt]:
    """Resume the run in fresh processes (no faults) until it completes, resolving reviews."""
    attempts = []
    for i in range(max_attempts):
        result = await run_attempt(zygote, url, workdir, run_id, f"{prefix}{i + 1}")
        attempts.append(result)
        if not check_attempt(checks, result):
            break
        if result.outcome == "ok":
            return attempts
        if result.outcome == "StepNeedsReview":
            await resolve_reviews(url, run_id, workdir, checks)
    checks.check(False, "run_never_completed", "; ".join(a.describe() for a in attempts))
    return attempts


def check_attempt(checks: Checks, result: Attempt, *, killed_ok: bool = False) -> bool:
    """The invariants of one attempt's end; False if it is pointless to go on."""
    if result.status is None:
        checks.check(False, "hang", result.describe())
        return False
    if result.killed:
        return checks.check(killed_ok, "unexpected_kill", result.describe())
    if result.report is None:
        checks.check(False, "child_died", result.describe())
        return False
    outcome = result.outcome
    if outcome in ("ok", "StepNeedsReview"):
        return True
    if not result.report.get("library_error"):
        checks.check(False, "raw_error", result.describe())
        return True
    return checks.check(outcome in RETRYABLE, "unexpected_outcome", result.describe())
