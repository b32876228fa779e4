"""What the fault suite found: trials, kills, faults and hostile inputs by kind, violations.

Every fault test checks its invariants through a :class:`Checks`, which collects every violated
invariant (not only the first) under a kind, adds the trial to the session's :data:`REPORT`
and then fails the test listing them. ``tests/faults/conftest.py`` prints the report at the end
of the session and writes it as JSON to ``$TIDEBASE_FAULT_REPORT`` when that is set.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest


@dataclasses.dataclass
class FaultReport:
    trials: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kills: int = 0
    kill_points: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    database_faults: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    hostile_inputs: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    violations: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: One example per violation kind: "where: what".
    examples: dict[str, str] = dataclasses.field(default_factory=dict)

    def empty(self) -> bool:
        return not self.trials

    def lines(self) -> list[str]:
        def counts(counter: collections.Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        out = [
            f"trials: {sum(self.trials.values())} ({counts(self.trials)})",
            f"kills: {self.kills} (at {counts(self.kill_points)})",
            f"database faults: {sum(self.database_faults.values())} "
            f"({counts(self.database_faults)})",
            f"hostile inputs: {sum(self.hostile_inputs.values())} ({counts(self.hostile_inputs)})",
            f"violations: {sum(self.violations.values())}",
        ]
        for kind, n in sorted(self.violations.items()):
            out.append(f"  {kind}: {n}, e.g. {self.examples[kind]}")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "trials": dict(self.trials),
            "kills": self.kills,
            "kill_points": dict(self.kill_points),
            "database_faults": dict(self.database_faults),
            "hostile_inputs": dict(self.hostile_inputs),
            "violations": dict(self.violations),
            "examples": self.examples,
        }

    def write(self) -> None:
        path = os.environ.get("TIDEBASE_FAULT_REPORT")
        if path:
            Path(path).write_text(json.dumps(self.as_json(), indent=2, sort_keys=True) + "\n")


REPORT = FaultReport()


class Checks:
    """The invariants of one trial: collect violations, then report them all at once."""

    def __init__(self, family: str, where: str) -> None:
        self.family = family
        self.where = where
        self.violated: list[tuple[str, str]] = []

    def check(self, ok: bool, kind: str, detail: str) -> bool:
        """Record a violation of ``kind`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.violated.append((kind, detail))
        return ok

    def done(self) -> None:
        """Add the trial to the report; fail the test if any invariant was violated."""
        REPORT.trials[self.family] += 1
        for kind, detail in self.violated:
            REPORT.violations[kind] += 1
            first_line = detail.strip().splitlines()[0] if detail.strip() else ""
            REPORT.examples.setdefault(kind, f"{self.where}: {first_line}"[:240])
        if self.violated:
            listed = "\n".join(f"- {kind}: {detail}" for kind, detail in self.violated)
            pytest.fail(f"{self.where}: {len(self.violated)} violation(s)\n{listed}", pytrace=False)
