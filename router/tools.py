"""Tool calls: what the model is asked for, and reading its calls back.

`tool_choice` decides how (OpenAI's semantics, vLLM's means):
- "none": the tools are left out of the prompt; the answer is text.
- "auto" (the default with tools): the chat template shows the tools; the
  model answers freely and the calls are parsed out of its text by the
  parser `--tool-call-parser` names: `hermes` (Hermes/Qwen's
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, the
  built-in model's template) or `llama3_json` (Llama 3's bare
  `{"name": ..., "parameters": {...}}`, calls separated by ";").
- "required": the output is confined by a grammar to a JSON array of one or
  more `{"name": <a tool's>, "parameters": <its schema>}` (one, with
  parallel_tool_calls false).
- a named function: the output is confined to that function's parameters
  schema; it is the call's arguments.
A response with calls carries them in `message.tool_calls` (ids
`call_<hex>`) and finishes with "tool_calls".
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from engine.sampling_params import GuidedSpec

PARSERS = ("hermes", "llama3_json")
HERMES_CALL_OPEN = "<tool_call>"  # what starts a call in the hermes format
DEFAULT_PARSER = "hermes"

Mode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class ToolUse:
    """How a request's output is read for tool calls (none: plain text)."""

    mode: Mode
    parser: str = DEFAULT_PARSER
    function: str = ""  # the named function (mode "named")
    parallel: bool = True  # False: at most one call (parallel_tool_calls)

    def read(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer."""
        if self.mode == "named":
            return None, [_call(self.function, _json_text(text))]
        if self.mode == "required":
            return None, _required_calls(text)
        if self.parser == "hermes":
            return _hermes(text)
        return _llama3_json(text)


def guided_spec(
    tools: list[dict[str, Any]], mode: Mode, function: str, parallel: bool
) -> GuidedSpec | None:
    """The grammar a forced call's output follows (none for "auto")."""
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    if mode == "named":
        return GuidedSpec.json_schema(by_name[function] or {"type": "object"})
    if mode != "required":
        return None
    one_of = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [name]},
                "parameters": params or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, params in by_name.items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return GuidedSpec.json_schema(schema)


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments)


def _json_text(text: str) -> str:
    """Arguments as compact JSON text (the text itself when it is not JSON:
    a call cut short by max_tokens is passed on as generated)."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


def _required_calls(text: str) -> list[ToolCall]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []  # cut short by max_tokens: no complete call
    return [
        _call(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
        for item in items
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find(HERMES_CALL_OPEN)
    if start == -1:
        return text, []
    calls = []
    for body in _HERMES_CALL.findall(text[start:]):
        call = _named_object(body, "arguments")
        if call is None:
            return text, []  # not a well-formed call: the text is the answer
        calls.append(call)
    content = text[:start].strip()
    return content or None, calls


def _llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in _split_objects(body):
        call = _named_object(part, "parameters")
        if call is None:
            return text, []
        calls.append(call)
    return None, calls


def _named_object(text: str, args_key: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return _call(obj["name"], text)


def _split_objects(body: str) -> list[str]:
    """JSON objects separated by ";" (Llama 3's parallel calls)."""
    decoder = json.JSONDecoder()
    parts, i = [], 0
    while i < len(body):
        try:
            _, end = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return [body]  # not a run of objects: let the caller refuse it whole
        parts.append(body[i:end])
        i = end
        while i < len(body) and body[i] in " \t\r\n;":
            i += 1
    return parts


class StreamedAnswer:
    """One streamed choice's text under tool use: content is passed on as it
    comes until a call may have begun, then held; at the end the whole
    answer is read. Under a forced call nothing is content."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self._held = ""  # received, not passed on
        self._in_call = use.mode != "auto"

    def feed(self, text: str) -> str:
        """The content to send now, of everything received so far."""
        self._held += text
        if self._in_call:
            return ""
        if self.use.parser == "llama3_json":
            body = self._held.lstrip()
            if not body:
                return ""
            if body[0] in "{<":  # a call (or a python tag) from the first character: hold it all
                self._in_call = True
                return ""
            out, self._held = self._held, ""
            return out
        marker = HERMES_CALL_OPEN
        at = self._held.find(marker)
        if at != -1:
            self._in_call = True
            out, self._held = self._held[:at], self._held[at:]
            return out
        keep = _partial_suffix(self._held, marker)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(out) :]
        return out

    def finish(self, whole: str) -> tuple[str, list[ToolCall]]:
        """At the end: (content still to send, calls) given the whole answer."""
        _, found = self.use.read(whole)
        if found:  # the content before the call went out as it came
            return "", found
        rest, self._held = self._held, ""
        return rest, []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
