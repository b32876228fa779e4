"""A fork server for fault trials: fresh child processes without a 2.5 s import each.

Importing the Agents SDK takes seconds, and a fault trial starts several processes (each attempt
of a run, each resume, each CLI call). The zygote is one interpreter that imports the heavy
modules once, never opens a database or an event loop, and forks a child per request: every
child is a real, fresh process (its own pid, no state from earlier attempts) that can be
SIGKILLed, and whose exit status the zygote reports back.

Protocol (JSON lines): the test process writes ``{"id", "target", "kwargs", "stdout",
"stderr"}`` to the zygote's stdin; the zygote answers ``{"id", "pid"}`` once forked and
``{"pid", "status"}`` when that child ends (``status`` as ``subprocess`` reports it: the exit
code, or minus the signal number). ``target`` is ``module:function``; a coroutine function runs
under ``asyncio.run``. The child's last stdout line is its JSON report: ``{"outcome": "ok",
...}`` (the function's dict merged in) or the exception's type name, qualified type and
message.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import importlib
import inspect
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SUPPORT_DIR = Path(__file__).parent


# -- the zygote process -------------------------------------------------------------------------


def serve(preload: list[str]) -> None:
    """Main loop of the zygote process (``python -c "import zygote; zygote.serve([...])"``)."""
    for module in preload:
        importlib.import_module(module)
    children: set[int] = set()
    buffer = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.01)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                break  # the test process is gone
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request)  # never returns
                children.add(pid)
                _answer({"id": request["id"], "pid": pid})
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                _answer({"pid": pid, "status": code})
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _answer(message: dict[str, Any]) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _child(request: dict[str, Any]) -> None:
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.close(devnull)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        random.seed()
        faulthandler.enable()
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        code = run_target(request["target"], request["kwargs"])
    except BaseException as exc:  # report anything, then die without running cleanup
        with contextlib.suppress(BaseException):
            print(f"zygote child failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_target(target: str, kwargs: dict[str, Any]) -> int:
    """Call ``module:function(**kwargs)`` and print its report as the last stdout line."""
    module_name, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module_name), name)
    try:
        result = asyncio.run(fn(**kwargs)) if inspect.iscoroutinefunction(fn) else fn(**kwargs)
        if isinstance(result, int) and not isinstance(result, bool):
            return result  # an exit code (the CLI)
        report: dict[str, Any] = {"outcome": "ok", **(result or {})}
    except Exception as exc:
        report = {
            "outcome": type(exc).__name__,
            "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "library_error": _is_library_error(exc),
            "message": str(exc)[:2000],
        }
    print(json.dumps(report, default=repr), flush=True)
    return 0


def _is_library_error(exc: BaseException) -> bool:
    from tidebase_agents import TidebaseError

    return isinstance(exc, TidebaseError)


# -- the test process's side --------------------------------------------------------------------


class Forked:
    """A child forked by the zygote."""

    def __init__(self, zygote: Zygote, pid: int, stdout: Path, stderr: Path) -> None:
        self._zygote = zygote
        self.pid = pid
        self.stdout_path = stdout
        self.stderr_path = stderr
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        if self._returncode is None:
            self._returncode = self._zygote.status_of(self.pid)
        return self._returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the child is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.returncode is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.01)
        return self.returncode

    async def stop(self) -> str:
        """Kill a hung child, after dumping its stacks; returns the tail of its stderr."""
        self.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        self.kill()
        await self.wait(30)
        return self.stderr[-6000:]

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def report(self) -> dict[str, Any] | None:
        """The JSON report the child printed last, or None if it printed none."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else None


class Zygote:
    """The test process's handle on a zygote (see the module docstring)."""

    def __init__(self, preload: list[str]) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(SUPPORT_DIR), os.environ.get("PYTHONPATH")])
            ),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import zygote; zygote.serve({preload!r})"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._lock = threading.Condition()
        self._pids: dict[int, int] = {}
        self._status: dict[int, int] = {}
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self._lock:
                if "id" in message:
                    # An earlier child with this pid was reaped, and reported, before the fork.
                    self._status.pop(message["pid"], None)
                    self._pids[message["id"]] = message["pid"]
                else:
                    self._status[message["pid"]] = message["status"]
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def spawn(self, target: str, kwargs: dict[str, Any], directory: Path, label: str) -> Forked:
        """Fork a child running ``target(**kwargs)``; its output goes to ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        stdout, stderr = directory / f"{label}.out", directory / f"{label}.err"
        with self._lock:
            self._next += 1
            request_id = self._next
        request = {
            "id": request_id,
            "target": target,
            "kwargs": kwargs,
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + 60
        with self._lock:
            while request_id not in self._pids:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the zygote did not fork a child")
                self._lock.wait(0.1)
            pid = self._pids.pop(request_id)
        return Forked(self, pid, stdout, stderr)

    def status_of(self, pid: int) -> int | None:
        with self._lock:
            return self._status.get(pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
