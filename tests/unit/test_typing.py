"""The README's examples type-check as an application would check them: ``mypy --strict`` and
pyright (strict) accept a module written from them, and both reject the wrong calls of
another module, line by line (so the check can fail)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tidebase_agents

TYPED = Path(__file__).resolve().parents[1] / "support" / "typed"
#: Where the package is imported from: editable installs hide it from static checkers, so
#: both are pointed at it the way the README says.
PACKAGE_ROOT = Path(tidebase_agents.__file__).resolve().parent.parent
APP, MISUSE = "readme_app.py", "readme_misuse.py"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user project holding the two modules, configured for both checkers."""
    root = tmp_path_factory.mktemp("typed-project")
    for name in (APP, MISUSE):
        shutil.copy(TYPED / name, root / name)
    (root / "mypy.ini").write_text(
        "[mypy]\nstrict = True\n"
        f"mypy_path = {PACKAGE_ROOT}\n"
        # As for an installed package: its own modules are not the application's to fix.
        "[mypy-tidebase_agents.*]\nfollow_imports = silent\n"
        "[mypy-asyncpg.*]\nignore_missing_imports = True\n"
    )
    (root / "pyrightconfig.json").write_text(
        json.dumps(
            {
                "typeCheckingMode": "strict",
                "extraPaths": [str(PACKAGE_ROOT)],
                "pythonVersion": "3.10",
            }
        )
    )
    return root


def rejected_lines(path: Path) -> set[int]:
    """Lines of code ending in a ``# rejected: why`` comment."""
    marked = re.compile(r"\S.*  # rejected: ")
    return {i for i, line in enumerate(path.read_text().splitlines(), 1) if marked.search(line)}


def mypy(project: Path, module: str) -> tuple[int, set[int], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(project / ".mypy_cache"), module],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = {
        int(m[1]) for m in re.finditer(rf"^{re.escape(module)}:(\d+): error:", proc.stdout, re.M)
    }
    return proc.returncode, lines, proc.stdout + proc.stderr


def pyright(project: Path, module: str) -> tuple[int, set[int], str]:
    exe = shutil.which("pyright")
    if exe is None:
        pytest.skip("pyright is not installed (pip install -e '.[test]')")
    proc = subprocess.run(
        [exe, "--outputjson", module], cwd=project, capture_output=True, text=True, timeout=600
    )
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"pyright did not run: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    lines = {d["range"]["start"]["line"] + 1 for d in errors}
    return proc.returncode, lines, json.dumps(errors, indent=1)


def test_readme_examples_pass_mypy_strict(project: Path) -> None:
    code, lines, output = mypy(project, APP)
    assert (code, lines) == (0, set()), output


def test_readme_examples_pass_pyright_strict(project: Path) -> None:
    code, lines, output = pyright(project, APP)
    assert (code, lines) == (0, set()), output


def test_mypy_rejects_each_wrong_call(project: Path) -> None:
    code, lines, output = mypy(project, MISUSE)
    assert code == 1
    assert lines == rejected_lines(TYPED / MISUSE), output


def test_pyright_rejects_each_wrong_call(project: Path) -> None:
    code, lines, output = pyright(project, MISUSE)
    assert code == 1
    assert lines == rejected_lines(TYPED / MISUSE), output
