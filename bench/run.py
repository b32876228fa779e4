"""Benchmark entry point: ``python -m bench.run`` (or ``python bench/run.py``) from the repo root.

Runs every configuration in its own fresh interpreter (``python -m bench.configs``), repeated and
interleaved (repeat 1 of every configuration, then repeat 2, ...), takes medians over repeats,
prints a table and writes ``bench/results/latest.json``. A configuration that fails is reported as
an error entry; the run goes on. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import importlib.metadata
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ours
from bench.common import (
    PG_URL_ENV,
    database_name,
    ensure_database,
    median,
    parse_results,
    pg_url,
    server_version,
    with_database,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "latest.json"
RESUME_STEPS = 1000  # fixed: the summary keys are named after it
LEASE_SECONDS = 2.0
LEASE_MARGIN_S = 0.5

PACKAGES = [
    "tidebase-agents",
    "openai-agents",
    "openai",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "dbos",
    "dbos-openai-agents",
    "psycopg",
]
# Figures kept in the JSON but left out of the printed table.
HIDDEN_METRICS = {"n", "n_16", "n_64", "payload_bytes", "runs", "steps_per_run", "lock_retries"}


@dataclass
class Settings:
    repeats: int
    quick: bool
    configs: list[str]
    child_timeout_s: float
    time_limit_s: float
    params: dict[str, Any]


@dataclass
class ConfigResult:
    name: str
    repeats: list[dict[str, Any]] = field(default_factory=list)

    def ok_figures(self) -> list[dict[str, Any]]:
        return [r["figures"] for r in self.repeats if "figures" in r]

    def attempted(self) -> list[dict[str, Any]]:
        return [r for r in self.repeats if "skipped" not in r]

    def last_wall_s(self) -> float:
        walls = [float(r["wall_s"]) for r in self.attempted()]
        return walls[-1] if walls else 0.0

    def errors(self) -> list[str]:
        return sorted({r["error"] for r in self.repeats if "error" in r})

    def status(self) -> str:
        ok = len(self.ok_figures())
        if not self.attempted():
            return "skipped"
        if ok == len(self.attempted()):
            return "ok"
        return "partial" if ok else "error"

    def medians(self) -> dict[str, float]:
        flat = [flatten(f) for f in self.ok_figures()]
        keys = sorted({k for f in flat for k in f})
        out: dict[str, float] = {}
        for key in keys:
            m = median([f[key] for f in flat if key in f])
            if m is not None:
                out[key] = m
        return out

    def only(self, repeat: int) -> ConfigResult:
        """This configuration as if only ``repeat`` (1-based) had run."""
        return ConfigResult(self.name, [r for r in self.repeats if r.get("repeat") == repeat])

    def spread(self, key: str) -> tuple[float, float] | None:
        values = [v for f in self.ok_figures() if (v := flatten(f).get(key)) is not None]
        return (min(values), max(values)) if values else None


def flatten(figures: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as dotted keys (``cold.ms_to_first_new_step``); lists and text dropped."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


# --------------------------------------------------------------------------- children


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_child(name: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its last result line, or an error entry."""
    cmd = [sys.executable, "-m", "bench.configs", name, json.dumps(params)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f}s", "wall_s": timeout_s}
    wall_s = time.perf_counter() - start
    results = parse_results(proc.stdout)
    last = results[-1] if results else None
    if last is not None and "error" in last:
        return {"error": last["error"], "traceback": last.get("traceback"), "wall_s": wall_s}
    if proc.returncode != 0 or last is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit code {proc.returncode}: {' | '.join(tail)}", "wall_s": wall_s}
    return {"figures": last, "wall_s": wall_s}


def run_resume(db: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Prepare a run with 1,000 completed steps in a process that dies holding its lease, then
    re-invoke it from a fresh process once the lease has expired."""
    run_params = {**params, "run_id": f"bench-resume-{db}-{uuid.uuid4().hex}"}
    prepared = run_child(f"resume_prepare_{db}", run_params, timeout_s)
    if "error" in prepared:
        prepared["error"] = f"prepare: {prepared['error']}"
        return prepared
    died_at = float(prepared["figures"]["died_at"])
    run_params["not_before"] = died_at + LEASE_SECONDS + LEASE_MARGIN_S
    resumed = run_child(f"resume_{db}", run_params, timeout_s)
    if "figures" in resumed:
        resumed["figures"]["prepare_s"] = prepared["figures"]["prepare_s"]
    resumed["wall_s"] = resumed.get("wall_s", 0.0) + prepared["wall_s"]
    return resumed


def run_config(name: str, settings: Settings) -> dict[str, Any]:
    runner = RUNNERS.get(name)
    if runner is not None:
        return runner(name, settings)
    return run_child(name, settings.params, settings.child_timeout_s)


# --------------------------------------------------------------------------- setup and info


def run_migration(database_url: str, timeout_s: float) -> dict[str, Any]:
    """Migrate one of the library's databases (PostgreSQL is never auto-migrated): with the
    ``tidebase-agents migrate`` CLI, or, if that fails, through the runtime's ``migrate()``."""
    try:
        proc = subprocess.run(
            ours.migrate_command(),
            cwd=REPO_ROOT,
            env={**child_env(), **ours.migrate_env(database_url)},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        cli_output = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        if proc.returncode == 0:
            return {"ok": True, "via": "cli", "output": cli_output}
    except (OSError, subprocess.TimeoutExpired) as exc:
        cli_output = f"{type(exc).__name__}: {exc}"
    fallback = run_child("migrate", {"database_url": database_url}, timeout_s)
    if "figures" in fallback:
        return {"ok": True, "via": "api", "cli_error": cli_output}
    return {"ok": False, "cli_error": cli_output, "api_error": fallback["error"]}


def setup(settings: Settings) -> dict[str, Any]:
    """Fresh benchmark databases, and the library's schema migrated into them."""
    info: dict[str, Any] = {}
    params = settings.params
    if PG_CONFIGS & set(settings.configs):
        for key in ("pg_url", "dbos_pg_url"):
            try:
                info[database_name(params[key])] = asyncio.run(
                    ensure_database(params[key], fresh=True)
                )
            except Exception as exc:
                info[database_name(params[key])] = f"error: {type(exc).__name__}: {exc}"
    if OURS_CONFIGS & set(settings.configs):
        sqlite_url = f"sqlite+aiosqlite:///{Path(params['work_dir']) / 'ours.sqlite'}"
        timeout = settings.child_timeout_s
        if PG_CONFIGS & OURS_CONFIGS & set(settings.configs):
            info["migrate_pg"] = run_migration(params["pg_url"], timeout)
        if (OURS_CONFIGS & set(settings.configs)) - PG_CONFIGS:
            info["migrate_sqlite"] = run_migration(sqlite_url, timeout)
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
            )
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def machine_info(params: dict[str, Any]) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        pg_version: str | None = asyncio.run(server_version(params["pg_url"]))
    except Exception as exc:
        pg_version = f"unreachable: {type(exc).__name__}: {exc}"
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
        "git": git_info(),
    }


# --------------------------------------------------------------------------- summary


Summary = dict[str, float | str | None]
#: ``med(config, key)``: the median over repeats of one figure of one configuration, or None.
Medians = Callable[[str, str], float | None]
#: Runs one repeat of a configuration that needs more than one process.
Runner = Callable[[str, "Settings"], dict[str, Any]]


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass(frozen=True)
class Section:
    """One part of the benchmark: its configurations, in run order within a repeat (each one
    fresh process of ``python -m bench.configs NAME``, unless ``runners`` says otherwise), and
    the summary keys it derives from their medians (it may read other sections' too)."""

    name: str
    configs: list[str]
    summarize: Callable[[Medians], Summary]
    runners: dict[str, Runner] = field(default_factory=dict)


def summarize_pipelines(med: Medians) -> Summary:
    """Per pipeline, ours and DBOS, each measured side by side with the bare SDK in its own
    process: wall time and the client process's CPU time added."""
    s: Summary = {"bare_pipeline_us": med("bare", "per_pipeline_us")}
    s["bare_pipeline_cpu_us"] = med("bare", "per_pipeline_cpu_us")
    for db in ("pg", "sqlite"):
        ours_cfg, dbos_cfg = f"ours_{db}", f"dbos_{db}"
        s[f"pipeline_us_{db}"] = med(ours_cfg, "per_pipeline_us")
        s[f"pipeline_overhead_us_{db}"] = med(ours_cfg, "overhead_us")
        s[f"dbos_pipeline_us_{db}"] = med(dbos_cfg, "per_pipeline_us")
        s[f"dbos_pipeline_overhead_us_{db}"] = med(dbos_cfg, "overhead_us")
        s[f"overhead_ratio_vs_dbos_{db}"] = _ratio(
            med(ours_cfg, "overhead_us"), med(dbos_cfg, "overhead_us")
        )
        s[f"cpu_overhead_us_{db}"] = med(ours_cfg, "overhead_cpu_us")
        s[f"dbos_cpu_overhead_us_{db}"] = med(dbos_cfg, "overhead_cpu_us")
        s[f"cpu_overhead_ratio_vs_dbos_{db}"] = _ratio(
            med(ours_cfg, "overhead_cpu_us"), med(dbos_cfg, "overhead_cpu_us")
        )
    return s


def summarize_floors(med: Medians) -> Summary:
    return {
        "floor_pg_insert_commit_us": med("floor_pg", "insert_commit_us"),
        "floor_pg_select1_us": med("floor_pg", "select1_us"),
        "floor_sqlite_insert_commit_us": med("floor_sqlite", "insert_commit_us"),
        "floor_sqlite_insert_commit_normal_us": med("floor_sqlite", "insert_commit_normal_us"),
        "floor_sqlite_direct_insert_commit_normal_us": med(
            "floor_sqlite", "insert_commit_direct_normal_us"
        ),
    }


def summarize_steps(med: Medians) -> Summary:
    """Explicit steps over the commit floor (SQLite's at the library's own ``synchronous``)."""
    floor_pg = med("floor_pg", "insert_commit_us")
    normal = med("steps_sqlite", "sqlite_synchronous") == 1
    floor_sqlite = med("floor_sqlite", "insert_commit_normal_us" if normal else "insert_commit_us")
    s: Summary = {"floor_sqlite_synchronous": "NORMAL" if normal else "FULL"}
    for db, floor, suffix in (("pg", floor_pg, ""), ("sqlite", floor_sqlite, "_sqlite")):
        step = med(f"steps_{db}", "trivial_step_us")
        side = med(f"steps_{db}", "side_effect_step_us")
        s[f"step_us_{db}"] = step
        s[f"step_cpu_us_{db}"] = med(f"steps_{db}", "trivial_step_cpu_us")
        s[f"side_effect_step_us_{db}"] = side
        s[f"step_overhead_vs_commit_floor{suffix}"] = _ratio(step, floor)
        s[f"side_effect_step_overhead_vs_commit_floor{suffix}"] = _ratio(side, floor)
    return s


def summarize_resume(med: Medians) -> Summary:
    s: Summary = {}
    n = RESUME_STEPS
    for db, suffix in (("pg", ""), ("sqlite", "_sqlite")):
        config = f"resume_{db}"
        s[f"resume_{n}_round_trips{suffix}"] = med(config, "statements_to_first_new_step")
        s[f"resume_{n}_ms{suffix}"] = med(config, "ms_to_first_new_step")
        s[f"resume_{n}_complete_round_trips{suffix}"] = med(config, "statements_to_complete")
        s[f"resume_{n}_complete_ms{suffix}"] = med(config, "ms_to_complete")
        s[f"first_use_ms{suffix or '_pg'}"] = med(config, "first_use_ms")
    return s


def summarize_concurrency(med: Medians) -> Summary:
    s: Summary = {}
    for level in (16, 64):
        bare_pps = med("conc_bare", f"pps_{level}")
        s[f"bare_pps_{level}"] = bare_pps
        for config, key in (
            ("conc_ours_pg", f"throughput_ratio_{level}"),
            ("conc_ours_sqlite", f"throughput_ratio_{level}_sqlite"),
            ("conc_dbos_pg", f"dbos_throughput_ratio_{level}"),
        ):
            s[key] = _ratio(med(config, f"pps_{level}"), bare_pps)
    # PostgreSQL's group commit over both levels: batches of step writes, writes per batch.
    batches = med("conc_ours_pg", "group_batches")
    s["group_commit_batches"] = batches
    s["group_commit_writes_per_batch"] = _ratio(
        med("conc_ours_pg", "group_batched_writes"), batches
    )
    return s


def summarize_recovery(med: Medians) -> Summary:
    """SIGKILL of a worker holding a run until another worker resumed it; DBOS's launch to
    recovery of a crashed workflow."""
    return {
        "recovery_after_kill_ms": med("recovery_pg", "recovery_after_kill_ms"),
        "dbos_launch_to_recovery_ms": med("recovery_dbos_pg", "dbos_launch_to_recovery_ms"),
    }


def _run_resume(name: str, settings: Settings) -> dict[str, Any]:
    return run_resume(name.removeprefix("resume_"), settings.params, settings.child_timeout_s)


#: Every part of the benchmark, in run order. A new part: a Section here (its configurations
#: registered in bench/configs.py's CONFIGS), and its keys documented in bench/README.md.
SECTIONS: list[Section] = [
    Section(
        "pipelines",
        ["bare", "ours_pg", "ours_sqlite", "dbos_pg", "dbos_sqlite"],
        summarize_pipelines,
    ),
    Section("floors", ["floor_pg", "floor_sqlite"], summarize_floors),
    Section("steps", ["steps_pg", "steps_sqlite"], summarize_steps),
    Section(
        "resume",
        ["resume_pg", "resume_sqlite"],
        summarize_resume,
        runners={"resume_pg": _run_resume, "resume_sqlite": _run_resume},
    ),
    Section(
        "concurrency",
        ["conc_bare", "conc_ours_pg", "conc_ours_sqlite", "conc_dbos_pg"],
        summarize_concurrency,
    ),
    Section("recovery", ["recovery_pg", "recovery_dbos_pg"], summarize_recovery),
]
CONFIG_ORDER = [config for section in SECTIONS for config in section.configs]
RUNNERS = {name: run for section in SECTIONS for name, run in section.runners.items()}
PG_CONFIGS = {c for c in CONFIG_ORDER if c.endswith("_pg")}
OURS_CONFIGS = {
    c
    for c in CONFIG_ORDER
    if "ours" in c or c.startswith(("steps", "resume")) or c == "recovery_pg"
}


def summarize(results: dict[str, ConfigResult]) -> Summary:
    """The headline figures of every section (see bench/README.md for their definitions)."""

    def med(config: str, key: str) -> float | None:
        result = results.get(config)
        return result.medians().get(key) if result else None

    summary: Summary = {}
    for section in SECTIONS:
        summary.update(section.summarize(med))
    return summary


def summary_spread(results: dict[str, ConfigResult], repeats: int) -> dict[str, list[float]]:
    """Each numeric summary key's [min, max] over the repeats, each repeat summarized alone."""
    per_repeat = [
        summarize({name: result.only(repeat) for name, result in results.items()})
        for repeat in range(1, repeats + 1)
    ]
    spread: dict[str, list[float]] = {}
    for key in per_repeat[0] if per_repeat else ():
        values = [v for s in per_repeat if isinstance(v := s.get(key), int | float)]
        if values:
            spread[key] = [min(values), max(values)]
    return spread


def fmt(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(
    results: dict[str, ConfigResult], summary: Summary, spread: dict[str, list[float]]
) -> None:
    rows: list[tuple[str, str, str, str, str]] = []
    for name, result in results.items():
        status = result.status()
        ok = len(result.ok_figures())
        label = f"{status} {ok}/{len(result.repeats)}"
        if not ok:
            rows.append((name, label, status, "", ""))
            continue
        for key, value in result.medians().items():
            if key.rsplit(".", 1)[-1] in HIDDEN_METRICS or key == "died_at":
                continue
            lo_hi = result.spread(key)
            span = f"{fmt(lo_hi[0])} .. {fmt(lo_hi[1])}" if lo_hi else ""
            rows.append((name, label, key, fmt(value), span))
            name, label = "", ""
    headers = ("config", "status", "metric", "median", "min .. max")
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    errors = [(n, e) for n, r in results.items() for e in r.errors()]
    if errors:
        print("\nerrors:")
        for name, error in errors:
            print(f"  {name}: {error[:300]}")
    print("\nsummary (median; min .. max over repeats):")
    key_width = max(len(k) for k in summary)
    for key, headline in summary.items():
        lo_hi = spread.get(key)
        extra = f"  ({fmt(lo_hi[0])} .. {fmt(lo_hi[1])})" if lo_hi else ""
        print(f"  {key.ljust(key_width)}  {fmt(headline)}{extra}")


# --------------------------------------------------------------------------- main


def select_configs(patterns: list[str] | None) -> list[str]:
    if not patterns:
        return list(CONFIG_ORDER)
    wanted = [p.strip() for pattern in patterns for p in pattern.split(",") if p.strip()]
    unknown = [p for p in wanted if not fnmatch.filter(CONFIG_ORDER, p)]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {CONFIG_ORDER}")
    return [c for c in CONFIG_ORDER if any(fnmatch.fnmatch(c, p) for p in wanted)]


def build_settings(args: argparse.Namespace, work_dir: str) -> Settings:
    quick = bool(args.quick)
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    base_url = pg_url()
    params: dict[str, Any] = {
        "pg_url": base_url,
        "dbos_pg_url": with_database(base_url, database_name(base_url) + "_dbos"),
        "work_dir": work_dir,
        "n_pipelines": 60 if quick else 300,
        "batch": 10 if quick else 20,
        "warmup": 5 if quick else 10,
        "budget_s": 2.0 if quick else 8.0,
        "conc_budget_s": 2.0 if quick else 4.0,
        "n_floor": 200 if quick else 500,
        "steps": 100,
        "step_runs": 2 if quick else 3,
        "resume_steps": RESUME_STEPS,
        "lease_seconds": LEASE_SECONDS,
        "conc_levels": [16, 64],
        "conc_total": 64 if quick else 128,
    }
    return Settings(
        repeats=repeats,
        quick=quick,
        configs=select_configs(args.only),
        child_timeout_s=120.0 if quick else 300.0,
        time_limit_s=args.time_limit,
        params=params,
    )


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="CONFIG",
        help=f"run only these (comma-separated, globs allowed): {', '.join(CONFIG_ORDER)}",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=480.0,
        metavar="SECONDS",
        help="skip a configuration's repeat that would end past this (default 480)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON summary path")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the SQLite files")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any configuration failed")
    parser.add_argument("--no-scale", action="store_true", help="skip bench/scale.py's keys")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")

    started = time.perf_counter()
    work_dir = tempfile.mkdtemp(prefix="tidebase-bench-")
    settings = build_settings(args, work_dir)
    try:
        print(
            f"tidebase-agents benchmark: {len(settings.configs)} configurations x "
            f"{settings.repeats} repeats (PostgreSQL: {settings.params['pg_url']})",
            file=sys.stderr,
        )
        setup_info = setup(settings)
        machine = machine_info(settings.params)
        results = {name: ConfigResult(name) for name in settings.configs}
        for repeat in range(1, settings.repeats + 1):
            for name in settings.configs:
                elapsed = time.perf_counter() - started
                if elapsed + results[name].last_wall_s() > settings.time_limit_s:
                    results[name].repeats.append({"skipped": "time limit", "repeat": repeat})
                    print(
                        f"[{repeat}/{settings.repeats}] {name:<16} skipped: time limit "
                        f"({settings.time_limit_s:.0f}s)",
                        file=sys.stderr,
                    )
                    continue
                outcome = run_config(name, settings)
                outcome["repeat"] = repeat
                results[name].repeats.append(outcome)
                status = "ok" if "figures" in outcome else f"ERROR {outcome['error'][:120]}"
                print(
                    f"[{repeat}/{settings.repeats}] {name:<16} {outcome['wall_s']:6.1f}s  {status}",
                    file=sys.stderr,
                )
    finally:
        if not args.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)

    summary = summarize(results)
    spread = summary_spread(results, settings.repeats)
    if not args.no_scale:
        from bench import scale  # cost flat as work grows (bench/scale.py), PostgreSQL only

        summary.update(scale.run(settings.params["pg_url"]))
    wall_s = time.perf_counter() - started
    document: dict[str, Any] = {
        **summary,
        "spread": spread,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(wall_s, 1),
        "load_average_at_end": load_average(),
        "command": " ".join(
            [Path(sys.executable).name, "-m", "bench.run", *(argv or sys.argv[1:])]
        ),
        "repeats": settings.repeats,
        "skipped_for_time_limit": sum(
            1 for r in results.values() for x in r.repeats if "skipped" in x
        ),
        "quick": settings.quick,
        "pg_url_env": PG_URL_ENV,
        "params": {k: v for k, v in settings.params.items() if k != "work_dir"},
        "machine": machine,
        "setup": setup_info,
        "configs": {
            name: {
                "status": result.status(),
                "errors": result.errors(),
                "median": result.medians(),
                "repeats": result.repeats,
            }
            for name, result in results.items()
        },
    }
    print_table(results, summary, spread)
    write_json(args.output, document)
    print(f"\nwrote {args.output} in {wall_s:.0f}s", file=sys.stderr)
    failed = any(r.status() != "ok" for r in results.values())
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
