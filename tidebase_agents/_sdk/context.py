"""The user's run context in agent checkpoints (R16).

An agent step's checkpoint holds, beside the SDK's ``RunState`` (whose context stays blanked),
a JSON snapshot of the context as the step ended. Replaying the step brings the caller's live
context object to that state *in place*, so every reference the caller holds sees it. A
durable tool call's checkpoint holds one too, so that an agent run re-executed after a crash
sees the context as the calls it replays left it.

Snapshots carry no class names: they are encoded and decoded with the type of the caller's
live object (R14). Supported on their own: pydantic models, dataclasses (through pydantic) and
mappings of plain JSON values; anything else needs a :class:`ContextCodec` passed to
``@checkpointed_pipeline(context_codec=...)``, else it is left as the pipeline has it, with a
:class:`~tidebase_agents.NotDurableWarning` once per type.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol, runtime_checkable

from agents import RunContextWrapper
from agents.run_state import RunState
from pydantic import BaseModel, TypeAdapter

from .._engine import StepSpec, current_pipeline_options
from .._errors import CheckpointSerializationError, NotDurableWarning
from .result_codec import _is_plain_json


@runtime_checkable
class ContextCodec(Protocol):
    """How a pipeline's run context is checkpointed, for contexts the library cannot snapshot
    on its own (or to store only part of one).

    ``dump(context)`` returns a JSON value (dicts, lists, strings, numbers, booleans, None);
    ``restore(context, data)`` brings the live ``context`` to the state ``data`` describes, in
    place. Both are called with the caller's own context object (never None).
    """

    def dump(self, context: Any) -> Any: ...

    def restore(self, context: Any, data: Any) -> None: ...


class _Unsupported(Exception):
    """The context cannot be snapshotted faithfully (the message says why)."""


_PYDANTIC = "pydantic"
_DATACLASS = "dataclass"
_MAPPING = "mapping"
_CODEC = "codec"

#: How a durable tool call's checkpoint holds its output beside the context: a top-level "$t"
#: object the step codec never writes for a value (it escapes dicts with that key).
_WITH_CONTEXT = "with_context"

_warned: set[type] = set()
_warned_lock = threading.Lock()


def effective_context(context: Any, run_input: Any) -> Any:
    """The context a ``Runner.run(agent, input, context=context)`` runs with.

    Like the SDK: an explicit ``context=`` wins; a run resumed from a ``RunState`` without one
    uses the state's own context.
    """
    if context is None and isinstance(run_input, RunState):
        wrapper = run_input._context  # SDK private
        if wrapper is not None:
            return wrapper.context
    return context


def _value(context: Any) -> Any:
    return context.context if isinstance(context, RunContextWrapper) else context


def _kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return _PYDANTIC
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _DATACLASS
    if isinstance(value, MutableMapping):
        return _MAPPING
    return None


_adapters: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    adapter = _adapters.get(cls)
    if adapter is None:
        adapter = _adapters[cls] = TypeAdapter(cls)
    return adapter


def _dump(value: Any, kind: str) -> Any:
    if kind == _MAPPING:
        data = dict(value)
        if not _is_plain_json(data):
            raise _Unsupported("it holds values that are not plain JSON")
        return copy.deepcopy(data)
    try:
        adapter = _adapter(type(value))
        data = adapter.dump_python(value, mode="json", warnings="error")
        # What a replay would rebuild must dump to the same JSON (an init=False dataclass
        # field, say, would not come back).
        again = adapter.dump_python(adapter.validate_python(data, by_name=True), mode="json")
    except Exception as exc:  # schema generation, serialization or validation: user types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _Unsupported(f"{type(exc).__name__}: {first[:200]}") from None
    if again != data:
        raise _Unsupported("it does not survive a JSON round trip")
    return data


def _warn_once(cls: type, reason: str) -> None:
    with _warned_lock:
        if cls in _warned:
            return
        _warned.add(cls)
    warnings.warn(
        f"the run context ({cls.__module__}.{cls.__qualname__}) cannot be checkpointed: "
        f"{reason}. A replayed agent step leaves it as the pipeline has it, so changes agent "
        f"runs made to it are lost after a crash. Use a pydantic model, a dataclass or a dict "
        f"of JSON values, or pass @checkpointed_pipeline(context_codec=...)",
        NotDurableWarning,
        stacklevel=2,
    )


def snapshot(context: Any) -> dict[str, Any] | None:
    """The context's state as JSON, or None when there is no context or it cannot be stored
    (warned once per type)."""
    value = _value(context)
    if value is None:
        return None
    codec = current_pipeline_options().context_codec
    if codec is not None:
        data = codec.dump(value)
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise CheckpointSerializationError(
                f"context_codec.dump returned something that is not JSON: {exc}"
            ) from None
        return {"kind": _CODEC, "data": data}
    kind = _kind(value)
    try:
        if kind is None:
            raise _Unsupported("it is not a pydantic model, dataclass or mapping")
        return {"kind": kind, "data": _dump(value, kind)}
    except _Unsupported as exc:
        _warn_once(type(value), str(exc))
        return None


def _fields(obj: Any) -> list[str]:
    if isinstance(obj, BaseModel):
        return list(type(obj).model_fields)
    return [f.name for f in dataclasses.fields(obj)]


def _merged(live: Any, new: Any) -> Any:
    """What to store in a field: ``live`` updated in place when the shapes match (so nested
    objects keep their identity), else ``new``."""
    if type(live) is type(new) and _kind(live) in (_PYDANTIC, _DATACLASS):
        _assign(live, new, None)
        return live
    if type(live) is dict and type(new) is dict:
        live.clear()
        live.update(new)
        return live
    if type(live) is list and type(new) is list:
        live[:] = new
        return live
    return new


def _assign(live: Any, new: Any, present: set[str] | None) -> None:
    for name in _fields(live):
        if present is not None and name not in present:
            continue  # excluded from the dump: the live value stays
        # object.__setattr__ passes frozen models and dataclasses and validate_assignment.
        object.__setattr__(live, name, _merged(getattr(live, name), getattr(new, name)))
    if isinstance(live, BaseModel):
        extra = live.__pydantic_extra__
        if extra is not None and new.__pydantic_extra__ is not None:
            extra.clear()
            extra.update(new.__pydantic_extra__)
        object.__setattr__(live, "__pydantic_fields_set__", set(new.__pydantic_fields_set__))


def restore(context: Any, recorded: Any) -> None:
    """Bring the live context to the ``recorded`` snapshot, in place.

    Nothing is recorded (older checkpoints, or a context that could not be stored), or no live
    context to restore into: the context is left alone.
    """
    value = _value(context)
    if not isinstance(recorded, Mapping) or value is None:
        return
    kind, data = recorded.get("kind"), recorded.get("data")
    what = f"{type(value).__module__}.{type(value).__qualname__}"
    if kind == _CODEC:
        codec = current_pipeline_options().context_codec
        if codec is None:
            raise CheckpointSerializationError(
                f"the checkpoint holds a context written by a context_codec, but this "
                f"pipeline has none to restore the {what} context with"
            )
        codec.restore(value, data)
        return
    if kind != _kind(value):
        raise CheckpointSerializationError(
            f"the checkpoint holds a {kind} context, but the live context is a {what}"
        )
    if kind == _MAPPING:
        if not isinstance(data, dict):
            raise CheckpointSerializationError("the recorded mapping context is not an object")
        value.clear()
        value.update(copy.deepcopy(data))
        return
    try:
        rebuilt = _adapter(type(value)).validate_python(data, by_name=True)
    except Exception as exc:
        raise CheckpointSerializationError(
            f"the recorded context no longer validates as {what}: {exc}"
        ) from None
    _assign(value, rebuilt, set(data) if isinstance(data, dict) else None)


def with_context_snapshots(spec: StepSpec, context: Any) -> StepSpec:
    """``spec`` (a durable tool call made with ``context``) whose checkpoint also holds the
    run context as the call left it, and whose replay restores it: an agent run re-executed
    after a crash replays the calls its first attempt finished, and sees the context as they
    changed it. Checkpoints without a context replay as before."""
    if _value(context) is None:
        return spec
    encode, decode = spec.encode, spec.decode

    def encode_call(value: Any) -> Any:
        encoded = encode(value)
        recorded = snapshot(context)
        if recorded is None:
            return encoded
        return {"$t": _WITH_CONTEXT, "v": encoded, "context": recorded}

    async def decode_call(data: Any) -> Any:
        if isinstance(data, dict) and data.get("$t") == _WITH_CONTEXT:
            restore(context, data.get("context"))
            data = data.get("v")
        return await decode(data)

    return dataclasses.replace(spec, encode=encode_call, decode=decode_call)
