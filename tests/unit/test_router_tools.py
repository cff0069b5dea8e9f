"""Reading tool calls out of answers (router/tools.py), and the grammars that
force them: each parser on the formats its models write, answers that are
not calls left as text, and forced calls' schemas that the grammar library
takes and that validate what they produce."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine.structured_output import validate_spec
from router.tools import StreamedAnswer, ToolUse, guided_spec

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def calls(use: ToolUse, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    content, found = use.read(text)
    assert all(c.id.startswith("call_") for c in found)
    assert len({c.id for c in found}) == len(found)
    return content, [(c.name, json.loads(c.arguments)) for c in found]


def test_hermes_calls_with_content_before_them():
    text = (
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    assert calls(ToolUse("auto", "hermes"), text) == (
        "Let me check.",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    )


def test_hermes_call_cut_off_before_its_closing_tag_still_parses():
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\n'
    assert calls(ToolUse("auto", "hermes"), text) == (None, [("get_time", {})])


@pytest.mark.parametrize(
    "text",
    [
        "Plain answer, no tools.",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
    ],
)
def test_what_is_not_a_well_formed_call_stays_text(text):
    assert calls(ToolUse("auto", "hermes"), text) == (text, [])


def test_llama3_json_calls_separated_by_semicolons():
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
        '{"name": "get_time", "parameters": {}}'
    )
    assert calls(ToolUse("auto", "llama3_json"), text) == (
        None,
        [("get_weather", {"city": "Oslo"}), ("get_time", {})],
    )
    assert calls(ToolUse("auto", "llama3_json"), "Hello {there}") == ("Hello {there}", [])


def test_forced_calls_read_their_whole_output():
    required = json.dumps(
        [
            {"name": "get_time", "parameters": {}},
            {"name": "get_weather", "parameters": {"city": "Rome"}},
        ]
    )
    assert calls(ToolUse("required"), required) == (
        None,
        [("get_time", {}), ("get_weather", {"city": "Rome"})],
    )
    named = ToolUse("named", function="get_weather")
    assert calls(named, '{"city": "Lima"}') == (None, [("get_weather", {"city": "Lima"})])


def test_forced_call_grammars_are_accepted_and_describe_the_calls():
    spec = guided_spec([WEATHER, TIME], "required", "", parallel=False)
    assert spec is not None
    validate_spec(spec)
    schema = json.loads(spec.spec)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "x"}}], schema)
    with pytest.raises(jsonschema.ValidationError):  # parallel_tool_calls false: one call
        jsonschema.validate([{"name": "get_time", "parameters": {}}] * 2, schema)
    with pytest.raises(jsonschema.ValidationError):  # the tool's own schema holds
        jsonschema.validate([{"name": "get_weather", "parameters": {"unit": "c"}}], schema)
    named = guided_spec([WEATHER, TIME], "named", "get_weather", parallel=True)
    assert named is not None and json.loads(named.spec) == WEATHER["function"]["parameters"]
    assert guided_spec([WEATHER], "auto", "", parallel=True) is None


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_a_streamed_answer_passes_content_on_until_a_call_begins(cut):
    answer = 'Checking <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    stream = StreamedAnswer(ToolUse("auto", "hermes"))
    sent = "".join(stream.feed(answer[i : i + cut]) for i in range(0, len(answer), cut))
    assert sent == "Checking "  # never a piece of the marker
    rest, found = stream.finish(answer)
    assert rest == "" and [c.name for c in found] == ["get_time"]


def test_a_streamed_answer_without_a_call_is_all_content():
    answer = "The time is <b>noon</b> <tool"
    stream = StreamedAnswer(ToolUse("auto", "hermes"))
    sent = "".join(stream.feed(answer[i : i + 2]) for i in range(0, len(answer), 2))
    rest, found = stream.finish(answer)
    assert sent + rest == answer and found == []
    forced = StreamedAnswer(ToolUse("named", function="get_time"))
    assert forced.feed("{}") == "" and [c.name for c in forced.finish("{}")[1]] == ["get_time"]
