"""Identifiers: run ids, step names, idempotency keys, and who an executor is."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid

from ._errors import ConfigurationError

#: Printable characters only: no whitespace, no control characters, no lone surrogates (they
#: cannot be encoded as UTF-8, so no database can store them).
_RUN_ID = re.compile(r"[^\s\x00-\x1f\x7f\ud800-\udfff]{1,255}")
_BAD_TEXT = re.compile(r"[\x00\ud800-\udfff]")
#: Longest step name the steps table holds.
MAX_STEP_NAME = 1000


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a usable run id, else raise :class:`ConfigurationError`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigurationError(
            f"invalid run id {run_id!r}: use 1 to 255 characters without whitespace, control "
            f"characters or lone surrogates"
        )
    return run_id


def validate_step_name(name: object) -> str:
    """Return ``name`` if it can name a step, else raise :class:`ConfigurationError`."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"step name must be a non-empty string, got {name!r}")
    if len(name) > MAX_STEP_NAME:
        raise ConfigurationError(
            f"step name {name[:60]!r}... is {len(name)} characters; the limit is {MAX_STEP_NAME}"
        )
    bad = _BAD_TEXT.search(name)
    if bad is not None:
        raise ConfigurationError(
            f"step name {name!r} contains {bad.group()!r} at index {bad.start()}: NUL characters "
            f"and lone surrogates cannot be stored"
        )
    return name


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex}"


def derive_idempotency_key(run_id: str, step_name: str) -> str:
    """The idempotency key of a step: a function of run id and step name only (I4)."""
    digest = hashlib.sha256(f"{run_id}\x00{step_name}".encode()).hexdigest()
    return f"tb-{digest[:40]}"


_owner: tuple[int, str] | None = None


def process_owner() -> str:
    """This process's executor label, ``host:pid:nonce``; a forked child gets its own."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:
        _owner = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:6]}")
    return _owner[1]
