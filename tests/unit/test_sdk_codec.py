"""Tests of tidebase_agents._sdk, the only module that touches Agents SDK internals.

Pure: no database, no network. Models are agents.testing.ScriptedModel; every replay decodes into
fresh agents whose models have an EMPTY script, so any model call during a replay would fail.
"""

import asyncio
import dataclasses
import functools
import inspect
import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import pytest

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

import agents
from agents import (
    Agent,
    AgentHooks,
    GuardrailFunctionOutput,
    InputGuardrail,
    InputGuardrailResult,
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    ModelBehaviorError,
    ModelSettings,
    OutputGuardrailTripwireTriggered,
    RunConfig,
    RunContextWrapper,
    Runner,
    WebSearchTool,
    function_tool,
    handoff,
    input_guardrail,
    output_guardrail,
    set_tracing_disabled,
)
from agents.agent import StopAtTools, ToolsToFinalOutputResult
from agents.agent_output import AgentOutputSchema, AgentOutputSchemaBase
from agents.exceptions import (
    ModelRefusalError,
    ToolInputGuardrailTripwireTriggered,
    ToolOutputGuardrailTripwireTriggered,
)
from agents.extensions.handoff_filters import remove_all_tools
from agents.items import MessageOutputItem
from agents.run import AgentRunner, get_default_agent_runner, set_default_agent_runner
from agents.run_internal.items import digest_input_item
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.tool_context import ToolContext
from agents.tool_guardrails import (
    ToolGuardrailFunctionOutput,
    tool_input_guardrail,
    tool_output_guardrail,
)
from agents.usage import Usage, serialize_usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import BaseModel, Field

from tidebase_agents import _sdk
from tidebase_agents._errors import CheckpointSerializationError
from tidebase_agents._hashing import parts_hash
from tidebase_agents._sdk import _fastpath as sdk_fastpath
from tidebase_agents._sdk import agent_runner as sdk_runner
from tidebase_agents._sdk import errors as sdk_errors
from tidebase_agents._sdk import fingerprint as sdk_fp
from tidebase_agents._sdk import result_codec as sdk_codec
from tidebase_agents._sdk import state as sdk_state
from tidebase_agents._sdk import streaming as sdk_streaming
from tidebase_agents._sdk import tool_signature as sdk_sig
from tidebase_agents._sdk import usage as sdk_usage

set_tracing_disabled(True)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def usage(inp: int, out: int, *, cached: int = 0, reasoning: int = 0) -> Usage:
    return Usage(
        requests=1,
        input_tokens=inp,
        output_tokens=out,
        total_tokens=inp + out,
        input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
    )


def step(*output: Any, inp: int = 10, out: int = 5, rid: str | None = None) -> ModelStep:
    return ModelStep(output=list(output), usage=usage(inp, out), response_id=rid)


def message(text: str, item_id: str = "msg") -> Any:
    return assistant_message(text, item_id=item_id)


def json_roundtrip(payload: dict[str, Any]) -> dict[str, Any]:
    """What the database gives back: text, parsed again."""
    return json.loads(json.dumps(payload))


def dumped(raw: Any) -> Any:
    return raw.model_dump() if hasattr(raw, "model_dump") else raw


def state_view(result: Any) -> dict[str, Any]:
    """to_state() JSON minus the user's context value (usage, approvals, ... stay)."""
    data = result.to_state().to_json(context_serializer=lambda _c: {})
    del data["context"]["context"], data["context"]["context_meta"]
    return data


def assert_faithful(orig: Any, repl: Any) -> None:
    """Everything R1 promises, plus what to_state() and the item views need."""
    assert repl.final_output == orig.final_output
    assert type(repl.final_output) is type(orig.final_output)
    assert repl.input == orig.input
    assert repl.to_input_list() == orig.to_input_list()
    assert repl.to_input_list(mode="normalized") == orig.to_input_list(mode="normalized")
    assert repl.last_agent.name == orig.last_agent.name
    assert serialize_usage(repl.context_wrapper.usage) == serialize_usage(
        orig.context_wrapper.usage
    )
    assert [type(i) for i in repl.new_items] == [type(i) for i in orig.new_items]
    assert [i.agent.name for i in repl.new_items] == [i.agent.name for i in orig.new_items]
    assert [dumped(i.raw_item) for i in repl.new_items] == [
        dumped(i.raw_item) for i in orig.new_items
    ]
    assert [(r.response_id, [o.model_dump() for o in r.output]) for r in repl.raw_responses] == [
        (r.response_id, [o.model_dump() for o in r.output]) for r in orig.raw_responses
    ]
    assert [serialize_usage(r.usage) for r in repl.raw_responses] == [
        serialize_usage(r.usage) for r in orig.raw_responses
    ]
    assert repl.last_response_id == orig.last_response_id
    assert [
        (g.guardrail.get_name(), g.output.output_info) for g in repl.input_guardrail_results
    ] == [(g.guardrail.get_name(), g.output.output_info) for g in orig.input_guardrail_results]
    assert [g.guardrail.get_name() for g in repl.output_guardrail_results] == [
        g.guardrail.get_name() for g in orig.output_guardrail_results
    ]
    assert len(repl.interruptions) == len(orig.interruptions)
    assert state_view(repl) == state_view(orig)
    assert repl.to_state()._starting_agent.name == orig.to_state()._starting_agent.name


@pytest.fixture
def restore_default_runner() -> Iterator[None]:
    previous = get_default_agent_runner()
    yield
    set_default_agent_runner(previous)


# ---------------------------------------------------------------------------------------------
# agent graphs used by several tests
# ---------------------------------------------------------------------------------------------


class Forecast(BaseModel):
    city: str
    temp_c: int


class Answer(BaseModel):
    city: str
    summary: str


@dataclasses.dataclass
class Point:
    x: int
    y: int


@dataclasses.dataclass
class AppContext:
    user_id: str
    connection: object = None  # stands for something that must never be serialized


@function_tool
def get_forecast(ctx: RunContextWrapper[AppContext], city: str) -> Forecast:
    """Get the forecast for a city."""
    return Forecast(city=city, temp_c=21)


@input_guardrail
def no_secrets(ctx: Any, agent: Any, inp: Any) -> GuardrailFunctionOutput:
    return GuardrailFunctionOutput(output_info={"checked": True}, tripwire_triggered=False)


@output_guardrail
def sane(ctx: Any, agent: Any, output: Any) -> GuardrailFunctionOutput:
    return GuardrailFunctionOutput(output_info={"len": len(str(output))}, tripwire_triggered=False)


def weather_graph(model: ScriptedModel) -> tuple[Agent[AppContext], Agent[AppContext]]:
    specialist = Agent[AppContext](
        name="specialist",
        model=model,
        tools=[get_forecast],
        output_type=Answer,
        output_guardrails=[sane],
    )
    triage = Agent[AppContext](
        name="triage", model=model, handoffs=[specialist], input_guardrails=[no_secrets]
    )
    return triage, specialist


def weather_script() -> list[ModelStep]:
    return [
        step(function_call("transfer_to_specialist", {}, call_id="h1"), rid="r1"),
        step(function_call("get_forecast", {"city": "Rome"}, call_id="f1"), rid="r2"),
        step(message(json.dumps({"city": "Rome", "summary": "warm"}), "m1"), rid="r3"),
    ]


# ---------------------------------------------------------------------------------------------
# 1. version guard
# ---------------------------------------------------------------------------------------------


def test_version_guard_accepts_installed_sdk() -> None:
    assert _sdk.SDK_SERIES == "0.24"
    assert agents.__version__.startswith("0.24.")
    _sdk._check_sdk_version()  # the installed SDK passes


def test_version_guard_rejects_other_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agents, "__version__", "0.25.1")
    with pytest.raises(ImportError, match=r"needs openai-agents 0\.24\.x, found 0\.25\.1"):
        _sdk._check_sdk_version()


def test_version_guard_rejects_other_run_state_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sdk, "CURRENT_SCHEMA_VERSION", "1.22")
    with pytest.raises(ImportError, match=r"RunState schema 1\.21, found 1\.22"):
        _sdk._check_sdk_version()


# ---------------------------------------------------------------------------------------------
# 2. fingerprints and run input JSON
# ---------------------------------------------------------------------------------------------


def dynamic_instructions(ctx: Any, agent: Any) -> str:
    return "be brief"


class NamedModel(ScriptedModel):
    """A Model that, like OpenAIResponsesModel, knows its model name."""

    def __init__(self, name: str, steps: Any = ()) -> None:
        super().__init__(steps)
        self.model = name


def test_fingerprint_parts() -> None:
    specialist = Agent(name="specialist")
    agent = Agent(
        name="a",
        instructions=dynamic_instructions,
        model=NamedModel("gpt-test"),
        model_settings=ModelSettings(
            temperature=0.2,
            response_include=["reasoning.encrypted_content"],
            extra_args={"prompt_cache_key": "x"},
        ),
        tools=[get_forecast, WebSearchTool()],
        handoffs=[handoff(specialist), Agent(name="b")],
        output_type=Answer,
    )
    fp = sdk_fp.agent_fingerprint(agent)
    assert fp["name"] == "a"
    assert fp["instructions"] == f"callable:{__name__}.dynamic_instructions"
    assert fp["model"] == "gpt-test"
    # None fields and the SDK's random prompt_cache_key are gone (extra_args emptied -> dropped)
    assert fp["model_settings"] == {
        "temperature": 0.2,
        "response_include": ["reasoning.encrypted_content"],
    }
    assert fp["tools"] == [
        {"name": "get_forecast", "params": get_forecast.params_json_schema},
        {"name": "web_search", "type": "WebSearchTool"},
    ]
    assert fp["handoffs"] == ["b", "specialist"]
    assert fp["output_type"]["properties"].keys() == {"city", "summary"}
    # optional parts are absent at their defaults, so adding parts later keeps old hashes
    assert not {"tool_use_behavior", "input_guardrails", "output_guardrails"} & fp.keys()
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_ignores_random_prompt_cache_key_but_not_other_extra_args() -> None:
    def with_extra(extra: dict[str, Any]) -> dict[str, Any]:
        settings = ModelSettings(extra_args=extra)
        return sdk_fp.agent_fingerprint(Agent(name="a", model="m", model_settings=settings))

    assert with_extra({"prompt_cache_key": "agents-sdk:run:1"}) == with_extra(
        {"prompt_cache_key": "agents-sdk:run:2"}
    )
    assert with_extra({"prompt_cache_key": "k", "seed": 1})["model_settings"] == {
        "extra_args": {"seed": 1}
    }


def test_settings_are_hashed_in_the_sdks_own_json_form() -> None:
    # Fingerprints dump settings through one cached adapter: the form must stay the SDK's own
    # to_json_dict(), or every recorded agent step and turn would turn stale on upgrade.
    from openai.types.shared import Reasoning

    settings = ModelSettings(
        temperature=0.25,
        top_p=0.9,
        tool_choice="required",
        parallel_tool_calls=False,
        truncation="auto",
        max_tokens=512,
        reasoning=Reasoning(effort="low"),
        metadata={"team": "ops"},
        store=True,
        include_usage=True,
        extra_query={"q": "1"},
        extra_headers={"h": "v"},
        extra_args={"seed": 7, "prompt_cache_key": "random"},
    )
    sdk_form = sdk_fp._drop_none(settings.to_json_dict())
    del sdk_form["extra_args"]["prompt_cache_key"]
    assert sdk_fp.settings_json(settings) == sdk_form
    assert sdk_fp.settings_json(ModelSettings()) == sdk_fp._drop_none(
        ModelSettings().to_json_dict()
    )


def test_fingerprint_refuses_settings_that_are_not_json() -> None:
    settings = ModelSettings(extra_args={"client": object()})
    with pytest.raises(CheckpointSerializationError, match="model_settings of agent 'a'"):
        sdk_fp.agent_fingerprint(Agent(name="a", model_settings=settings))
    with pytest.raises(CheckpointSerializationError, match=r"^run_config\.model_settings cannot"):
        sdk_fp.settings_json(settings, what="run_config.model_settings")


def test_run_config_overrides_use_the_same_names_and_settings_form() -> None:
    # a RunConfig's model / model_settings override is hashed like an agent's own
    settings = ModelSettings(temperature=0.5, extra_args={"prompt_cache_key": "random"})
    assert sdk_fp.settings_json(settings) == {"temperature": 0.5}
    assert sdk_fp.model_name(NamedModel("gpt-over")) == "gpt-over"
    assert sdk_fp.model_name("gpt-x") == "gpt-x"


def test_fingerprint_model_names() -> None:
    assert sdk_fp.agent_fingerprint(Agent(name="a", model="gpt-x"))["model"] == "gpt-x"
    assert (
        sdk_fp.agent_fingerprint(Agent(name="a", model=ScriptedModel()))["model"]
        == "agents.testing.model.ScriptedModel"
    )
    default = sdk_fp.agent_fingerprint(Agent(name="a"))["model"]
    assert default == agents.models.get_default_model()


def always_final(ctx: Any, results: Any) -> ToolsToFinalOutputResult:
    return ToolsToFinalOutputResult(is_final_output=True, final_output="x")


def test_fingerprint_optional_parts_and_plain_text_output() -> None:
    stop = StopAtTools(stop_at_tool_names=["z", "a"])
    fp = sdk_fp.agent_fingerprint(
        Agent(
            name="a",
            model="m",
            output_type=str,
            tool_use_behavior=stop,
            input_guardrails=[no_secrets],
            output_guardrails=[sane],
        )
    )
    assert fp["output_type"] is None
    assert fp["tool_use_behavior"] == {"stop_at_tool_names": ["a", "z"]}
    assert fp["input_guardrails"] == ["no_secrets"]
    assert fp["output_guardrails"] == ["sane"]
    fn_fp = sdk_fp.agent_fingerprint(Agent(name="a", model="m", tool_use_behavior=always_final))
    assert fn_fp["tool_use_behavior"] == f"callable:{__name__}.always_final"
    first = sdk_fp.agent_fingerprint(Agent(name="a", tool_use_behavior="stop_on_first_tool"))
    assert first["tool_use_behavior"] == "stop_on_first_tool"


@function_tool
def get_forecast_v2(city: str, days: int) -> str:
    """Get the forecast."""
    return city


def test_fingerprint_parts_name_what_changed() -> None:
    old = sdk_fp.agent_fingerprint(
        Agent(name="a", instructions="v1", model="m", tools=[get_forecast])
    )
    same = sdk_fp.agent_fingerprint(
        Agent(name="a", instructions="v1", model="m", tools=[get_forecast])
    )
    new = sdk_fp.agent_fingerprint(
        Agent(
            name="a",
            instructions="v2",
            model="m",
            tools=[dataclasses.replace(get_forecast_v2, name="get_forecast")],
            input_guardrails=[no_secrets],
        )
    )

    def changed(a: dict[str, object], b: dict[str, object]) -> list[str]:
        _, pa = parts_hash(a)
        _, pb = parts_hash(b)
        return sorted(k for k in pa.keys() | pb.keys() if pa.get(k) != pb.get(k))

    assert changed(old, same) == []
    assert changed(old, new) == ["input_guardrails", "instructions", "tools"]


def test_run_input_json_text_and_items() -> None:
    assert sdk_fp.run_input_json("hi") == "hi"
    item = message("hello", "m9")
    as_dict = item.model_dump(exclude_unset=True)
    # a pydantic item and the dict the SDK would make of it give the same JSON (same hash)
    assert (
        sdk_fp.run_input_json([item])
        == sdk_fp.run_input_json([as_dict])
        == [json.loads(json.dumps(as_dict))]
    )
    with pytest.raises(CheckpointSerializationError, match="run input"):
        sdk_fp.run_input_json([{"role": "user", "content": object()}])


async def test_run_input_json_run_state_hash_ignores_context_value() -> None:
    model = ScriptedModel([step(message("done"))])
    result = await Runner.run(Agent(name="s", model=model), "go", context={"api_token": "secret"})
    state = result.to_state()
    state_b = result.to_state()
    state_b._context.context = {"api_token": "other"}  # type: ignore[union-attr]
    encoded = sdk_fp.run_input_json(state)
    assert set(encoded) == {"$run_state"} and len(encoded["$run_state"]) == 64
    assert encoded == sdk_fp.run_input_json(state_b)
    assert state._context.context == {"api_token": "secret"}  # type: ignore[union-attr]
    other = await Runner.run(Agent(name="s", model=ScriptedModel([step(message("no"))])), "go")
    assert sdk_fp.run_input_json(other.to_state()) != encoded
    # the SDK would copy a mapping context verbatim into its JSON; checkpoints never hold it
    assert "secret" not in json.dumps(sdk_codec.encode_result(result))


# ---------------------------------------------------------------------------------------------
# 3. RunResult codec
# ---------------------------------------------------------------------------------------------


async def test_codec_typed_output_with_handoff_tool_and_guardrails() -> None:
    triage, _ = weather_graph(ScriptedModel(weather_script()))
    orig = await Runner.run(triage, "forecast Rome", context=AppContext("user-7f3", object()))
    payload = json_roundtrip(sdk_codec.encode_result(orig))
    assert "user-7f3" not in json.dumps(payload)  # the user context is never persisted

    empty = ScriptedModel([])
    triage2, specialist2 = weather_graph(empty)
    ctx2 = AppContext("u1")
    repl = await sdk_codec.decode_result(payload, triage2, ctx2)

    assert_faithful(orig, repl)
    assert isinstance(repl.final_output, Answer)
    assert repl.last_agent is specialist2  # the live agent object, not a copy
    assert repl.to_state()._starting_agent is triage2  # to_state() resumes from the live graph
    assert repl.new_items[-1].agent is specialist2
    assert repl.context_wrapper.context is ctx2
    assert repl.final_output_as(Answer, raise_if_incorrect_type=True) == orig.final_output
    assert empty.calls == ()


@function_tool
def probe(q: str) -> str:
    return "probe:" + q


def filtered_graph(model: ScriptedModel) -> Agent[Any]:
    b = Agent(name="b", model=model)
    return Agent(
        name="a", model=model, tools=[probe], handoffs=[handoff(b, input_filter=remove_all_tools)]
    )


@pytest.mark.parametrize("nest_history", [False, True])
async def test_codec_handoff_that_rewrites_history(nest_history: bool) -> None:
    script = [
        step(function_call("probe", {"q": "x"}, call_id="p1")),
        step(function_call("transfer_to_b", {}, call_id="h1")),
        step(message("b done")),
    ]
    config = RunConfig(nest_handoff_history=nest_history)
    orig = await Runner.run(filtered_graph(ScriptedModel(script)), "start", run_config=config)
    # the case under test: normalized history differs from the full one
    assert orig.to_input_list(mode="normalized") != orig.to_input_list()
    empty = ScriptedModel([])
    repl = await sdk_codec.decode_result(
        json_roundtrip(sdk_codec.encode_result(orig)), filtered_graph(empty), None
    )
    assert_faithful(orig, repl)
    assert repl.last_agent.name == "b"
    assert empty.calls == ()


def _output_case(kind: str) -> tuple[dict[str, Any], ModelStep, Any]:
    if kind == "pydantic":
        return (
            {"output_type": Forecast},
            step(message('{"city":"Oslo","temp_c":3}')),
            Forecast(city="Oslo", temp_c=3),
        )
    if kind == "dataclass":
        return (
            {"output_type": Point},
            step(message('{"response":{"x":1,"y":2}}')),
            Point(1, 2),
        )
    if kind == "list[int]":
        return {"output_type": list[int]}, step(message('{"response":[1,2,3]}')), [1, 2, 3]
    return {}, step(message("plain words")), "plain words"


@pytest.mark.parametrize("kind", ["pydantic", "dataclass", "list[int]", "text"])
async def test_codec_final_output_kinds(kind: str) -> None:
    agent_kwargs, script_step, expected = _output_case(kind)
    orig = await Runner.run(
        Agent(name="a", model=ScriptedModel([script_step]), **agent_kwargs), "go"
    )
    assert orig.final_output == expected
    payload = json_roundtrip(sdk_codec.encode_result(orig))
    empty = ScriptedModel([])
    repl = await sdk_codec.decode_result(
        payload, Agent(name="a", model=empty, **agent_kwargs), None
    )
    assert_faithful(orig, repl)
    assert empty.calls == ()


@function_tool
def quote(sym: str) -> Forecast:
    return Forecast(city=sym, temp_c=1)


@pytest.mark.parametrize(
    ("output_type", "expected", "kind"),
    [(None, "city='X' temp_c=1", "text"), (Forecast, Forecast(city="X", temp_c=1), "typed")],
)
async def test_codec_stop_on_first_tool_output_is_kept_as_recorded(
    output_type: Any, expected: Any, kind: str
) -> None:
    # the final output is the tool's result: stringified without an output_type, else raw
    kwargs: dict[str, Any] = {
        "tools": [quote],
        "tool_use_behavior": "stop_on_first_tool",
        "output_type": output_type,
    }
    script = [step(function_call("quote", {"sym": "X"}, call_id="q1"))]
    orig = await Runner.run(Agent(name="a", model=ScriptedModel(script), **kwargs), "go")
    assert orig.final_output == expected
    payload = json_roundtrip(sdk_codec.encode_result(orig))
    assert payload["final_output"]["kind"] == kind
    repl = await sdk_codec.decode_result(
        payload, Agent(name="a", model=ScriptedModel(), **kwargs), None
    )
    assert_faithful(orig, repl)


@function_tool
def quote_text(sym: str) -> str:
    return f"price of {sym}"


@function_tool
def quote_json(sym: str) -> dict[str, Any]:
    return {"sym": sym, "price": 1.5, "tags": ["a", None, True]}


async def test_codec_plain_json_tool_result_ends_a_structured_run() -> None:
    stop = {"tool_use_behavior": "stop_on_first_tool", "output_type": Answer}
    script = [step(function_call("quote_json", {"sym": "X"}, call_id="q1"))]
    orig = await Runner.run(
        Agent(name="a", model=ScriptedModel(script), tools=[quote_json], **stop), "go"
    )
    payload = json_roundtrip(sdk_codec.encode_result(orig))
    assert payload["final_output"]["kind"] == "json"
    repl = await sdk_codec.decode_result(payload, Agent(name="a", tools=[quote_json], **stop), None)
    assert_faithful(orig, repl)


async def test_codec_tool_result_of_another_type_than_the_output_type() -> None:
    # a str tool result ending a run whose output_type is structured: kept as plain JSON
    stop = {"tool_use_behavior": "stop_on_first_tool", "output_type": Answer}
    script = [step(function_call("quote_text", {"sym": "X"}, call_id="q1"))]
    orig = await Runner.run(
        Agent(name="a", model=ScriptedModel(script), tools=[quote_text], **stop), "go"
    )
    payload = json_roundtrip(sdk_codec.encode_result(orig))
    assert payload["final_output"] == {"kind": "json", "value": "price of X"}
    repl = await sdk_codec.decode_result(payload, Agent(name="a", tools=[quote_text], **stop), None)
    assert_faithful(orig, repl)
    # a Forecast under output_type=Answer could not come back as a Forecast from JSON: refused
    script = [step(function_call("quote", {"sym": "X"}, call_id="q1"))]
    odd = await Runner.run(
        Agent(name="odd", model=ScriptedModel(script), tools=[quote], **stop), "go"
    )
    assert isinstance(odd.final_output, Forecast)
    with pytest.raises(CheckpointSerializationError, match="agent 'odd'"):
        sdk_codec.encode_result(odd)


class Word(BaseModel):
    word: str


class UpperSchema(AgentOutputSchemaBase):
    """A hand-written output schema: the answer {"word": ...} becomes an upper-cased Word."""

    def is_plain_text(self) -> bool:
        return False

    def name(self) -> str:
        return "upper"

    def json_schema(self) -> dict[str, Any]:
        return {"type": "object", "properties": {"word": {"type": "string"}}}

    def is_strict_json_schema(self) -> bool:
        return False

    def validate_json(self, json_str: str) -> Any:
        return Word(word=json.loads(json_str)["word"].upper())


class ShoutSchema(UpperSchema):
    """validate_json of its own output fails: only the plain JSON of the value can be kept."""

    def validate_json(self, json_str: str) -> Any:
        return {"shout": json.loads(json_str)["word"].upper()}


@pytest.mark.parametrize(
    ("output_type", "answer", "expected"),
    [
        (ShoutSchema(), '{"word":"hi"}', {"shout": "HI"}),
        (UpperSchema(), '{"word":"hi"}', Word(word="HI")),
        (
            AgentOutputSchema(Point, strict_json_schema=False),
            '{"response":{"x":1,"y":2}}',
            Point(1, 2),
        ),
    ],
    ids=["custom_schema_json_only", "custom_schema", "non_strict_dataclass"],
)
async def test_codec_output_schema_objects(output_type: Any, answer: str, expected: Any) -> None:
    orig = await Runner.run(
        Agent(name="a", model=ScriptedModel([step(message(answer))]), output_type=output_type), "go"
    )
    assert orig.final_output == expected
    assert sdk_fp.agent_fingerprint(Agent(name="a", output_type=output_type))["output_type"] == (
        output_type.json_schema()
    )
    payload = json_roundtrip(sdk_codec.encode_result(orig))
    repl = await sdk_codec.decode_result(payload, Agent(name="a", output_type=output_type), None)
    assert_faithful(orig, repl)


def finish_with_set(ctx: Any, results: Any) -> ToolsToFinalOutputResult:
    # a set: JSON would turn it into a list, so a replay could not give back the same value
    return ToolsToFinalOutputResult(is_final_output=True, final_output={1, 2})


async def test_codec_refuses_final_output_that_is_not_json() -> None:
    script = [step(function_call("probe", {"q": "x"}, call_id="p1"))]
    agent = Agent(
        name="odd",
        model=ScriptedModel(script),
        tools=[probe],
        output_type=list[int],
        tool_use_behavior=finish_with_set,
    )
    result = await Runner.run(agent, "go")
    assert result.final_output == {1, 2}
    with pytest.raises(CheckpointSerializationError, match="agent 'odd'"):
        sdk_codec.encode_result(result)


async def test_decode_refuses_output_that_no_longer_fits_the_live_agent() -> None:
    orig = await Runner.run(
        Agent(
            name="a",
            model=ScriptedModel([step(message('{"response":[1,2]}'))]),
            output_type=list[int],
        ),
        "go",
    )
    payload = json_roundtrip(sdk_codec.encode_result(orig))
    with pytest.raises(CheckpointSerializationError, match="agent 'a'"):
        await sdk_codec.decode_result(payload, Agent(name="a", output_type=Point), None)
    with pytest.raises(CheckpointSerializationError, match="does not fit agent 'a'"):
        await sdk_codec.decode_result(payload, Agent(name="a"), None)  # now plain text
    with pytest.raises(CheckpointSerializationError, match="codec"):
        await sdk_codec.decode_result({**payload, "codec": 99}, Agent(name="a"), None)
    with pytest.raises(CheckpointSerializationError, match="agent graph"):
        # the recorded last agent is not reachable from this starting agent
        await sdk_codec.decode_result(
            json_roundtrip(sdk_codec.encode_result(await run_weather())), Agent(name="x"), None
        )


@function_tool
def ratio() -> float:
    return float("nan")


async def test_encode_refuses_values_json_cannot_hold() -> None:
    # NaN survives the SDK's own serialization but is not JSON (PostgreSQL's JSON rejects it)
    script = [step(function_call("ratio", {}, call_id="r1")), step(message("ok"))]
    result = await Runner.run(Agent(name="calc", model=ScriptedModel(script), tools=[ratio]), "go")
    with pytest.raises(CheckpointSerializationError, match="result of agent 'calc'"):
        sdk_codec.encode_result(result)


async def test_encode_names_the_agent_when_the_sdk_cannot_serialize_the_run() -> None:
    # same-name agents with hooks: the SDK refuses to build a RunState for this graph
    twins = [Agent(name="twin", hooks=AgentHooks()), Agent(name="twin", hooks=AgentHooks())]
    front = Agent(name="front", model=ScriptedModel([step(message("x"))]), handoffs=twins)
    result = await Runner.run(front, "go")
    with pytest.raises(CheckpointSerializationError, match="result of agent 'front'"):
        sdk_codec.encode_result(result)


async def test_checkpoint_state_is_the_sdks_own_and_leaves_the_live_result_untouched() -> None:
    """A checkpoint's state is exactly the SDK's ``result.to_state()`` JSON with the user's context
    left out, though it skips the SDK's defensive copies; encoding leaves the live result's
    context, usage and methods as they were."""
    result = await run_weather()
    usage = serialize_usage(result.context_wrapper.usage)
    expected = sdk_state.blanked_state_json(result.to_state())
    stored = sdk_codec.encode_result(result)["state"]
    if stored["generated_items"] == {"$same_as": "session_items"}:  # one copy when equal
        stored = {**stored, "generated_items": stored["session_items"]}
    assert stored == expected
    assert result.context_wrapper.context == AppContext("u1")
    assert serialize_usage(result.context_wrapper.usage) == usage
    assert "_copy_for_run_state" not in vars(result.context_wrapper)
    assert sdk_state.blanked_state_json(result.to_state()) == expected


async def test_a_long_tool_loop_stores_its_items_once_and_replays_faithfully() -> None:
    @function_tool
    def tick(i: int) -> str:
        return f"t{i}"

    script = [step(function_call("tick", {"i": i}, call_id=f"t{i}")) for i in range(200)]
    agent = Agent(
        name="looper", model=ScriptedModel([*script, step(message("done"))]), tools=[tick]
    )
    result = await Runner.run(agent, "go", max_turns=300)
    payload = json_roundtrip(sdk_codec.encode_result(result))
    assert payload["state"]["generated_items"] == {"$same_as": "session_items"}
    sdk_own = json.dumps(sdk_state.blanked_state_json(result.to_state()))
    assert len(json.dumps(payload)) < 0.8 * len(sdk_own)  # the second copy was ~30%
    live = Agent(name="looper", model=ScriptedModel([]), tools=[tick])
    assert_faithful(result, await sdk_codec.decode_result(payload, live, None))


async def run_weather() -> Any:
    triage, _ = weather_graph(ScriptedModel(weather_script()))
    return await Runner.run(triage, "forecast Rome", context=AppContext("u1"))


@function_tool(needs_approval=True)
def delete_file(path: str) -> str:
    return f"deleted {path}"


async def test_codec_interrupted_result_can_be_approved_and_resumed() -> None:
    script = [step(function_call("delete_file", {"path": "a.txt"}, call_id="d1"))]
    orig = await Runner.run(
        Agent(name="ops", model=ScriptedModel(script), tools=[delete_file]), "go"
    )
    assert orig.final_output is None and len(orig.interruptions) == 1

    resume_model = ScriptedModel([step(message("all done"))])
    live = Agent(name="ops", model=resume_model, tools=[delete_file])
    repl = await sdk_codec.decode_result(json_roundtrip(sdk_codec.encode_result(orig)), live, None)
    assert_faithful(orig, repl)
    assert repl.interruptions[0].raw_item.call_id == "d1"
    streamed = sdk_streaming.replay_streamed(
        json_roundtrip(sdk_codec.encode_result(orig)), live, None
    )
    assert [e.type async for e in streamed.stream_events()] == [
        "agent_updated_stream_event",
        "raw_response_event",  # the recorded response, synthesized as response.completed
        "run_item_stream_event",  # tool_called; the approval item is not streamed (SDK rule)
    ]
    assert_faithful(orig, streamed)

    state = repl.to_state()
    state.approve(repl.interruptions[0])
    resumed = await Runner.run(live, state)
    assert resumed.final_output == "all done"
    outputs = [i.output for i in resumed.new_items if i.type == "tool_call_output_item"]
    assert outputs == ["deleted a.txt"]


async def test_codec_streamed_result_encodes_like_a_plain_one() -> None:
    triage, _ = weather_graph(ScriptedModel(weather_script()))
    streamed = Runner.run_streamed(triage, "forecast Rome", context=AppContext("u1"))
    async for _event in streamed.stream_events():
        pass
    repl = await sdk_codec.decode_result(
        json_roundtrip(sdk_codec.encode_result(streamed)), weather_graph(ScriptedModel())[0], None
    )
    assert_faithful(streamed, repl)


async def echo_payload() -> dict[str, Any]:
    """A checkpoint whose input already holds the message the model then repeats."""
    echo = message("x", "m1")
    run_input = [{"role": "user", "content": "hi"}, echo.model_dump(exclude_unset=True)]
    result = await Runner.run(Agent(name="a", model=ScriptedModel([step(echo)])), run_input)
    return json_roundtrip(sdk_codec.encode_result(result))


def owned_ref(state: dict[str, Any]) -> list[dict[str, Any]]:
    digest = digest_input_item(state["original_input"][1])
    return [{"index": 0, "digest": digest, "input_index": 1}]


STATE_UPDATES: dict[str, Any] = {
    "pending_input": lambda _s: {"pending_input": [{"role": "user", "content": "later"}]},
    "prompt_cache_key": lambda _s: {"generated_prompt_cache_key": "agents-sdk:run:abc"},
    "reasoning_policy": lambda _s: {"reasoning_item_id_policy": "omit"},
    "trace": lambda _s: {"trace": {"id": "trace_0123", "workflow_name": "wf"}},
    "persisted_count": lambda _s: {"current_turn_persisted_item_count": 1},
    "original_input": lambda _s: {"original_input": "rewritten by a handoff filter"},
    "nested_history_refs": lambda s: {"nested_history_owned_session_item_refs": owned_ref(s)},
    "run_again_with_pending_write": lambda _s: {
        "current_step": {"type": "next_step_run_again"},
        "pending_session_write": {
            "session_id": "s1",
            "items": [{"role": "user", "content": "hi"}],
            "before": None,
            "persisted_count": 0,
        },
    },
}


@pytest.mark.parametrize("case", list(STATE_UPDATES))
async def test_recorded_run_state_fields_survive_into_to_state(case: str) -> None:
    # whatever the SDK put in the checkpoint's RunState, a replayed result's to_state() (the way
    # to continue or resume a run) carries it on, for both result types
    payload = await echo_payload()
    updates = STATE_UPDATES[case](payload["state"])
    payload["state"].update(updates)
    replayed = await sdk_codec.decode_result(payload, Agent(name="a"), None)
    streamed = sdk_streaming.replay_streamed(payload, Agent(name="a"), None)
    async for _event in streamed.stream_events():
        pass
    for result in (replayed, streamed):
        state = result.to_state().to_json()
        assert {key: state.get(key) for key in updates} == updates


async def test_a_checkpoint_with_a_sandbox_section_is_refused_and_never_written() -> None:
    # R14: reading a sandbox section makes the SDK import its sandbox extension modules
    payload = await echo_payload()
    assert "sandbox" not in payload["state"]
    payload["state"]["sandbox"] = {"manifest": {"entries": {}}}
    with pytest.raises(CheckpointSerializationError, match="unexpected keys"):
        await sdk_codec.decode_result(payload, Agent(name="a"), None)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: "just a string",
        lambda p: {**p, "state": "not an object"},
        lambda p: {**p, "final_output": {"kind": "typed"}},
        lambda p: {**p, "final_output": []},
        lambda p: {k: v for k, v in p.items() if k != "input"},
        lambda p: {**p, "state": {**p["state"], "generated_items": [{"type": "evil_item"}]}},
    ],
    ids=["string", "state", "final_output_keys", "final_output_type", "missing_key", "items"],
)
async def test_a_tampered_agent_checkpoint_raises_checkpoint_serialization_error(
    tamper: Any,
) -> None:
    payload = await echo_payload()
    with pytest.raises(CheckpointSerializationError):
        await sdk_codec.decode_result(tamper(payload), Agent(name="a"), None)


# ---------------------------------------------------------------------------------------------
# 4. deterministic agent failures
# ---------------------------------------------------------------------------------------------


@function_tool
def noop() -> str:
    return "ok"


async def test_max_turns_is_recorded_and_replayed() -> None:
    script = [step(function_call("noop", {}, call_id=f"n{i}"), inp=3, out=1) for i in range(3)]
    with pytest.raises(MaxTurnsExceeded) as caught:
        await Runner.run(
            Agent(name="loop", model=ScriptedModel(script), tools=[noop]), "go", max_turns=2
        )
    record = json_roundtrip(sdk_errors.encode_agent_error(caught.value) or {})
    assert record["type"] == "MaxTurnsExceeded"
    assert record["usage"]["requests"] == 2 and record["usage"]["total_tokens"] == 8
    with pytest.raises(MaxTurnsExceeded) as replayed:
        sdk_errors.raise_recorded_error(record)
    assert str(replayed.value) == str(caught.value) == "Max turns (2) exceeded"


@input_guardrail
def block_input(ctx: Any, agent: Any, inp: Any) -> GuardrailFunctionOutput:
    return GuardrailFunctionOutput(output_info={"why": "pii"}, tripwire_triggered=True)


async def test_input_guardrail_tripwire_is_recorded_and_replayed() -> None:
    agent = Agent(
        name="g", model=ScriptedModel([step(message("x"))]), input_guardrails=[block_input]
    )
    with pytest.raises(InputGuardrailTripwireTriggered) as caught:
        await Runner.run(agent, "my ssn")
    record = json_roundtrip(sdk_errors.encode_agent_error(caught.value) or {})
    with pytest.raises(InputGuardrailTripwireTriggered) as replayed:
        sdk_errors.raise_recorded_error(record)
    result = replayed.value.guardrail_result
    assert str(replayed.value) == str(caught.value)
    assert result.guardrail.get_name() == "block_input"
    assert result.output.output_info == {"why": "pii"} and result.output.tripwire_triggered
    assert result.guardrail.guardrail_function(None, None, "x") is result.output  # type: ignore[arg-type]


class StrictGuardrail(InputGuardrail[Any]):
    """A user subclass: the SDK's tripwire message names it."""


async def test_replayed_tripwire_keeps_a_subclassed_guardrails_message() -> None:
    guardrail = StrictGuardrail(guardrail_function=block_input.guardrail_function, name="strict")
    agent = Agent(name="g", model=ScriptedModel([step(message("x"))]), input_guardrails=[guardrail])
    with pytest.raises(InputGuardrailTripwireTriggered) as caught:
        await Runner.run(agent, "go")
    assert "StrictGuardrail" in str(caught.value)
    with pytest.raises(InputGuardrailTripwireTriggered) as replayed:
        sdk_errors.raise_recorded_error(
            json_roundtrip(sdk_errors.encode_agent_error(caught.value) or {})
        )
    assert str(replayed.value) == str(caught.value)


def test_guardrail_info_that_is_not_json_is_recorded_as_text() -> None:
    output = GuardrailFunctionOutput(output_info=object(), tripwire_triggered=True)
    exc = InputGuardrailTripwireTriggered(
        InputGuardrailResult(guardrail=block_input, output=output)
    )
    record = sdk_errors.encode_agent_error(exc) or {}
    assert isinstance(record["output_info"], str) and "object" in record["output_info"]
    assert json_roundtrip(record) == record


class Judgement(BaseModel):
    ok: bool


@output_guardrail
def block_output(ctx: Any, agent: Any, output: Any) -> GuardrailFunctionOutput:
    return GuardrailFunctionOutput(output_info=Judgement(ok=False), tripwire_triggered=True)


async def test_output_guardrail_tripwire_replays_with_the_live_agent() -> None:
    def graph(model: ScriptedModel) -> tuple[Agent[Any], Agent[Any]]:
        writer = Agent(name="writer", model=model, output_guardrails=[block_output])
        return Agent(name="boss", model=model, handoffs=[writer]), writer

    model = ScriptedModel(
        [step(function_call("transfer_to_writer", {}, call_id="h")), step(message("bad"))]
    )
    with pytest.raises(OutputGuardrailTripwireTriggered) as caught:
        await Runner.run(graph(model)[0], "go")
    record = json_roundtrip(sdk_errors.encode_agent_error(caught.value) or {})
    boss2, writer2 = graph(ScriptedModel())
    with pytest.raises(OutputGuardrailTripwireTriggered) as replayed:
        sdk_errors.raise_recorded_error(record, starting_agent=boss2)
    result = replayed.value.guardrail_result
    assert str(replayed.value) == str(caught.value)
    assert result.agent is writer2
    assert result.agent_output == "bad"
    assert result.output.output_info == {"ok": False}  # a model info comes back as its JSON


@tool_input_guardrail
def refuse_args(data: Any) -> ToolGuardrailFunctionOutput:
    return ToolGuardrailFunctionOutput.raise_exception(output_info={"arg": "bad"})


@tool_output_guardrail
def refuse_output(data: Any) -> ToolGuardrailFunctionOutput:
    return ToolGuardrailFunctionOutput.raise_exception(output_info="leak")


@function_tool(tool_input_guardrails=[refuse_args])
def guarded_in(a: int) -> int:
    return a


@function_tool(tool_output_guardrails=[refuse_output])
def guarded_out(a: int) -> int:
    return a


@pytest.mark.parametrize(
    ("tool", "exc_type", "name", "info"),
    [
        (guarded_in, ToolInputGuardrailTripwireTriggered, "refuse_args", {"arg": "bad"}),
        (guarded_out, ToolOutputGuardrailTripwireTriggered, "refuse_output", "leak"),
    ],
)
async def test_tool_guardrail_tripwires_are_recorded_and_replayed(
    tool: Any, exc_type: type[Exception], name: str, info: Any
) -> None:
    model = ScriptedModel([step(function_call(tool.name, {"a": 1}, call_id="t1"))])
    with pytest.raises(exc_type) as caught:
        await Runner.run(Agent(name="t", model=model, tools=[tool]), "go")
    record = json_roundtrip(sdk_errors.encode_agent_error(caught.value) or {})
    with pytest.raises(exc_type) as replayed:
        sdk_errors.raise_recorded_error(record)
    assert str(replayed.value) == str(caught.value)
    err: Any = replayed.value
    assert err.guardrail.get_name() == name
    assert err.output.output_info == info
    assert err.output.behavior == {"type": "raise_exception"}


@pytest.mark.parametrize(
    "exc",
    [
        ModelBehaviorError("bad json from the model"),
        ModelRefusalError("no"),
        TimeoutError(),
        RuntimeError("api down"),
        asyncio.CancelledError(),
    ],
)
def test_transient_failures_are_not_recorded(exc: BaseException) -> None:
    assert sdk_errors.encode_agent_error(exc) is None


def test_recorded_error_usage_goes_into_a_live_parent_context() -> None:
    parent = ToolContext(
        context=None, usage=Usage(), tool_name="ask", tool_call_id="c1", tool_arguments="{}"
    )
    record = {"type": "MaxTurnsExceeded", "message": "Max turns (1) exceeded"}
    spent = serialize_usage(usage(7, 3))
    with pytest.raises(MaxTurnsExceeded):
        sdk_errors.raise_recorded_error({**record, "usage": spent}, context=parent)
    assert parent.usage.total_tokens == 10 and parent.usage.requests == 1
    with pytest.raises(CheckpointSerializationError, match="unknown"):
        sdk_errors.raise_recorded_error({"type": "SystemExit", "message": ""})


# ---------------------------------------------------------------------------------------------
# 5. usage
# ---------------------------------------------------------------------------------------------


async def test_merge_usage_into_adds_requests_tokens_and_entries() -> None:
    result = await Runner.run(
        Agent(name="a", model=ScriptedModel([step(message("x"), inp=4, out=2)])), "go"
    )
    assert result.context_wrapper.usage.total_tokens == 6
    live: RunContextWrapper[None] = RunContextWrapper(context=None)
    live.usage.add(usage(1, 1))  # a live parent that already made one request
    sdk_usage.merge_usage_into(live, result.context_wrapper.usage)
    assert (live.usage.requests, live.usage.total_tokens) == (2, 8)
    assert len(live.usage.request_usage_entries) == 2


# ---------------------------------------------------------------------------------------------
# 6. runner interception (and usage isolation for nested runs)
# ---------------------------------------------------------------------------------------------


class CountingInterceptor:
    """Delegates every call; records what it saw. ``isolate`` mimics a pipeline's live path."""

    def __init__(self, isolate: bool = False) -> None:
        self.isolate = isolate
        self.seen: list[tuple[str, str, Any]] = []
        self.results: list[Any] = []

    async def run(
        self, runner: AgentRunner, starting_agent: Agent[Any], input: Any, kwargs: dict[str, Any]
    ) -> Any:
        self.seen.append(
            ("run", starting_agent.name, sdk_runner.tool_call_scope(kwargs.get("context")))
        )
        result = await sdk_runner.sdk_run(
            runner, starting_agent, input, kwargs, isolate=self.isolate
        )
        self.results.append(result)
        return result

    def run_streamed(
        self, runner: AgentRunner, starting_agent: Agent[Any], input: Any, kwargs: dict[str, Any]
    ) -> Any:
        self.seen.append(("run_streamed", starting_agent.name, None))
        return sdk_runner.sdk_run_streamed(
            runner, starting_agent, input, kwargs, isolate=self.isolate
        )


def one_shot(name: str, text: str) -> Agent[Any]:
    return Agent(name=name, model=ScriptedModel([step(message(text))]))


async def test_interceptor_sees_run_run_sync_and_run_streamed(restore_default_runner: None) -> None:
    interceptor = CountingInterceptor()
    sdk_runner.install_runner(interceptor)
    assert (await Runner.run(one_shot("a", "A"), "go")).final_output == "A"
    # run_sync needs a thread without a running loop
    sync_result = await asyncio.to_thread(Runner.run_sync, one_shot("b", "B"), "go")
    assert sync_result.final_output == "B"
    streamed = Runner.run_streamed(one_shot("c", "C"), "go")
    async for _event in streamed.stream_events():
        pass
    assert streamed.final_output == "C"
    assert interceptor.seen == [("run", "a", None), ("run", "b", None), ("run_streamed", "c", None)]


async def test_install_runner_is_idempotent_and_keeps_a_custom_runner(
    restore_default_runner: None,
) -> None:
    class CustomRunner(AgentRunner):
        calls = 0

        async def run(self, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
            CustomRunner.calls += 1
            return await super().run(starting_agent, input, **kwargs)

        def run_streamed(self, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
            CustomRunner.calls += 1
            return super().run_streamed(starting_agent, input, **kwargs)

    custom = CustomRunner()
    set_default_agent_runner(custom)
    first, second = CountingInterceptor(), CountingInterceptor()
    sdk_runner.install_runner(first)
    installed = get_default_agent_runner()
    sdk_runner.install_runner(second)
    assert get_default_agent_runner() is installed  # not wrapped twice
    await Runner.run(one_shot("a", "A"), "go")
    streamed = Runner.run_streamed(one_shot("b", "B"), "go")
    async for _event in streamed.stream_events():
        pass
    assert streamed.final_output == "B"
    # the last interceptor wins, and behind it the user's runner still does the work
    assert first.seen == [] and second.seen == [("run", "a", None), ("run_streamed", "b", None)]
    assert CustomRunner.calls == 2


def nested_graph(
    sub_texts: list[str], parallel: bool = False
) -> tuple[Agent[Any], list[Agent[Any]]]:
    subs = [
        Agent(
            name=f"sub{i}",
            model=ScriptedModel([ModelStep(output=[message(t)], usage=usage(5 + i, 1))]),
        )
        for i, t in enumerate(sub_texts)
    ]
    calls = [
        function_call(f"ask{i}", {"input": f"q{i}"}, call_id=f"c{i}") for i in range(len(subs))
    ]
    turns = (
        [ModelStep(output=calls, usage=usage(10, 2))]
        if parallel
        else [ModelStep(output=[c], usage=usage(10, 2)) for c in calls]
    )
    outer = Agent(
        name="outer",
        model=ScriptedModel([*turns, ModelStep(output=[message("done")], usage=usage(20, 3))]),
        tools=[s.as_tool(tool_name=f"ask{i}", tool_description="ask") for i, s in enumerate(subs)],
    )
    return outer, subs


async def test_nested_agent_as_tool_runs_are_intercepted_with_a_tool_context(
    restore_default_runner: None,
) -> None:
    interceptor = CountingInterceptor()
    sdk_runner.install_runner(interceptor)
    outer, _ = nested_graph(["sub says hi"])
    result = await Runner.run(outer, "go")
    assert result.final_output == "done"
    assert interceptor.seen == [("run", "outer", None), ("run", "sub0", ("ask0", '{"input":"q0"}'))]
    nested = interceptor.results[0]  # the nested run finishes first
    assert isinstance(nested.context_wrapper, ToolContext)
    assert sdk_runner.tool_call_scope(RunContextWrapper(context=None)) is None
    # SDK fact the integration relies on: nested tokens land in the parent's usage, while the
    # parent's raw_responses only hold its own responses
    outer_tokens, sub_tokens = 12 + 23, 6
    assert result.context_wrapper.usage.total_tokens == outer_tokens + sub_tokens
    assert sum(r.usage.total_tokens for r in result.raw_responses) == outer_tokens


async def test_isolated_usage_keeps_parallel_nested_runs_apart(
    restore_default_runner: None,
) -> None:
    outer_plain, _ = nested_graph(["a", "b"], parallel=True)
    baseline = await Runner.run(outer_plain, "go")  # the SDK's own accounting

    interceptor = CountingInterceptor(isolate=True)
    sdk_runner.install_runner(interceptor)
    outer, _ = nested_graph(["a", "b"], parallel=True)
    result = await Runner.run(outer, "go")
    nested = {r.last_agent.name: r for r in interceptor.results if r.last_agent.name != "outer"}
    # each nested result holds exactly its own usage although both ran concurrently
    assert nested["sub0"].context_wrapper.usage.total_tokens == 6
    assert nested["sub1"].context_wrapper.usage.total_tokens == 7
    assert isinstance(nested["sub0"].context_wrapper, ToolContext)
    # and the parent's totals are what the SDK alone produces
    assert serialize_usage(result.context_wrapper.usage)["total_tokens"] == (
        baseline.context_wrapper.usage.total_tokens
    )
    assert result.context_wrapper.usage.requests == baseline.context_wrapper.usage.requests == 4


async def test_isolated_usage_on_a_user_wrapper_at_top_level() -> None:
    runner = AgentRunner()
    wrapper = RunContextWrapper(context={"k": 1}, usage=usage(100, 0))
    agent = Agent(name="a", model=ScriptedModel([step(message("x"), inp=4, out=2)]))
    result = await sdk_runner.sdk_run(runner, agent, "go", {"context": wrapper}, isolate=True)
    assert result.context_wrapper.usage.total_tokens == 6  # this run's own
    assert result.context_wrapper.context is wrapper.context
    assert wrapper.usage.total_tokens == 106 and wrapper.usage.requests == 2


async def test_isolated_usage_on_a_streamed_run() -> None:
    wrapper = RunContextWrapper(context=None, usage=usage(100, 0))
    agent = Agent(name="a", model=ScriptedModel([step(message("x"), inp=4, out=2)]))
    streamed = sdk_runner.sdk_run_streamed(
        AgentRunner(), agent, "go", {"context": wrapper}, isolate=True
    )
    async for _event in streamed.stream_events():
        pass
    assert streamed.context_wrapper.usage.total_tokens == 6
    assert wrapper.usage.total_tokens == 106


async def test_replayed_nested_run_adds_its_usage_to_the_live_parent(
    restore_default_runner: None,
) -> None:
    interceptor = CountingInterceptor(isolate=True)
    sdk_runner.install_runner(interceptor)
    outer, _ = nested_graph(["sub says hi"])
    original = await Runner.run(outer, "go")
    nested = interceptor.results[0]
    payload = json_roundtrip(sdk_codec.encode_result(nested))

    # crash + resume: the parent re-executes, the nested run replays from its checkpoint
    class ReplayNested(CountingInterceptor):
        async def run(self, runner: Any, starting_agent: Any, input: Any, kwargs: Any) -> Any:
            context = kwargs.get("context")
            if sdk_runner.tool_call_scope(context) is not None:
                return await sdk_codec.decode_result(payload, starting_agent, context)
            return await super().run(runner, starting_agent, input, kwargs)

    sdk_runner.install_runner(ReplayNested(isolate=True))
    outer2, subs2 = nested_graph(["never called"])
    again = await Runner.run(outer2, "go")
    assert again.final_output == original.final_output
    assert serialize_usage(again.context_wrapper.usage) == serialize_usage(
        original.context_wrapper.usage
    )
    assert again.to_input_list() == original.to_input_list()
    assert subs2[0].model.remaining_steps == 1  # type: ignore[union-attr]


def parent_tool_context() -> ToolContext[dict[str, str]]:
    return ToolContext(
        context={"tenant": "t"},
        usage=usage(1, 1),
        tool_name="ask",
        tool_call_id="c7",
        tool_arguments='{"input":"q"}',
    )


def tool_using_sub(model: ScriptedModel) -> Agent[Any]:
    return Agent(name="sub", model=model, tools=[noop])


async def test_decode_with_a_tool_context_keeps_the_tool_call_identity() -> None:
    parent = parent_tool_context()
    script = [step(function_call("noop", {}, call_id="n1")), step(message("hi"))]
    orig = await sdk_runner.sdk_run(
        AgentRunner(),
        tool_using_sub(ScriptedModel(script)),
        "q",
        {"context": parent},
        isolate=True,
    )
    # the run's tool bookkeeping lives on its wrapper; the replay must carry it too
    assert orig.to_state().to_json()["context"]["tool_invocations"]
    fresh_parent = parent_tool_context()
    repl = await sdk_codec.decode_result(
        json_roundtrip(sdk_codec.encode_result(orig)), tool_using_sub(ScriptedModel()), fresh_parent
    )
    assert_faithful(orig, repl)
    assert isinstance(repl.context_wrapper, ToolContext)
    assert repl.agent_tool_invocation == orig.agent_tool_invocation
    assert repl.agent_tool_invocation is not None
    assert repl.agent_tool_invocation.tool_call_id == "c7"
    assert repl.context_wrapper.context is fresh_parent.context
    # the parent's usage ends where the live run left the original parent's
    assert serialize_usage(fresh_parent.usage) == serialize_usage(parent.usage)
    assert fresh_parent.usage.requests == 3


# ---------------------------------------------------------------------------------------------
# 7. streaming
# ---------------------------------------------------------------------------------------------


async def test_on_stream_complete_fires_without_consumption() -> None:
    seen: list[tuple[Any, BaseException | None]] = []

    async def callback(streamed: Any, error: BaseException | None) -> None:
        seen.append((streamed.final_output, error))

    streamed = Runner.run_streamed(one_shot("a", "hello"), "go")
    await sdk_streaming.on_stream_complete(streamed, callback)
    assert seen == [("hello", None)]


async def test_on_stream_complete_reports_what_stream_events_would_raise() -> None:
    errors: list[BaseException | None] = []

    async def callback(streamed: Any, error: BaseException | None) -> None:
        errors.append(error)

    looping = Agent(
        name="loop",
        model=ScriptedModel([step(function_call("noop", {}, call_id=f"n{i}")) for i in range(3)]),
        tools=[noop],
    )
    await sdk_streaming.on_stream_complete(
        Runner.run_streamed(looping, "go", max_turns=2), callback
    )
    guarded = Agent(
        name="g", model=ScriptedModel([step(message("x"))]), input_guardrails=[block_input]
    )
    await sdk_streaming.on_stream_complete(Runner.run_streamed(guarded, "go"), callback)
    assert isinstance(errors[0], MaxTurnsExceeded) and str(errors[0]) == "Max turns (2) exceeded"
    assert isinstance(errors[1], InputGuardrailTripwireTriggered)
    assert (
        sdk_errors.encode_agent_error(errors[0]) is not None
    )  # recordable like a non-streamed one


@input_guardrail
async def slow_block(ctx: Any, agent: Any, inp: Any) -> GuardrailFunctionOutput:
    await asyncio.sleep(0.05)
    return GuardrailFunctionOutput(output_info="late", tripwire_triggered=True)


async def test_on_stream_complete_sees_a_parallel_guardrail_that_trips_after_the_answer() -> None:
    errors: list[BaseException | None] = []

    async def callback(streamed: Any, error: BaseException | None) -> None:
        errors.append(error)

    agent = Agent(
        name="g", model=ScriptedModel([step(message("x"))]), input_guardrails=[slow_block]
    )
    streamed = Runner.run_streamed(agent, "go")
    await sdk_streaming.on_stream_complete(streamed, callback)
    # the SDK's run task ended normally with an answer; only stream_events() would raise
    assert streamed.final_output == "x" and streamed.run_loop_exception is None
    assert isinstance(errors[0], InputGuardrailTripwireTriggered)
    # the billed answer's tokens travel with the recorded error
    assert (sdk_errors.encode_agent_error(errors[0]) or {})["usage"]["total_tokens"] == 15
    with pytest.raises(InputGuardrailTripwireTriggered):
        async for _event in streamed.stream_events():
            pass


async def test_on_stream_complete_after_the_consumer_already_saw_the_error() -> None:
    errors: list[BaseException | None] = []

    async def callback(streamed: Any, error: BaseException | None) -> None:
        errors.append(error)

    looping = Agent(
        name="loop",
        model=ScriptedModel([step(function_call("noop", {}, call_id=f"n{i}")) for i in range(3)]),
        tools=[noop],
    )
    streamed = Runner.run_streamed(looping, "go", max_turns=1)
    with pytest.raises(MaxTurnsExceeded):
        async for _event in streamed.stream_events():
            pass
    await sdk_streaming.on_stream_complete(streamed, callback)
    assert isinstance(errors[0], MaxTurnsExceeded)


async def test_on_stream_complete_reports_a_cancelled_stream() -> None:
    errors: list[BaseException | None] = []

    async def callback(streamed: Any, error: BaseException | None) -> None:
        errors.append(error)

    blocked = asyncio.Event()

    async def never(call: Any) -> Any:
        await blocked.wait()

    agent = Agent(name="a", model=ScriptedModel([ModelStep.respond(never)]))
    streamed = Runner.run_streamed(agent, "go")
    watcher = sdk_streaming.on_stream_complete(streamed, callback)
    await asyncio.sleep(0.01)
    streamed.cancel()
    await watcher
    assert isinstance(errors[0], asyncio.CancelledError)
    assert sdk_errors.encode_agent_error(errors[0]) is None  # transient: runs again next time


def event_view(event: Any) -> tuple[str, str | None, str]:
    if event.type == "agent_updated_stream_event":
        return (event.type, None, event.new_agent.name)
    if event.type == "raw_response_event":
        return (event.type, event.data.type, str(event.data.response.usage.total_tokens))
    return (event.type, event.name, event.item.agent.name)


def completed_or_semantic(event: Any) -> bool:
    return event.type != "raw_response_event" or event.data.type == "response.completed"


async def test_replay_streamed_yields_the_recorded_events_marked_replayed() -> None:
    triage, _ = weather_graph(ScriptedModel(weather_script()))
    live = Runner.run_streamed(triage, "forecast Rome", context=AppContext("u1"))
    live_events = [event_view(e) async for e in live.stream_events() if completed_or_semantic(e)]
    payload = json_roundtrip(sdk_codec.encode_result(live))

    empty = ScriptedModel([])
    triage2, specialist2 = weather_graph(empty)
    ctx2 = AppContext("u1")
    replay = sdk_streaming.replay_streamed(payload, triage2, ctx2)
    replayed = [e async for e in replay.stream_events()]
    replay_events = [event_view(e) for e in replayed]

    # What the first run streamed, less the token deltas; one response.completed per response.
    assert replay_events == live_events
    assert all(sdk_streaming.is_replayed(e) for e in replayed)
    assert not any(sdk_streaming.is_replayed(e) for e in [object()])
    assert [name for kind, name, _ in replay_events if kind == "run_item_stream_event"] == [
        "handoff_requested",
        "handoff_occured",
        "tool_called",
        "tool_output",
        "message_output_created",
    ]
    assert replay.is_complete and replay.final_output == live.final_output
    assert isinstance(replay.final_output, Answer)
    assert replay.last_agent is specialist2 and replay.context_wrapper.context is ctx2
    assert_faithful(live, replay)
    assert isinstance(replay.new_items[-1], MessageOutputItem)
    assert empty.calls == ()


async def test_replay_streamed_surfaces_a_restore_failure_from_stream_events() -> None:
    triage, _ = weather_graph(ScriptedModel(weather_script()))
    payload = json_roundtrip(sdk_codec.encode_result(await Runner.run(triage, "go")))
    replay = sdk_streaming.replay_streamed(payload, Agent(name="stranger"), None)
    with pytest.raises(CheckpointSerializationError, match="agent graph"):
        async for _event in replay.stream_events():
            pass


# ---------------------------------------------------------------------------------------------
# 8. @durable_tool plumbing
# ---------------------------------------------------------------------------------------------


class Query(BaseModel):
    text: str
    limit: int = 3


def lookup(city: str, days: Annotated[int, Field(ge=1, le=7)] = 2, q: Query | None = None) -> str:
    """Look up the weather.

    Args:
        city: The city to look up.
        days: How many days ahead.
        q: An optional structured query.
    """
    return f"{city}:{days}:{q.text if q else '-'}"


async def lookup_async(city: str, days: int = 1) -> str:
    """Look up asynchronously.

    Args:
        city: The city.
        days: Days ahead.
    """
    await asyncio.sleep(0)
    return f"{city}:{days}"


def with_ctx(ctx: ToolContext[Any], city: str) -> str:
    """Uses its context.

    Args:
        city: The city.
    """
    return f"{ctx.tool_call_id}:{city}"


async def with_wrapper_ctx(ctx: RunContextWrapper[dict[str, Any]], city: str) -> str:
    """Uses the run context.

    Args:
        city: The city.
    """
    return f"{ctx.context['tenant']}:{city}"


FUTURE_SOURCE = '''
from __future__ import annotations
from typing import Annotated, Any
from pydantic import Field
from agents.tool_context import ToolContext


def future_lookup(city: str, days: Annotated[int, Field(ge=1)] = 2) -> str:
    """Look up with string annotations.

    Args:
        city: The city.
        days: Days ahead.
    """
    return f"{city}:{days}"


async def future_ctx(ctx: ToolContext[Any], city: str) -> str:
    """String-annotated context parameter.

    Args:
        city: The city.
    """
    return f"{ctx.tool_name}:{city}"


def future_unresolved(ctx: ToolContext[NotDefinedYet], city: str) -> str:
    return city
'''
FUTURE: dict[str, Any] = {"__name__": "future_tools"}
exec(compile(FUTURE_SOURCE, "future_tools.py", "exec"), FUTURE)

CALLS: list[tuple[str, str]] = []


def durable(fn: Any) -> Any:
    """A minimal @durable_tool stand-in built on the plumbing under test."""
    user_takes_ctx = sdk_sig.takes_context(fn)

    def call_args(ctx: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        CALLS.append((ctx.tool_name, ctx.tool_call_id))
        return (ctx, *args) if user_takes_ctx else args

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            return await fn(*call_args(ctx, args), **kwargs)
    else:

        @functools.wraps(fn)
        def wrapper(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(*call_args(ctx, args), **kwargs)

    if not user_takes_ctx:
        sdk_sig.inject_context_parameter(wrapper, fn)
    return wrapper


def test_takes_context() -> None:
    assert sdk_sig.takes_context(with_ctx) and sdk_sig.takes_context(with_wrapper_ctx)
    assert not sdk_sig.takes_context(lookup) and not sdk_sig.takes_context(lookup_async)
    assert sdk_sig.takes_context(FUTURE["future_ctx"])
    assert not sdk_sig.takes_context(FUTURE["future_lookup"])
    # a string annotation that cannot be resolved yet is matched by class name
    assert sdk_sig.takes_context(FUTURE["future_unresolved"])

    def no_params() -> None: ...

    class SubContext(RunContextWrapper[Any]):
        pass

    def subclass_ctx(ctx: SubContext, x: int) -> int:
        return x

    assert not sdk_sig.takes_context(no_params)
    assert not sdk_sig.takes_context(subclass_ctx)  # the SDK's rule is identity, not subclassing


@pytest.mark.parametrize(
    "fn",
    [
        lookup,
        lookup_async,
        with_ctx,
        with_wrapper_ctx,
        FUTURE["future_lookup"],
        FUTURE["future_ctx"],
    ],
    ids=lambda f: f.__name__,
)
def test_wrapped_tool_keeps_schema_name_and_description(fn: Any) -> None:
    plain, wrapped = function_tool(fn), function_tool(durable(fn))
    assert wrapped.params_json_schema == plain.params_json_schema
    assert wrapped.name == plain.name and wrapped.description == plain.description
    assert inspect.iscoroutinefunction(durable(fn)) == inspect.iscoroutinefunction(fn)
    before = dict(fn.__annotations__)
    durable(fn)
    assert fn.__annotations__ == before  # injecting into the wrapper leaves fn untouched


async def test_wrapped_tools_receive_the_tool_call_and_their_arguments() -> None:
    CALLS.clear()
    tools = [function_tool(durable(f)) for f in (lookup, lookup_async, with_ctx, with_wrapper_ctx)]
    model = ScriptedModel(
        [
            step(
                function_call(
                    "lookup",
                    {"city": "Rome", "days": 3, "q": {"text": "t", "limit": 1}},
                    call_id="c1",
                ),
                function_call("lookup_async", {"city": "Oslo", "days": 1}, call_id="c2"),
                function_call("with_ctx", {"city": "Nice"}, call_id="c3"),
                function_call("with_wrapper_ctx", {"city": "Bern"}, call_id="c4"),
            ),
            step(message("done")),
        ]
    )
    result = await Runner.run(
        Agent(name="t", model=model, tools=tools), "go", context={"tenant": "T"}
    )
    outputs = [i.output for i in result.new_items if i.type == "tool_call_output_item"]
    assert outputs == ["Rome:3:t", "Oslo:1", "c3:Nice", "T:Bern"]
    assert sorted(CALLS) == [
        ("lookup", "c1"),
        ("lookup_async", "c2"),
        ("with_ctx", "c3"),
        ("with_wrapper_ctx", "c4"),
    ]


def test_identity_fast_path_matches_the_sdk_for_unique_and_shared_names() -> None:
    """The RunState serialization fast path returns exactly what the SDK's own functions do."""
    from agents import _run_state_agent_identity as identity

    leaf = Agent(name="leaf", instructions="a")
    unique = Agent(name="root", handoffs=[Agent(name="mid", handoffs=[leaf]), leaf])
    twins = Agent(
        name="root",
        handoffs=[Agent(name="twin", instructions="one"), Agent(name="twin", instructions="two")],
    )
    for graph in (unique, twins):
        assert identity._build_agent_identity_map(graph) == sdk_fastpath._sdk_identity_map(graph)
        assert identity._get_ambiguous_agent_ids(graph) == sdk_fastpath._sdk_ambiguous_ids(graph)
    assert list(identity._build_agent_identity_map(unique)) == ["root", "mid", "leaf"]
    assert len(identity._build_agent_identity_map(twins)) == 3  # the SDK's "twin#2" naming
