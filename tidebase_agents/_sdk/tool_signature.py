"""How ``function_tool`` sees a tool function: context parameter detection and injection."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, get_origin

from agents import RunContextWrapper
from agents.tool_context import ToolContext

_CONTEXT_CLASSES = (RunContextWrapper, ToolContext)


_CONTEXT_CLASS_NAMES = frozenset(cls.__name__ for cls in _CONTEXT_CLASSES)


_INJECTED_CONTEXT = "_tidebase_tool_context"


def takes_context(fn: Callable[..., Any]) -> bool:
    """Whether ``function_tool`` would pass ``fn`` a context as its first argument.

    Mirrors the SDK's rule: the first parameter's resolved annotation, or its generic origin, is
    exactly ``RunContextWrapper`` or ``ToolContext``. String annotations (``from __future__ import
    annotations``) are resolved in ``fn``'s module; one that cannot be resolved yet is matched by
    its class name.
    """
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    first = params[0]
    try:
        annotation = typing.get_type_hints(fn, include_extras=True).get(
            first.name, first.annotation
        )
    except (NameError, TypeError):
        annotation = first.annotation
    if isinstance(annotation, str):
        return annotation.split("[", 1)[0].rsplit(".", 1)[-1].strip() in _CONTEXT_CLASS_NAMES
    origin = get_origin(annotation) or annotation
    return any(origin is cls for cls in _CONTEXT_CLASSES)


def inject_context_parameter(wrapper: Callable[..., Any], fn: Callable[..., Any]) -> None:
    """Make ``wrapper`` (a ``functools.wraps(fn)`` wrapper) advertise a leading ``ToolContext``.

    ``function_tool`` then passes the ToolContext as the first positional argument and leaves it
    out of the JSON schema, so ``fn`` keeps its exact schema, name and description while the
    wrapper learns the tool call. The wrapper must drop that argument before calling ``fn``.
    """
    signature = inspect.signature(fn)
    context_param = inspect.Parameter(
        _INJECTED_CONTEXT, inspect.Parameter.POSITIONAL_ONLY, annotation=ToolContext
    )
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[context_param, *signature.parameters.values()]
    )
    # A fresh dict (functools.wraps shares fn's), holding the class itself rather than a string:
    # string annotations are resolved in fn's module, which need not import ToolContext.
    wrapper.__annotations__ = {_INJECTED_CONTEXT: ToolContext, **fn.__annotations__}
