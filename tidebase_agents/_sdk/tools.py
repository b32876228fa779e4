"""``@durable_tool``: a function tool whose calls inside a pipeline are checkpointed steps (I3)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from agents import RunContextWrapper

from .._codec import bounded_json, encode, register_annotations
from .._engine import (
    RUN_CONTROL,
    Executor,
    StepSpec,
    StopRun,
    ToolCall,
    active_executor,
    current_scope,
    idempotency_key,
)
from .._errors import ConfigurationError, TidebaseError
from .._hashing import canonical_json, sha256_text
from .._ids import derive_idempotency_key
from .._vocab import HALTING_STEP_STATUSES, ReplayPolicy, parse
from .context import with_context_snapshots
from .tool_signature import inject_context_parameter, takes_context

F = TypeVar("F", bound=Callable[..., Any])


#: How many calls deep the keyedness analysis follows the application's helper functions.
_KEY_SEARCH_DEPTH = 4


def _reads_idempotency_key(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` reads ``idempotency_key()``: under that name or an alias (a global or a
    closure variable bound to it), as an attribute of a module that exports it, in a nested
    function, or in a helper function of the application's own package that it calls
    (followed a few calls deep).

    Decided once at decoration: a step's intent record must say whether it is keyed before the
    body runs, so that a crash inside it can be resolved without a human (R5). A read this
    cannot see (behind a dynamic dispatch) is caught when it happens (``ToolCall``).
    """
    root = inspect.unwrap(fn)
    package = str(getattr(root, "__module__", "")).split(".")[0]
    seen: set[int] = set()
    pending: list[tuple[Any, int]] = [(root, 0)]
    while pending:
        func, depth = pending.pop()
        code = getattr(func, "__code__", None)
        if not isinstance(code, types.CodeType) or id(func) in seen:
            continue
        seen.add(id(func))
        namespace: dict[str, Any] = dict(getattr(func, "__globals__", {}))
        cells = getattr(func, "__closure__", None) or ()
        for name, cell in zip(code.co_freevars, cells, strict=False):
            with contextlib.suppress(ValueError):  # a cell not filled yet
                namespace[name] = cell.cell_contents
        codes = [code]
        while codes:
            current = codes.pop()
            names = (*current.co_names, *current.co_freevars)
            values = [namespace.get(name) for name in names]
            if any(value is idempotency_key for value in values):
                return True
            if "idempotency_key" in current.co_names and any(
                isinstance(v, types.ModuleType)
                and getattr(v, "idempotency_key", None) is idempotency_key
                for v in values
            ):
                return True  # module.idempotency_key()
            if depth < _KEY_SEARCH_DEPTH:
                for value in values:
                    helper = getattr(value, "__func__", value)  # bound methods
                    if isinstance(helper, functools.partial):
                        helper = helper.func
                    if (
                        isinstance(helper, types.FunctionType)
                        and str(helper.__module__).split(".")[0] == package
                    ):
                        pending.append((helper, depth + 1))
            codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return False


class _DurableTool:
    """Builds the step of one call of a durable tool."""

    def __init__(
        self,
        fn: Callable[..., Any],
        side_effects: Sequence[str] | None,
        retries: int,
        replay: ReplayPolicy | str,
        key_fn: Callable[..., str] | None,
    ) -> None:
        self.replay = parse(ReplayPolicy, replay, "replay")
        if retries < 0:
            raise ConfigurationError("retries must be >= 0")
        self.fn = fn
        register_annotations(fn)
        self.side_effects = list(side_effects) if side_effects else None
        self.retries = retries
        self.key_fn = key_fn
        self.user_context = takes_context(fn)
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        self.arg_signature = signature.replace(
            parameters=params[1:] if self.user_context else params
        )
        self.static_keyed = key_fn is not None or _reads_idempotency_key(fn)

    def split(self, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        """(tool context or None, arguments for fn, arguments the tool's schema covers)."""
        if self.user_context:
            return (args[0] if args else None), args, args[1:]
        if args and isinstance(args[0], RunContextWrapper):
            return args[0], args[1:], args[1:]
        return None, args, args

    def spec(
        self,
        ex: Executor,
        context: Any,
        call: Callable[[], Any],
        tool_args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> StepSpec:
        bound = self.arg_signature.bind(*tool_args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        tool_name = getattr(context, "tool_name", None) or self.fn.__name__
        args_text = canonical_json(arguments, what=f"arguments of tool {tool_name!r}")
        args_hash = sha256_text(args_text, what=f"arguments of tool {tool_name!r}")
        scope = current_scope() or ex.root
        key = f"tool:{tool_name}:{args_hash[:12]}"
        name = f"{scope.prefix}{key}#{scope.next_ordinal(key)}"
        if self.key_fn is not None:
            idem = self.key_fn(**arguments)
            if not isinstance(idem, str) or not idem:
                raise ConfigurationError(
                    f"idempotency_key function of tool {tool_name!r} must return a non-empty str"
                )
        else:
            idem = derive_idempotency_key(ex.run_id, name)
        spec = StepSpec(
            name=name,
            fn=call,
            input_hash=args_hash,
            side_effects=self.side_effects,
            idempotency_key=idem,
            keyed=self.static_keyed,
            replay=self.replay,
            retries=self.retries,
            tool_call=ToolCall(idem, explicit=self.key_fn is not None),
            encode=lambda value: encode(value, what=f"output of tool {tool_name!r} ({name})"),
            input_json=bounded_json(args_text),
        )
        return with_context_snapshots(spec, context)


def _stop_if_halting(ex: Executor, spec: StepSpec, context: Any, error: Exception) -> None:
    """Raise :class:`StopRun` if the tool's failure must end the agent run.

    The SDK hands a tool's error to the model and lets the agent go on. That is right for the
    tool's own failures, but not when the run must stop (R15): the step needs review or failed
    for good, or the library's own machinery failed (a checkpoint write, the database, the
    lease, an output that cannot be checkpointed: any ``TidebaseError``). Told to try again,
    the model would call the tool anew, under a new idempotency key.
    """
    if context is None:
        return  # called directly from pipeline code, not by the SDK
    record = ex.recorded(spec.name)
    if isinstance(error, (*RUN_CONTROL, TidebaseError)) or (
        record is not None and record.status in HALTING_STEP_STATUSES
    ):
        raise StopRun(error) from error


def _wrap(tool: _DurableTool) -> Callable[..., Any]:
    fn = tool.fn
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            context, fn_args, tool_args = tool.split(args)
            ex = active_executor()
            if ex is None:
                return await fn(*fn_args, **kwargs)
            spec = tool.spec(ex, context, lambda: fn(*fn_args, **kwargs), tool_args, kwargs)
            try:
                return await ex.execute(spec)
            except Exception as exc:
                _stop_if_halting(ex, spec, context, exc)
                raise

        wrapper: Callable[..., Any] = async_wrapper
    else:

        @functools.wraps(fn)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            context, fn_args, tool_args = tool.split(args)
            ex = active_executor()
            if ex is None:
                return fn(*fn_args, **kwargs)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise ConfigurationError(
                    f"sync durable tool {fn.__name__!r} was called on the event loop inside a "
                    f"pipeline; let function_tool call it (it runs sync tools in a thread), or "
                    f"make it async"
                )

            async def execute() -> Any:
                # Runs on the pipeline's loop; the body itself goes back to a worker thread.
                spec = tool.spec(
                    ex,
                    context,
                    lambda: asyncio.to_thread(fn, *fn_args, **kwargs),
                    tool_args,
                    kwargs,
                )
                try:
                    return await ex.execute(spec)
                except Exception as exc:
                    _stop_if_halting(ex, spec, context, exc)
                    raise

            # run_coroutine_threadsafe carries this thread's context (run, scope) over.
            return asyncio.run_coroutine_threadsafe(execute(), ex.loop).result()

        wrapper = sync_wrapper
    if not tool.user_context:
        inject_context_parameter(wrapper, fn)
    return wrapper


@overload
def durable_tool(fn: F, /) -> F: ...


@overload
def durable_tool(
    *,
    side_effects: Sequence[str] | None = None,
    retries: int = 0,
    replay: ReplayPolicy | str = ReplayPolicy.AUTO,
    idempotency_key: Callable[..., str] | None = None,
) -> Callable[[F], F]: ...


def durable_tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    side_effects: Sequence[str] | None = None,
    retries: int = 0,
    replay: ReplayPolicy | str = ReplayPolicy.AUTO,
    idempotency_key: Callable[..., str] | None = None,
) -> Any:
    """Checkpoint each call of a tool function made inside a pipeline. Put it under
    ``@function_tool``; the tool's JSON schema, name and description stay the same.

    Each call is the step ``tool:<tool name>:<args hash>#<n>`` within its agent step (I3): a
    finished call returns its recorded output on replay. ``side_effects`` names what the tool
    writes to; such a call is keyed if its body reads :func:`idempotency_key` or an
    ``idempotency_key`` function of the arguments is given, and an unkeyed one is parked for
    review instead of blindly re-run (R3, R5). Outside a pipeline the body runs unchanged.
    """

    def decorate(f: Callable[..., Any]) -> Any:
        if not callable(f) or not isinstance(f, types.FunctionType):
            raise TypeError(
                f"@durable_tool decorates a plain function, got {f!r}; put it under "
                f"@function_tool (the order is @function_tool, then @durable_tool)"
            )
        return _wrap(_DurableTool(f, side_effects, retries, replay, idempotency_key))

    if fn is not None:
        return decorate(fn)
    return decorate
