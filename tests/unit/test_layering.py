"""The architecture as tests: which package may import what, no circles, one vocabulary.

Each check reads the library's source (every import, function-level ones included), so a change
that crosses a layer fails here before it is reviewed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import tidebase_agents
from tidebase_agents import Run
from tidebase_agents._vocab import RunStatus, StepStatus

PACKAGE = Path(tidebase_agents.__file__).parent
MODULES = {
    path: ".".join(
        ("tidebase_agents", *path.relative_to(PACKAGE).with_suffix("").parts)
    ).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
    if "migrations" not in path.relative_to(PACKAGE).parts
}


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import in ``path``."""
    module = MODULES[path]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from . import x` imports the submodule x
                if f"{target}.{alias.name}" in MODULES.values():
                    yield f"{target}.{alias.name}", node.lineno


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_only_the_sdk_package_imports_the_agents_sdk() -> None:
    leaks = [
        f"{path.relative_to(PACKAGE)}:{line} imports {target}"
        for path, module in MODULES.items()
        if not _in(module, "tidebase_agents._sdk")
        for target, line in _imports(path)
        if _in(target, "agents")
    ]
    assert leaks == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        (
            "tidebase_agents._store",
            ["_engine", "_sdk", "_tidebase", "_pipeline", "_worker", "_cli"],
        ),
        ("tidebase_agents._engine", ["_sdk", "_tidebase", "_pipeline", "_worker", "_cli"]),
        ("tidebase_agents._sdk", ["_tidebase", "_pipeline", "_worker", "_cli"]),
        # The inspector reads through the facade: records, never the store's machinery.
        (
            "tidebase_agents._ui",
            ["_engine", "_sdk", "_pipeline", "_worker", "_cli"]
            + [
                f"_store.{m}"
                for m in (
                    "base",
                    "postgres",
                    "sqlite",
                    "queue",
                    "registry",
                    "rows",
                    "sql",
                    "tables",
                )
            ],
        ),
    ],
)
def test_layers_import_only_downwards(layer: str, forbidden: list[str]) -> None:
    crossings = [
        f"{path.relative_to(PACKAGE)}:{line} imports {target}"
        for path, module in MODULES.items()
        if _in(module, layer)
        for target, line in _imports(path)
        if any(_in(target, f"tidebase_agents.{f}") for f in forbidden)
    ]
    assert crossings == []


_UI_STACK = ("starlette", "jinja2", "uvicorn")


def test_only_the_inspector_needs_the_ui_extra_and_only_the_cli_loads_it() -> None:
    outside = [
        f"{path.relative_to(PACKAGE)}:{line} imports {target}"
        for path, module in MODULES.items()
        if not _in(module, "tidebase_agents._ui")
        for target, line in _imports(path)
        if any(_in(target, dep) for dep in _UI_STACK)
        or (_in(target, "tidebase_agents._ui") and module != "tidebase_agents._cli")
    ]
    assert outside == []


def test_no_import_circles_among_the_library_modules() -> None:
    graph: dict[str, set[str]] = {module: set() for module in MODULES.values()}
    for path, module in MODULES.items():
        for target, _ in _imports(path):
            # An import of a.b.c also runs the __init__ of a.b: count the package too.
            parts = target.split(".")
            for n in range(2, len(parts) + 1):
                prefix = ".".join(parts[:n])
                if prefix in graph and prefix != module and not _in(module, prefix):
                    graph[module].add(prefix)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


_STATUSES = {str(s) for s in (*RunStatus, *StepStatus)}
_QUOTED_STATUS = re.compile(r"'(" + "|".join(sorted(_STATUSES)) + r")'")


def test_no_status_literal_outside_the_vocabulary_module() -> None:
    found = []
    for path in MODULES:
        if path.name == "_vocab.py":
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if "not the library's" in lines[getattr(node, "lineno", 1) - 1]:
                continue  # another API's vocabulary that happens to spell a status
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and (node.value in _STATUSES or _QUOTED_STATUS.search(node.value))
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert found == []


def test_every_private_sdk_import_is_marked_where_it_happens() -> None:
    unmarked = []
    for path, module in MODULES.items():
        if not _in(module, "tidebase_agents._sdk"):
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not _in(node.module or "", "agents"):
                continue
            private = any(part.startswith("_") for part in (node.module or "").split(".")) or any(
                a.name.startswith("_") for a in node.names
            )
            private = private or "run_internal" in (node.module or "")
            text = "\n".join(lines[node.lineno - 1 : (node.end_lineno or node.lineno)])
            if private and "SDK private" not in text:
                unmarked.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert unmarked == []


def test_the_public_run_shows_only_the_contract() -> None:
    public = sorted(name for name in dir(Run) if not name.startswith("_"))
    assert public == [
        "attempt",
        "pipeline",
        "run_id",
        "sleep",
        "state",
        "state_patch",
        "state_set",
        "step",
        "usage_record",
        "wait_for",  # W1
    ]


def test_every_public_name_is_exported_and_importable() -> None:
    for name in tidebase_agents.__all__:
        assert getattr(tidebase_agents, name) is not None, name
    assert sorted(tidebase_agents.__all__) == tidebase_agents.__all__
