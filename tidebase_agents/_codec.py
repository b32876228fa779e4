"""JSON codec for step outputs: values come back with the type they were recorded with.

Checkpoints are plain JSON (never pickle). Decoding looks classes up among modules already
imported by the process and never imports or executes code named by a checkpoint.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import sys
import uuid
from typing import Any

from pydantic import BaseModel

from ._errors import CheckpointSerializationError

_TAG = "$t"


def _class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(ref: str) -> type:
    module_name, _, qualname = ref.partition(":")
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        raise CheckpointSerializationError(
            f"checkpoint refers to {ref}, but module {module_name!r} is not imported in this "
            f"process; import it before resuming (checkpoints never import code themselves)"
        )
    for attr in qualname.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            raise CheckpointSerializationError(f"checkpoint refers to {ref}, which does not exist")
    if not isinstance(obj, type):
        raise CheckpointSerializationError(f"checkpoint refers to {ref}, which is not a class")
    return obj


def encode(value: Any, *, what: str = "output", path: str = "$") -> Any:
    """Encode ``value`` as JSON-able data that :func:`decode` turns back into an equal value."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and type(value) is int:
        return value
    if isinstance(value, float) and type(value) is float:
        if not math.isfinite(value):
            return {_TAG: "float", "v": repr(value)}
        return value
    if isinstance(value, enum.Enum):
        return {_TAG: "enum", "cls": _class_ref(type(value)), "v": encode(value.value, what=what)}
    if isinstance(value, BaseModel):
        return {
            _TAG: "pydantic",
            "cls": _class_ref(type(value)),
            "v": value.model_dump(mode="json"),
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            _TAG: "dataclass",
            "cls": _class_ref(type(value)),
            "v": {
                f.name: encode(getattr(value, f.name), what=what, path=f"{path}.{f.name}")
                for f in dataclasses.fields(value)
                if f.init
            },
        }
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointSerializationError(
                    f"{what}: dict key {k!r} at {path} is not a string; JSON objects need string keys"
                )
            out[k] = encode(v, what=what, path=f"{path}.{k}")
        return {_TAG: "dict", "v": out} if _TAG in out else out
    if isinstance(value, list):
        return [encode(v, what=what, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {
            _TAG: "tuple",
            "v": [encode(v, what=what, path=f"{path}[{i}]") for i, v in enumerate(value)],
        }
    if isinstance(value, (set, frozenset)):
        kind = "frozenset" if isinstance(value, frozenset) else "set"
        return {_TAG: kind, "v": [encode(v, what=what, path=f"{path}{{}}") for v in value]}
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
    """Inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in data.items()}
    v: Any = data.get("v")
    if tag == "dict":
        return {k: decode(x) for k, x in v.items()}
    if tag == "pydantic":
        cls = _resolve_class(data["cls"])
        return cls.model_validate(v)  # type: ignore[attr-defined]
    if tag == "dataclass":
        cls = _resolve_class(data["cls"])
        return cls(**{k: decode(x) for k, x in v.items()})
    if tag == "enum":
        return _resolve_class(data["cls"])(decode(v))
    if tag == "tuple":
        return tuple(decode(x) for x in v)
    if tag == "set":
        return {decode(x) for x in v}
    if tag == "frozenset":
        return frozenset(decode(x) for x in v)
    if tag == "float":
        return float(v)
    if tag == "datetime":
        return dt.datetime.fromisoformat(v)
    if tag == "date":
        return dt.date.fromisoformat(v)
    if tag == "time":
        return dt.time.fromisoformat(v)
    if tag == "timedelta":
        return dt.timedelta(seconds=v)
    if tag == "bytes":
        return base64.b64decode(v)
    if tag == "decimal":
        return decimal.Decimal(v)
    if tag == "uuid":
        return uuid.UUID(v)
    raise CheckpointSerializationError(f"unknown checkpoint tag {tag!r}")


def dump_json(value: Any) -> str:
    """``value`` as compact JSON text, as stored. Raises ``ValueError`` for NaN or infinity."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
