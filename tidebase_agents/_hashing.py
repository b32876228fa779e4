"""Canonical JSON and SHA-256 input hashes (contract I5).

For plain JSON values the hash is SHA-256 over ``json.dumps(value, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8. Richer values first take a
defined canonical form, so equal inputs hash equal in every process.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

from ._codec import MAX_DEPTH, Walk, unstorable_string
from ._errors import CheckpointSerializationError


def canonical(value: Any, *, what: str = "value", path: str = "$") -> Any:
    """Return the canonical JSON form of ``value`` (plain dicts, lists, str, numbers, bools, None).

    Pydantic models dump in JSON mode, dataclasses as dicts of their fields, enums as their value,
    datetimes and dates as ISO 8601, bytes as base64, sets as sorted lists, tuples as lists.
    Anything else raises :class:`CheckpointSerializationError` naming ``what`` and the path, as
    do values nested too deep or containing themselves.
    """
    return _canonical(value, Walk(what), path, 0)


def _canonical(value: Any, walk: Walk, path: str, depth: int) -> Any:
    what = walk.what
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointSerializationError(
                f"{what}: non-finite float {value!r} at {path} has no JSON form"
            )
        return value
    if isinstance(value, enum.Enum):
        return _canonical(value.value, walk, path, depth + 1)
    if isinstance(value, BaseModel):
        walk.enter(value, path, depth)
        try:
            dumped = value.model_dump(mode="json")
        except (RecursionError, ValueError) as exc:
            raise CheckpointSerializationError(f"{what}: at {path}: {exc}") from None
        finally:
            walk.leave(value)
        return _canonical(dumped, walk, path, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        walk.enter(value, path, depth)
        try:
            return {
                f.name: _canonical(getattr(value, f.name), walk, f"{path}.{f.name}", depth + 1)
                for f in dataclasses.fields(value)
            }
        finally:
            walk.leave(value)
    if isinstance(value, Mapping):
        walk.enter(value, path, depth)
        try:
            out: dict[str, Any] = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise CheckpointSerializationError(
                        f"{what}: mapping key {k!r} at {path} is not a string"
                    )
                out[k] = _canonical(v, walk, f"{path}.{k}", depth + 1)
            return out
        finally:
            walk.leave(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        walk.enter(value, path, depth)
        try:
            if isinstance(value, (set, frozenset)):
                items = [_canonical(v, walk, f"{path}{{}}", depth + 1) for v in value]
                return sorted(items, key=dumps)
            return [_canonical(v, walk, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        finally:
            walk.leave(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (decimal.Decimal, uuid.UUID, PurePath)):
        return str(value)
    raise CheckpointSerializationError(
        f"{what}: value of type {type(value).__module__}.{type(value).__qualname__} at {path} "
        f"has no canonical JSON form (use JSON values, pydantic models, dataclasses or enums)"
    )


def dumps(value: Any) -> str:
    """Canonical JSON text of an already-canonical value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any, *, what: str = "value") -> str:
    """The canonical JSON text of ``value`` (what its hash is taken over)."""
    if _plain(value, 0):
        # Already its own canonical form: most hashed values (agent settings, tool schemas,
        # model input items) are plain JSON, and checking that is a fraction of the full walk.
        return dumps(value)
    return dumps(canonical(value, what=what))


def _plain(value: Any, depth: int) -> bool:
    """Whether ``value`` is plain JSON that :func:`canonical` returns unchanged: exact dicts
    with string keys, lists, strings, ints, bools, None and finite floats, no deeper than the
    walk allows (a value that contains itself goes deeper than that)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if depth > MAX_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _plain(item, depth + 1):
                return False
        return True
    if kind is list:
        for item in value:  # noqa: SIM110 - a loop: all() over a generator is slower here
            if not _plain(item, depth + 1):
                return False
        return True
    return False


def sha256_text(text: str, *, what: str = "value") -> str:
    """SHA-256 (hex) of canonical JSON text."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        where, bad = unstorable_string(json.loads(text))
        raise CheckpointSerializationError(
            f"{what}: the string at {where[:200]} contains {bad}, which has no UTF-8 form"
        ) from None
    return hashlib.sha256(data).hexdigest()


def sha256_hex(value: Any, *, what: str = "value") -> str:
    """SHA-256 (hex) of the canonical JSON of ``value``."""
    return sha256_text(canonical_json(value, what=what), what=what)


def parts_hash(
    parts: Mapping[str, Any], *, what: str = "value", hashed: Mapping[str, str] | None = None
) -> tuple[str, dict[str, str]]:
    """Hash a mapping of named parts; return the whole hash and a hash per part.

    The per-part hashes let a mismatch name which part changed without storing the parts.
    ``hashed`` holds parts whose hash the caller already took.
    """
    per_part = {name: sha256_hex(value, what=f"{what} ({name})") for name, value in parts.items()}
    if hashed:
        per_part.update(hashed)
    return sha256_hex(per_part), per_part
