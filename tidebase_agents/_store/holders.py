"""Who holds a running run, told apart from its owner label: a process identity a reused pid
cannot fake, and whether that process provably no longer exists (P3).

A process is ``host:pid:start``: ``host`` is this boot of this machine and its pid namespace
(``/proc/sys/kernel/random/boot_id`` and ``/proc/self/ns/pid``), ``start`` the process's start
time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``). Two processes with the same
identity cannot exist; a pid handed to a new process after the holder died gets another start
time. Only a process on the same host (same boot, same pid namespace) can be checked; elsewhere,
and where there is no ``/proc``, nothing is ever declared dead and the lease decides.
``$TIDEBASE_HOST_ID`` replaces the host part (tests run "machines" as processes of one).
"""

from __future__ import annotations

import os

HOST_ENV = "TIDEBASE_HOST_ID"

_identity: tuple[int, str | None] | None = None


def host_id() -> str | None:
    """This machine's boot and pid namespace, or ``$TIDEBASE_HOST_ID``; None without /proc."""
    override = os.environ.get(HOST_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return None
    return f"{boot}/{namespace.removeprefix('pid:[').removesuffix(']')}"


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of process ``pid``, None if there is none; raises OSError when it
    cannot be told."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold anything: count after it.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def this_process() -> str | None:
    """The identity of the calling process (a forked child gets its own), or None where
    processes cannot be told apart by more than their pid."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        host = host_id()
        try:
            stat = None if host is None else _stat(pid)
        except (OSError, ValueError, IndexError):
            stat = None
        _identity = (pid, None if stat is None else f"{host}:{pid}:{stat[1]}")
    return _identity[1]


def process_gone(identity: str | None) -> bool:
    """Whether the process ``identity`` names provably no longer exists: it ran on this host,
    and its pid is free, a zombie's, or another process's."""
    if not identity:
        return False
    parts = identity.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid, start = parts
    if not host or host != host_id() or not pid.isdigit():
        return False
    try:
        stat = _stat(int(pid))
    except (OSError, ValueError, IndexError):
        return False  # cannot tell: the lease decides
    if stat is None:
        return True
    state, started = stat
    return state in ("Z", "X") or started != start
