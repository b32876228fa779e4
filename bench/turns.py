"""What the model-turn journal (T1) costs: ``python -m bench.turns [--quick] [--repeats N]``.

Figures (bench/README.md, "The model-turn journal"), written to ``bench/results/turns.json``:

- a 20-turn tool loop (an offline model calls a plain function tool 19 times, then answers)
  inside ``@checkpointed_pipeline`` against the same agent run bare: added time and CPU time
  per turn, over PostgreSQL's (and SQLite's) insert+commit floor measured in the same run;
- the research pipeline's added time (bench/workload.py) with this checkout against the release
  before the turn journal (``2bc1d4a^``), checked out with ``git worktree add`` into a temporary
  directory and imported through ``PYTHONPATH`` in its own interpreter.

Like bench/run.py, every configuration and repeat is a fresh interpreter
(``python -m bench.turns --child NAME PARAMS_JSON``), repeats are interleaved, and each repeat's
figures are paired with the bare and floor figures of the same repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    database_name,
    emit,
    ensure_database,
    parse_results,
    pg_url,
    timed_loop,
    with_database,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "bench" / "results" / "turns.json"
TURNS = 20  # model turns of the loop: TURNS - 1 tool calls, then the answer
LOOP_PIPELINE = "bench-turn-loop"
# The turn journal landed in 2bc1d4a; the release before it is its parent.
JOURNAL_COMMIT = "2bc1d4a"
BEFORE_REV = f"{JOURNAL_COMMIT}^"
# Own databases (recreated each run; bench.common only ever drops tidebase_bench* names), so
# this benchmark never touches bench/run.py's.
NOW_DB_SUFFIX = "_turns"
BEFORE_DB_SUFFIX = "_turns_before"

Params = dict[str, Any]
Config = Callable[[Params], Coroutine[Any, Any, dict[str, Any]]]


# --------------------------------------------------------------------------- the tool loop


def _loop_model(uid: str, tool_turns: int) -> Any:
    """An offline model that calls ``step`` ``tool_turns`` times, then answers."""
    from agents.items import ModelResponse
    from agents.models.interface import Model
    from agents.testing import assistant_message, function_call
    from agents.usage import Usage

    class ToolLoopModel(Model):
        def __init__(self) -> None:
            self.calls = 0

        async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
            self.calls += 1
            usage = Usage(requests=1, input_tokens=50, output_tokens=10, total_tokens=60)
            if self.calls <= tool_turns:
                item = function_call("step", {"i": self.calls}, call_id=f"call_{uid}_{self.calls}")
            else:
                item = assistant_message(f"done after {tool_turns}", item_id=f"msg_{uid}")
            return ModelResponse(output=[item], usage=usage, response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the benchmark does not stream")

    return ToolLoopModel()


def _step_tool() -> Any:
    from agents import function_tool

    @function_tool
    async def step(i: int) -> str:
        """Do step i."""
        return f"s{i}"

    return step


LoopFn = Callable[[str, int], Awaitable[str]]


def _loop_body(tool: Any) -> LoopFn:
    from agents import Agent, Runner

    async def loop(uid: str, tool_turns: int) -> str:
        agent = Agent(name="looper", model=_loop_model(uid, tool_turns), tools=[tool])
        result = await Runner.run(agent, "Work through the steps.", max_turns=TURNS + 5)
        return str(result.final_output)

    return loop


async def _timed(fn: Callable[[], Awaitable[object]], params: Params, n: int) -> dict[str, Any]:
    """Mean wall and CPU time (``time.process_time``: every thread of this process) of ``fn``."""
    for _ in range(params["warmup"]):
        await fn()
    cpu = time.process_time()
    timing = await timed_loop(fn, n=n, warmup=0, budget_s=params["budget_s"], min_n=5)
    cpu_us = (time.process_time() - cpu) / timing.n * 1e6
    return {"wall_us": timing.mean_us, "cpu_us": cpu_us, "n": timing.n}


async def _loops(loop: LoopFn, params: Params) -> dict[str, Any]:
    """The 20-turn loop and a 1-turn run of the same agent (the per-run part of the cost)."""
    from bench import workload

    figures: dict[str, Any] = {}
    for label, tool_turns, n in (
        ("loop", TURNS - 1, params["n_loops"]),
        ("one", 0, params["n_one"]),
    ):
        expected = f"done after {tool_turns}"

        async def once(tool_turns: int = tool_turns, expected: str = expected) -> None:
            out = await loop(workload.new_uid(), tool_turns)
            if out != expected:
                raise AssertionError(f"loop returned {out!r}, expected {expected!r}")

        figures[label] = await _timed(once, params, n)
    return figures


def _library_path() -> str:
    import tidebase_agents

    return str(Path(tidebase_agents.__file__).resolve().parent)


# --------------------------------------------------------------------------- configurations


async def bare(params: Params) -> dict[str, Any]:
    """The loop and the research pipeline on the plain SDK, then bench/configs.py's floors,
    unchanged: a committed ~1 KB insert on each backend (none of it imports the library)."""
    from bench import workload
    from bench.configs import floor_pg, floor_sqlite, run_checked

    figures = await _loops(_loop_body(_step_tool()), params)
    pipeline = workload.bare_pipeline()
    figures["research"] = await _timed(lambda: run_checked(pipeline), params, params["n_research"])
    figures["floor_pg"] = await floor_pg(params)
    figures["floor_sqlite"] = await floor_sqlite(params)
    return figures


async def _ours_loops(params: Params, url: str) -> dict[str, Any]:
    from bench import ours
    from bench.configs import StatementCounter, sqlite_synchronous
    from tidebase_agents import checkpointed_pipeline

    tide = ours.make_tidebase(url)
    try:
        pipeline = checkpointed_pipeline(LOOP_PIPELINE, tide=tide)(_loop_body(_step_tool()))
        figures = await _loops(pipeline, params)
        # Untimed: the statements one 20-turn pipeline sends (the journal is at work).
        counter = StatementCounter(tide)
        await pipeline("statements", TURNS - 1)
        figures["statements_per_loop"] = counter.statements
        if url.startswith("sqlite"):
            figures["sqlite_synchronous"] = await sqlite_synchronous(ours.library_engine(tide))
    finally:
        await ours.close_tidebase(tide)
    figures["library"] = _library_path()
    return figures


async def loop_pg(params: Params) -> dict[str, Any]:
    return await _ours_loops(params, params["pg_url"])


async def loop_sqlite(params: Params) -> dict[str, Any]:
    return await _ours_loops(
        params, f"sqlite+aiosqlite:///{Path(params['work_dir'], 'turns.sqlite')}"
    )


async def research(params: Params) -> dict[str, Any]:
    """The research pipeline under whichever tidebase_agents this interpreter imports (this
    checkout's, or the release before the journal's through ``PYTHONPATH``)."""
    from bench import ours
    from bench.configs import run_checked

    pipeline = ours.make_pipeline(params["research_url"])
    figures = await _timed(lambda: run_checked(pipeline), params, params["n_research"])
    return {**figures, "library": _library_path()}


CONFIGS: dict[str, Config] = {
    "bare": bare,
    "loop_pg": loop_pg,
    "loop_sqlite": loop_sqlite,
    "research_now": research,
    "research_before": research,
}


def child_main(name: str, params_json: str) -> int:
    try:
        figures = asyncio.run(CONFIGS[name](json.loads(params_json)))
    except BaseException as exc:  # report every failure, including SystemExit from libraries
        emit({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 1
    emit(figures)
    return 0


# --------------------------------------------------------------------------- orchestrator


def _env(pythonpath: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


class Children:
    """How each configuration's interpreter is started: this checkout's library, or (for
    ``research_before``) the old release's ahead of it on ``PYTHONPATH``, run from a directory
    that shadows neither."""

    def __init__(self, before_tree: Path | None, scratch: Path) -> None:
        self.before_tree = before_tree
        self.scratch = scratch

    def command_env(self, name: str) -> tuple[Path, dict[str, str]]:
        if name == "research_before" and self.before_tree is not None:
            return self.scratch, _env([str(self.before_tree), str(REPO_ROOT)])
        return REPO_ROOT, _env([str(REPO_ROOT)])

    def run(self, name: str, params: Params, timeout_s: float) -> dict[str, Any]:
        cwd, env = self.command_env(name)
        cmd = [sys.executable, "-m", "bench.turns", "--child", name, json.dumps(params)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f}s", "wall_s": timeout_s}
        wall_s = time.perf_counter() - start
        results = parse_results(proc.stdout)
        last = results[-1] if results else None
        if last is None or "error" in last or proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            error = last["error"] if last and "error" in last else " | ".join(tail)
            return {"error": error, "traceback": (last or {}).get("traceback"), "wall_s": wall_s}
        return {"figures": last, "wall_s": wall_s}


def _git(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def add_before_tree(scratch: Path) -> tuple[Path | None, str]:
    """Check the library of the release before the journal out into ``scratch`` (only its
    ``tidebase_agents`` package, so this checkout's ``bench`` stays the one imported)."""
    rev = _git("rev-parse", "--verify", f"{BEFORE_REV}^{{commit}}")
    if rev.returncode != 0:
        return None, f"cannot resolve {BEFORE_REV}: {rev.stderr.strip()}"
    sha = rev.stdout.strip()
    tree = scratch / "before"
    added = _git("worktree", "add", "--detach", "--no-checkout", str(tree), sha)
    if added.returncode != 0:
        return None, f"git worktree add failed: {added.stderr.strip()}"
    checkout = _git("checkout", sha, "--", "tidebase_agents", cwd=tree)
    if checkout.returncode != 0:
        return None, f"git checkout of {sha} failed: {checkout.stderr.strip()}"
    return tree, sha


def remove_before_tree(tree: Path) -> None:
    _git("worktree", "remove", "--force", str(tree))
    _git("worktree", "prune")


def migrate(children: Children, name: str, url: str, timeout_s: float) -> dict[str, Any]:
    """``tidebase-agents migrate`` of the library ``name``'s interpreter imports."""
    cwd, env = children.command_env(name)
    code = "import sys; from tidebase_agents._cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "migrate"],
        cwd=cwd,
        env={**env, "TIDEBASE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return {"ok": proc.returncode == 0, "output": output}


def order(repeat: int) -> list[str]:
    """One repeat's run order; the two library versions swap places every other repeat."""
    research = ["research_now", "research_before"]
    if repeat % 2 == 0:
        research.reverse()
    return ["bare", "loop_pg", "loop_sqlite", *research]


# --------------------------------------------------------------------------- summary


def _get(figures: dict[str, Any] | None, *path: str) -> float | None:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def per_repeat(run: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """One repeat's figures, each paired with the bare and floor figures of the same repeat."""

    def sub(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    fig = {name: outcome.get("figures") for name, outcome in run.items()}
    out: dict[str, float | None] = {}
    floor_pg = _get(fig.get("bare"), "floor_pg", "insert_commit_us")
    normal = _get(fig.get("loop_sqlite"), "sqlite_synchronous") == 1
    floor_sqlite = _get(
        fig.get("bare"), "floor_sqlite", "insert_commit_normal_us" if normal else "insert_commit_us"
    )
    out["floor_pg_insert_commit_us"] = floor_pg
    out["floor_sqlite_insert_commit_us"] = floor_sqlite
    out["bare_loop_us"] = _get(fig.get("bare"), "loop", "wall_us")
    for db, floor_us, suffix in (("pg", floor_pg, ""), ("sqlite", floor_sqlite, "_sqlite")):
        ours, base = fig.get(f"loop_{db}"), fig.get("bare")
        added = {
            (label, clock): sub(_get(ours, label, clock), _get(base, label, clock))
            for label in ("loop", "one")
            for clock in ("wall_us", "cpu_us")
        }
        per_turn = div(added["loop", "wall_us"], TURNS)
        # The per-run part (run, lease, agent step) taken out: what one more tool turn adds.
        marginal = div(sub(added["loop", "wall_us"], added["one", "wall_us"]), TURNS - 1)
        out[f"loop_us_{db}"] = _get(ours, "loop", "wall_us")
        out[f"turn_added_us_{db}"] = per_turn
        out[f"turn_added_cpu_us_{db}"] = div(added["loop", "cpu_us"], TURNS)
        out[f"turn_overhead_vs_commit_floor{suffix}"] = div(per_turn, floor_us)
        out[f"tool_turn_marginal_us_{db}"] = marginal
        out[f"tool_turn_marginal_cpu_us_{db}"] = div(
            sub(added["loop", "cpu_us"], added["one", "cpu_us"]), TURNS - 1
        )
        out[f"tool_turn_marginal_vs_commit_floor{suffix}"] = div(marginal, floor_us)
        out[f"statements_per_loop_{db}"] = _get(ours, "statements_per_loop")
    bare_research = _get(fig.get("bare"), "research", "wall_us")
    now = sub(_get(fig.get("research_now"), "wall_us"), bare_research)
    before = sub(_get(fig.get("research_before"), "wall_us"), bare_research)
    out["bare_research_us"] = bare_research
    out["research_overhead_us_now"] = now
    out["research_overhead_us_before"] = before
    out["research_overhead_delta_us"] = sub(now, before)
    out["research_overhead_vs_release_before"] = div(now, before)
    return out


def summarize(repeats: list[dict[str, float | None]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Medians over repeats, and min / median / max of each figure."""
    summary: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    for key in repeats[0] if repeats else []:
        values = [v for r in repeats if (v := r.get(key)) is not None]
        summary[key] = statistics.median(values) if values else None
        if values:
            spread[key] = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
            }
    return summary, spread


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        if len(argv) != 3 or argv[1] not in CONFIGS:
            sys.stderr.write(
                f"usage: python -m bench.turns --child {{{','.join(CONFIGS)}}} PARAMS\n"
            )
            return 2
        return child_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="python -m bench.turns", description=__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON path")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)

    started = time.perf_counter()
    base = pg_url()
    now_url = with_database(base, database_name(base) + NOW_DB_SUFFIX)
    before_url = with_database(base, database_name(base) + BEFORE_DB_SUFFIX)
    scratch = Path(tempfile.mkdtemp(prefix="tidebase-bench-turns-"))
    params: Params = {
        "pg_url": now_url,
        "work_dir": str(scratch),
        "warmup": 2 if args.quick else 3,
        "budget_s": 0.6 if args.quick else 1.5,
        "n_loops": 10 if args.quick else 30,
        "n_one": 40 if args.quick else 100,
        "n_research": 40 if args.quick else 100,
        "n_floor": 200 if args.quick else 500,
    }
    timeout = 120.0
    setup: dict[str, Any] = {}
    runs: list[dict[str, dict[str, Any]]] = []
    before_tree, before = add_before_tree(scratch)
    setup["before"] = {"rev": BEFORE_REV, "commit" if before_tree else "error": before}
    try:
        children = Children(before_tree, scratch)
        for url in (now_url, before_url):
            setup[database_name(url)] = asyncio.run(ensure_database(url, fresh=True))
        setup["migrate_now"] = migrate(children, "research_now", now_url, timeout)
        if before_tree is not None:
            setup["migrate_before"] = migrate(children, "research_before", before_url, timeout)
        for repeat in range(1, repeats + 1):
            run: dict[str, dict[str, Any]] = {}
            for name in order(repeat):
                if name == "research_before" and before_tree is None:
                    run[name] = {"error": f"no checkout of {BEFORE_REV}: {before}"}
                    continue
                url = before_url if name == "research_before" else now_url
                run[name] = children.run(name, {**params, "research_url": url}, timeout)
                status = "ok" if "figures" in run[name] else f"ERROR {run[name]['error'][:160]}"
                print(
                    f"[{repeat}/{repeats}] {name:<16} {run[name]['wall_s']:5.1f}s  {status}",
                    file=sys.stderr,
                )
            runs.append(run)
    finally:
        if before_tree is not None:
            remove_before_tree(before_tree)
        shutil.rmtree(scratch, ignore_errors=True)

    figures = [per_repeat(run) for run in runs]
    summary, spread = summarize(figures)
    wall_s = time.perf_counter() - started
    document = {
        **summary,
        "spread": spread,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(wall_s, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
        "commit": _git("rev-parse", "HEAD").stdout.strip(),
        "dirty": bool(_git("status", "--porcelain").stdout.strip()),
        "repeats": repeats,
        "quick": args.quick,
        "turns": TURNS,
        "params": {k: v for k, v in params.items() if k != "work_dir"},
        "setup": setup,
        "per_repeat": figures,
        "raw": runs,
    }
    for key, value in summary.items():
        lo_hi = spread.get(key)
        rng = f"  ({_fmt(lo_hi['min'])} .. {_fmt(lo_hi['max'])})" if lo_hi else ""
        print(f"  {key:<44} {_fmt(value)}{rng}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.output} in {wall_s:.0f}s", file=sys.stderr)
    errors = [f"{name}: {o['error']}" for run in runs for name, o in run.items() if "error" in o]
    for error in sorted(set(errors)):
        print(f"error: {error[:300]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
