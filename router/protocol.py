"""Request bodies of the OpenAI-compatible API, as pydantic models.

Types are strict: a string where a number belongs is an error, not coerced
(ints are accepted for float fields). Fields that change what a request means
and that this server does not implement (`logit_bias`, `tools`, ...) are
refused by name unless they hold their "unset" value (UNSUPPORTED below), so
that nothing a client asked for is silently ignored; fields that change
nothing here (`user`, `metadata`, `store`, ...) and unknown fields are
ignored. Range checks that need the model (context length, vocabulary) are in
preprocess.py; the sampling ranges are checked by engine.SamplingParams.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# The two generation routes: /v1/completions and /v1/chat/completions.
Endpoint = Literal["completions", "chat_completions"]

# A JSON number, finite; bools and numeric strings are rejected.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# str | [str] | [token ids] | [[token ids]]: the lists of length 1 are how
# batching clients send one prompt; longer ones are rejected in prompt_ids.py.
Prompt = StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]

# What each union-typed field accepts, for error messages (pydantic's own
# message for a union lists every member's failure).
FIELD_EXPECTS = {
    "prompt": "a string, a list of token ids, or a list holding one of those",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
    "guided_json": "a JSON schema (an object, or a string holding one)",
    "tool_choice": '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
    "arguments": "a JSON string or an object",
}


# Fields not implemented, with the values that mean "not used" (besides null,
# which OpenAI clients send for any unset field). A value is accepted when it
# equals one of these and has the same JSON type (so `true` is not `1`).
_UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "function_call": ("none", "auto"),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    # vLLM's sampling extensions that clients of vLLM send:
    "min_p": (0, 0.0),
    "length_penalty": (1, 1.0),
    "use_beam_search": (False,),
    "prompt_logprobs": (),
    "guided_grammar": (),
    "structured_outputs": (),
}

UNSUPPORTED: dict[Endpoint, dict[str, tuple[Any, ...]]] = {
    "completions": {**_UNSUPPORTED_COMMON, "suffix": ("",)},
    "chat_completions": _UNSUPPORTED_COMMON,
}
# The same, for each chat message (tool calls in the history).
UNSUPPORTED_IN_MESSAGE: dict[str, tuple[Any, ...]] = {
    "function_call": (),
}


def is_unset(value: Any, unset: tuple[Any, ...]) -> bool:
    """Whether `value` (parsed JSON) is null or one of the `unset` values."""
    return value is None or any(type(value) is type(u) and value == u for u in unset)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: StrictBool | None = None


class JsonSchemaFormat(_Body):
    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # with type json_schema


class _SamplingFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: StrictStr | None = None  # None: the served model
    max_tokens: StrictInt | None = None
    temperature: Number | None = None  # None: 1.0
    top_p: Number | None = None  # None: 1.0
    top_k: StrictInt | None = None  # None, 0 or -1: off
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM extension
    ignore_eos: StrictBool = False  # vLLM extension
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None  # choices, 1-16
    presence_penalty: Number | None = None  # [-2, 2]
    frequency_penalty: Number | None = None  # [-2, 2]
    repetition_penalty: Number | None = None  # vLLM extension: > 0, 1 is off
    min_tokens: StrictInt | None = None  # vLLM extension
    logit_bias: dict[StrictStr, Number] | None = None  # token id (as a string) -> bias
    # Structured output: one of these (the guided_* are vLLM's extensions).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None  # a JSON schema
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    logprobs: StrictInt | None = None  # 0-20: sampled token's logprob + this many alternatives
    echo: StrictBool | None = False  # the prompt's text starts the output (not with logprobs)
    best_of: StrictInt | None = None  # choices generated (n-16); the best n answered


class TextPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class CalledFunction(_Body):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"  # JSON text (OpenAI) or an object


class MessageToolCall(_Body):
    """A call an assistant message in the history made."""

    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: StrictStr | None = None  # tool messages: the call this answers


class FunctionSpec(_Body):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # wins over max_tokens
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None  # 0-20 alternatives per token; needs logprobs: true
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | a named function (default: auto with tools)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # False: at most one call
