"""Request bodies of the OpenAI-compatible API, as pydantic models.

Types are strict: a string where a number belongs is an error, not coerced
(ints are accepted for float fields). Unknown fields are ignored, as OpenAI's
clients send fields this server does not implement (`user`, `tools`, ...).
Range checks that need the model (context length, vocabulary) are in
preprocess.py; the sampling ranges are checked by engine.SamplingParams.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# A JSON number, finite; bools and numeric strings are rejected.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# str | [str] | [token ids] | [[token ids]]: the lists of length 1 are how
# batching clients send one prompt; longer ones are rejected in preprocess.py.
Prompt = StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]

# What each union-typed field accepts, for error messages (pydantic's own
# message for a union lists every member's failure).
FIELD_EXPECTS = {
    "prompt": "a string, a list of token ids, or a list holding one of those",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: StrictBool | None = None


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
    n: StrictInt | None = None  # 1 only
    presence_penalty: Number | None = None  # 0 only
    frequency_penalty: Number | None = None  # 0 only


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    logprobs: StrictInt | None = None  # >= 0: report each sampled token's logprob
    echo: StrictBool | None = False  # true is not supported
    best_of: StrictInt | None = None  # 1 only


class TextPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None  # wins over max_tokens
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None  # 0 only, for now
