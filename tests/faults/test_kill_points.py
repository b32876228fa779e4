"""SIGKILL at random points: whatever instant a process dies, resuming finishes the run as if
nothing had happened, and no external effect is repeated.

Each trial runs the ``orders`` pipeline (``support/fault_kit.py``: agent steps, keyed and
unkeyed side-effecting durable tools and explicit steps, state, usage) in a fresh process and
kills it, up to three times, either at a numbered fault point (a model call, a tool body before
or after its external effect, a store write before or after it commits, a pipeline section) or
after a random delay. Every attempt after a kill is a fresh process resuming the same run id; a
step parked for review (an unkeyed write in doubt) is resolved as an operator would, from the
external system's records. Per trial (R1, R3-R5, R9-R11): the output equals a fault-free run's;
each keyed effect happened once, under one key per logical call; each unkeyed one at most once;
no usage row twice; the event log is gap-free; no step is left running.

The seed of each trial is printed; ``TIDEBASE_FAULT_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from fault_report import REPORT, Checks
from fault_trials import (
    Observed,
    check_attempt,
    check_logs,
    check_run,
    observe,
    resolve_reviews,
    run_attempt,
    seed_of,
    trial_indices,
)
from zygote import Zygote

pytestmark = [pytest.mark.faults, pytest.mark.crash]

MAX_KILLS = 3
MAX_ATTEMPTS = 10


@dataclasses.dataclass
class Reference:
    observed: Observed
    points: int
    duration: float


_references: dict[str, Reference] = {}


async def reference(zygote: Zygote, url: str, tmp_path: Path, backend: str) -> Reference:
    """A fault-free run in a fresh process (once per backend per session)."""
    if backend not in _references:
        workdir = tmp_path / "reference"
        workdir.mkdir()
        result = await run_attempt(zygote, url, workdir, "reference", "reference", trace=True)
        assert result.outcome == "ok", result.describe()
        assert result.report is not None
        observed = await observe(url, "reference", workdir)
        assert observed.status == "completed" and observed.output == result.report["output"]
        _references[backend] = Reference(
            observed, int(result.report["points"]), float(result.report["duration"])
        )
    return _references[backend]


@pytest.mark.parametrize("trial", trial_indices("TIDEBASE_FAULT_TRIALS", 4, per=2))
async def test_sigkill_at_random_points(
    backend_url: str, trial: int, zygote: Zygote, tmp_path: Path
) -> None:
    backend = backend_url.split(":", 1)[0]
    seed = seed_of(trial, backend == "postgresql")
    where = f"sigkill {backend} seed {seed}"
    print(f"{where}: replay with TIDEBASE_FAULT_SEED={seed} pytest {__file__} -k {backend[:6]}")
    ref = await reference(zygote, backend_url, tmp_path, backend)
    rng = random.Random(seed)
    workdir = tmp_path / "trial"
    workdir.mkdir()
    run_id = f"trial-{seed}"
    checks = Checks("sigkill", where)
    kills = 0
    plans: list[str] = []
    completed = False
    for i in range(MAX_ATTEMPTS):
        options: dict[str, float | int] = {}
        if kills < MAX_KILLS and rng.random() < (0.95 if i == 0 else 0.6):
            if rng.random() < 0.75:
                options["kill_at"] = rng.randint(1, ref.points)
            else:
                options["kill_after"] = round(rng.uniform(0, ref.duration), 4)
        result = await run_attempt(
            zygote, backend_url, workdir, run_id, f"attempt{i + 1}", **options
        )
        plans.append(f"{options or 'no kill'} -> {result.outcome}")
        if not check_attempt(checks, result, killed_ok=bool(options)):
            break
        if result.killed:
            kills += 1
            continue
        if result.outcome == "ok":
            completed = True
            break
        if result.outcome == "StepNeedsReview":
            resolved = await resolve_reviews(backend_url, run_id, workdir, checks)
            plans.append(f"reviewed {resolved}")
    print(f"{where}: " + "; ".join(plans))
    checks.check(completed, "run_never_completed", "; ".join(plans))
    if completed:
        check_run(checks, ref.observed, await observe(backend_url, run_id, workdir))
    check_logs(checks, workdir)
    REPORT.kills += kills
    labels = (workdir / "kills.log").read_text().split() if (workdir / "kills.log").exists() else []
    REPORT.kill_points.update(labels)
    REPORT.kill_points["timer"] += kills - len(labels)
    checks.done()
