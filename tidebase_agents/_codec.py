"""JSON codec for checkpoints: values come back with the type they were recorded with (R14).

Checkpoints are plain JSON, never pickle. A checkpoint names the classes of its dataclasses,
enums and pydantic models, but reading it constructs only classes this process *registered*:
the annotated parameter and return types of pipelines, durable tools and step functions (and
the types their fields name), plus whatever the user passed to :func:`register_types`. Any
other name is refused with :class:`CheckpointSerializationError` before anything is built, so
a tampered checkpoint cannot make the library instantiate an arbitrary class. Encoding refuses
unregistered classes too, so the problem shows the first time a run writes, not when a crashed
run resumes in another process.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import typing
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from ._errors import CheckpointSerializationError

_TAG = "$t"
#: Deepest nesting a checkpoint value may have (JSON from real programs stays far below).
MAX_DEPTH = 200

_CONSTRUCTED = (BaseModel, enum.Enum)
_registry: dict[str, type] = {}
# Code objects whose annotations are registered already (step functions are seen per call).
_annotated: set[Any] = set()
#: Longest JSON text of a step's input kept for people to read; longer ones keep a preview.
STEP_INPUT_MAX_BYTES = 4096
_PREVIEW_CHARS = 1000


def _class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _constructible(obj: object) -> bool:
    return isinstance(obj, type) and (
        issubclass(obj, _CONSTRUCTED) or dataclasses.is_dataclass(obj)
    )


def register_types(*types_: type) -> None:
    """Allow checkpoints to hold (and rebuild) values of these dataclasses, enums and pydantic
    models, and of the types their fields name.

    Pipelines, durable tools and step functions register their annotated types themselves;
    call this for types that appear only inside ``Any``-typed values (a lambda's result, say).
    """
    for cls in types_:
        if not _constructible(cls):
            raise CheckpointSerializationError(
                f"register_types takes dataclasses, enums and pydantic models, got {cls!r}"
            )
        _register_hint(cls, set())


def register_annotations(fn: Callable[..., Any]) -> None:
    """Register the types named by ``fn``'s parameter and return annotations (best effort:
    annotations that cannot be resolved are left alone; encoding then says what to register)."""
    code = getattr(fn, "__code__", None)
    if not getattr(fn, "__annotations__", None) or code in _annotated:
        return
    if code is not None:
        _annotated.add(code)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable forward references, exotic annotations
        return
    seen: set[int] = set()
    for hint in hints.values():
        _register_hint(hint, seen)


def _register_hint(hint: Any, seen: set[int]) -> None:
    if id(hint) in seen:
        return
    seen.add(id(hint))
    if _constructible(hint):
        _registry.setdefault(_class_ref(hint), hint)
        for field_hint in _field_hints(hint):
            _register_hint(field_hint, seen)
        return
    for arg in typing.get_args(hint):
        _register_hint(arg, seen)


def _field_hints(cls: type) -> Iterable[Any]:
    if issubclass(cls, BaseModel):
        return [f.annotation for f in cls.model_fields.values()]
    if dataclasses.is_dataclass(cls):
        try:
            return list(typing.get_type_hints(cls).values())
        except Exception:
            return []
    return []


def class_ref(cls: type) -> str:
    """How checkpoints name a class (``module:qualname``)."""
    return _class_ref(cls)


def registered_type(ref: str) -> type | None:
    """The registered class a checkpoint's ``module:qualname`` names, or None."""
    return _registry.get(ref)


def _check_registered(cls: type, what: str, path: str) -> str:
    ref = _class_ref(cls)
    if _registry.get(ref) is not cls:
        raise CheckpointSerializationError(
            f"{what}: {ref} at {path} is not a registered checkpoint type; annotate the "
            f"pipeline, tool or step function that returns it, or call "
            f"tidebase_agents.register_types({cls.__qualname__}) where it is defined"
        )
    return ref


def _resolve_class(ref: object, expected: type | None, what: str) -> type:
    cls = _registry.get(ref) if isinstance(ref, str) else None
    if cls is None:
        raise CheckpointSerializationError(
            f"{what}: the checkpoint names {ref!r}, which is not a registered checkpoint type "
            f"in this process; nothing was constructed (register it with "
            f"tidebase_agents.register_types, or import the module that defines the pipeline)"
        )
    if expected is not None and not (isinstance(cls, type) and issubclass(cls, expected)):
        raise CheckpointSerializationError(f"{what}: {ref!r} is not a {expected.__name__}")
    return cls


class Walk:
    """Depth and cycle bookkeeping for one encode, decode or canonical walk."""

    __slots__ = ("on_path", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.on_path: set[int] = set()

    def enter(self, value: object, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CheckpointSerializationError(
                f"{self.what}: nested deeper than {MAX_DEPTH} levels at {path[:200]}"
            )
        if id(value) in self.on_path:
            raise CheckpointSerializationError(f"{self.what}: contains itself at {path[:200]}")
        self.on_path.add(id(value))

    def leave(self, value: object) -> None:
        self.on_path.discard(id(value))


def encode(value: Any, *, what: str = "output", path: str = "$") -> Any:
    """Encode ``value`` as JSON-able data that :func:`decode` turns back into an equal value."""
    return _encode(value, Walk(what), path, 0)


def _encode(value: Any, walk: Walk, path: str, depth: int) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value) is int:
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {_TAG: "float", "v": repr(value)}
    what = walk.what
    if isinstance(value, enum.Enum):
        ref = _check_registered(type(value), what, path)
        return {_TAG: "enum", "cls": ref, "v": _encode(value.value, walk, path, depth + 1)}
    if isinstance(value, BaseModel):
        ref = _check_registered(type(value), what, path)
        walk.enter(value, path, depth)
        try:
            dumped = value.model_dump(mode="json")
        except (RecursionError, ValueError) as exc:
            raise CheckpointSerializationError(f"{what}: {ref} at {path}: {exc}") from None
        finally:
            walk.leave(value)
        return {_TAG: "pydantic", "cls": ref, "v": dumped}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        ref = _check_registered(type(value), what, path)
        walk.enter(value, path, depth)
        try:
            fields = {
                f.name: _encode(getattr(value, f.name), walk, f"{path}.{f.name}", depth + 1)
                for f in dataclasses.fields(value)
                if f.init
            }
        finally:
            walk.leave(value)
        return {_TAG: "dataclass", "cls": ref, "v": fields}
    if isinstance(value, dict):
        walk.enter(value, path, depth)
        try:
            out: dict[str, Any] = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise CheckpointSerializationError(
                        f"{what}: dict key {k!r} at {path} is not a string; JSON objects need "
                        f"string keys"
                    )
                out[k] = _encode(v, walk, f"{path}.{k}", depth + 1)
        finally:
            walk.leave(value)
        return {_TAG: "dict", "v": out} if _TAG in out else out
    if isinstance(value, (list, tuple, set, frozenset)):
        walk.enter(value, path, depth)
        try:
            items = [_encode(v, walk, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        finally:
            walk.leave(value)
        if isinstance(value, list):
            return items
        kind = (
            "tuple"
            if isinstance(value, tuple)
            else "frozenset"
            if isinstance(value, frozenset)
            else "set"
        )
        return {_TAG: kind, "v": items}
    if isinstance(value, dt.datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, dt.date):
        return {_TAG: "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return {_TAG: "time", "v": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {_TAG: "timedelta", "v": value.total_seconds()}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, decimal.Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, uuid.UUID):
        return {_TAG: "uuid", "v": str(value)}
    raise CheckpointSerializationError(
        f"{what}: cannot checkpoint a value of type "
        f"{type(value).__module__}.{type(value).__qualname__} at {path}; return JSON values, "
        f"pydantic models, dataclasses, enums, datetimes, bytes, sets or tuples"
    )


def decode(data: Any, *, what: str = "checkpoint") -> Any:
    """Inverse of :func:`encode`. Raises :class:`CheckpointSerializationError` for anything a
    checkpoint written by :func:`encode` could not hold."""
    try:
        return _decode(data, Walk(what), "$", 0)
    except CheckpointSerializationError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ValidationError, OverflowError) as exc:
        raise CheckpointSerializationError(
            f"{what}: the checkpoint is malformed: {type(exc).__name__}: {exc}"
        ) from None


def _decode(data: Any, walk: Walk, path: str, depth: int) -> Any:
    if isinstance(data, list):
        walk.enter(data, path, depth)
        try:
            return [_decode(v, walk, f"{path}[{i}]", depth + 1) for i, v in enumerate(data)]
        finally:
            walk.leave(data)
    if not isinstance(data, dict):
        return data
    walk.enter(data, path, depth)
    try:
        tag = data.get(_TAG)
        if tag is None:
            return {k: _decode(v, walk, f"{path}.{k}", depth + 1) for k, v in data.items()}
        return _decode_tagged(tag, data, walk, path, depth)
    finally:
        walk.leave(data)


def _decode_tagged(tag: Any, data: dict[str, Any], walk: Walk, path: str, depth: int) -> Any:
    v: Any = data.get("v")
    what = walk.what

    def inner(x: Any) -> Any:
        return _decode(x, walk, path, depth + 1)

    if tag == "dict":
        return {k: inner(x) for k, x in _mapping(v, what).items()}
    if tag == "pydantic":
        model = _resolve_class(data.get("cls"), BaseModel, what)
        return model.model_validate(v)  # type: ignore[attr-defined]
    if tag == "dataclass":
        cls = _resolve_class(data.get("cls"), None, what)
        if not dataclasses.is_dataclass(cls):
            raise CheckpointSerializationError(f"{what}: {data.get('cls')!r} is not a dataclass")
        return cls(**{k: inner(x) for k, x in _mapping(v, what).items()})
    if tag == "enum":
        return _resolve_class(data.get("cls"), enum.Enum, what)(inner(v))
    if tag in ("tuple", "set", "frozenset"):
        if not isinstance(v, list):
            raise CheckpointSerializationError(f"{what}: {tag} at {path} is not a list")
        items = [inner(x) for x in v]
        return tuple(items) if tag == "tuple" else set(items) if tag == "set" else frozenset(items)
    if tag == "float":
        if v not in ("nan", "inf", "-inf"):
            raise CheckpointSerializationError(f"{what}: bad float {v!r} at {path}")
        return float(v)
    simple = _SIMPLE.get(tag) if isinstance(tag, str) else None
    if simple is None:
        raise CheckpointSerializationError(f"{what}: unknown checkpoint tag {tag!r} at {path}")
    return simple(v)


def _mapping(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise CheckpointSerializationError(f"{what}: expected an object, got {type(v).__name__}")
    return v


def _b64(v: Any) -> bytes:
    return base64.b64decode(v, validate=True)


_SIMPLE: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "timedelta": lambda v: dt.timedelta(seconds=float(v)),
    "bytes": _b64,
    "decimal": lambda v: decimal.Decimal(str(v)),
    "uuid": lambda v: uuid.UUID(str(v)),
}


def dump_json(value: Any) -> str:
    """``value`` as compact JSON text, as stored. Raises ``ValueError`` for NaN or infinity."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def checked_json(value: Any, what: str) -> str:
    """The stored JSON text of an encoded value, refusing what no database can store: NUL
    characters (PostgreSQL's JSON and text types reject them) and lone surrogates (they have
    no UTF-8 form). The path to the offending string is found only when there is one."""
    try:
        text = dump_json(value)
    except (ValueError, RecursionError) as exc:
        raise CheckpointSerializationError(f"{what} cannot be stored as JSON: {exc}") from None
    if "\\u0000" in text or not _utf8(text):
        where, bad = unstorable_string(value)
        raise CheckpointSerializationError(
            f"{what}: the string at {where[:200]} contains {bad}, which cannot be stored"
        )
    return text


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unstorable_string(value: Any) -> tuple[str, str]:
    """(path, what is wrong) of the first string in JSON data no database can store."""
    return _bad_string(value, "$")


def _bad_string(value: Any, path: str) -> tuple[str, str]:
    if isinstance(value, str):
        if "\x00" in value:
            return path, "a NUL character"
        if not _utf8(value):
            return path, "a lone surrogate"
    elif isinstance(value, dict):
        for k, v in value.items():
            if _bad_string(k, path)[1]:
                return f"{path} (a key)", _bad_string(k, path)[1]
            found = _bad_string(v, f"{path}.{k}")
            if found[1]:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _bad_string(v, f"{path}[{i}]")
            if found[1]:
                return found
    return path, ""


def bounded_json(text: str, limit: int = STEP_INPUT_MAX_BYTES) -> str:
    """``text`` (JSON) if it fits in ``limit`` bytes, else a JSON object holding its size and
    a preview: what a step's recorded input looks like when the input is large. A NUL
    character, which no database stores, reads as U+FFFD (the input is only shown)."""
    text = text.replace("\\u0000", "\\ufffd")
    if len(text) <= limit // 4 or len(text.encode("utf-8")) <= limit:
        return text
    return json.dumps(
        {"truncated": True, "bytes": len(text.encode("utf-8")), "preview": text[:_PREVIEW_CHARS]},
        ensure_ascii=False,
        separators=(",", ":"),
    )
