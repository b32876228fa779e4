"""Process identities of lease holders (P3): a dead holder is told from a live one by more than
its pid, and only on the machine (boot and pid namespace) it ran on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidebase_agents._store import holders

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def identity_of(pid: int) -> str:
    stat = holders._stat(pid)
    assert stat is not None
    return f"{holders.host_id()}:{pid}:{stat[1]}"


def test_this_process_is_alive_and_named_by_host_pid_and_start() -> None:
    me = holders.this_process()
    assert me is not None and me == identity_of(os.getpid())
    assert not holders.process_gone(me)


def test_a_dead_process_is_gone_as_a_zombie_and_once_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = identity_of(child.pid)
    while (holders._stat(child.pid) or ("Z",))[0] != "Z":
        time.sleep(0.01)
    assert holders.process_gone(identity), "a zombie (exited, not yet reaped) holds nothing"
    child.wait()
    assert holders.process_gone(identity)


def test_a_reused_pid_is_not_mistaken_for_the_holder() -> None:
    """The same pid with another start time is another process: the holder is gone."""
    me = holders.this_process()
    assert me is not None
    host, pid, start = me.rsplit(":", 2)
    assert holders.process_gone(f"{host}:{pid}:{int(start) - 1}")


def test_a_process_of_another_machine_is_never_declared_dead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = identity_of(gone.pid)
    gone.wait()
    assert holders.process_gone(identity)
    monkeypatch.setenv(holders.HOST_ENV, "another-machine")
    assert not holders.process_gone(identity), "its pids are not this machine's to look at"
    assert not holders.process_gone(None) and not holders.process_gone("garbage")
