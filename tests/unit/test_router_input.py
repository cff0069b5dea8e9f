"""What a request body may hold, over real HTTP (tests/router_app.py): a
string that is not valid Unicode is a 400 naming the field, and so is a field
the server does not implement unless it holds its unset value.

Every refusal is a 4xx with an OpenAI-shaped JSON body naming the field,
never a 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.router_app import CHAT, USER, C, ServedApp, assert_error, keyed_router, post, tiny_model

LONE = "\ud800"  # an unpaired surrogate: valid JSON ("\ud800"), not valid Unicode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def router(model_dir) -> Iterator[ServedApp]:
    yield from keyed_router(model_dir)


def part(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


# -- invalid Unicode -------------------------------------------------------------

SURROGATES: list[tuple[str, str, dict[str, Any], str]] = [
    ("prompt", C, {"prompt": LONE}, "prompt"),
    ("prompt-in-list", C, {"prompt": ["ok", LONE]}, "prompt[1]"),
    ("prompt-mid-string", C, {"prompt": "hello " + LONE + " world"}, "prompt"),
    ("stop", C, {"prompt": "hi", "stop": LONE}, "stop"),
    ("stop-list", C, {"prompt": "hi", "stop": ["a", LONE]}, "stop[1]"),
    ("model", C, {"prompt": "hi", "model": LONE}, "model"),
    ("chat-model", CHAT, {"messages": USER, "model": LONE}, "model"),
    (
        "chat-content",
        CHAT,
        {"messages": [{"role": "user", "content": LONE}]},
        "messages[0].content",
    ),
    ("chat-part", CHAT, {"messages": part(LONE)}, "messages[0].content[0].text"),
    ("chat-name", CHAT, {"messages": [{**USER[0], "name": LONE}]}, "messages[0].name"),
    ("chat-stop", CHAT, {"messages": USER, "stop": [LONE]}, "stop[0]"),
    ("ignored-field", C, {"prompt": "hi", "user": LONE}, "user"),
    ("low-surrogate", C, {"prompt": "\udc00x"}, "prompt"),
]


@pytest.mark.parametrize(
    "path, body, param", [s[1:] for s in SURROGATES], ids=[s[0] for s in SURROGATES]
)
def test_a_lone_surrogate_is_400_naming_the_field(router, path, body, param):
    err = assert_error(post(router, path, body), 400, param)
    assert err["type"] == "invalid_request_error"
    assert "surrogate" in err["message"]


def test_a_lone_surrogate_in_a_key_is_400(router):
    err = assert_error(post(router, C, {"prompt": "hi", LONE: 1}), 400, None)
    assert "surrogate" in err["message"]


def test_a_surrogate_pair_is_valid_unicode(router):
    # "\ud83d\ude00" is one character (U+1F600), not two lone halves.
    r = post(router, C, {"prompt": "smile \ud83d\ude00", "stop": "\ud83d\ude00"})
    assert r.status_code == 503, r.text  # valid: it reached dispatch


# -- fields the server does not implement --------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

UNSUPPORTED: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "response-format-schema-missing",
        CHAT,
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {}}},
        "response_format",
    ),
    (
        "two-structured-outputs",
        C,
        {"prompt": "hi", "guided_json": {"type": "object"}, "guided_regex": "a+"},
        "guided_json",
    ),
    ("guided-choice-empty", C, {"prompt": "hi", "guided_choice": []}, "guided_choice"),
    ("tools-not-a-list", CHAT, {"messages": USER, "tools": TOOL}, "tools"),
    ("tools-twice", CHAT, {"messages": USER, "tools": [TOOL, TOOL]}, "tools"),
    (
        "tool-choice-unknown-function",
        CHAT,
        {
            "messages": USER,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
    ),
    (
        "tools-and-response-format",
        CHAT,
        {
            "messages": USER,
            "tools": [TOOL],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "response_format",
    ),
    ("tool-choice-required", CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    (
        "tool-choice-named",
        CHAT,
        {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "tool_choice",
    ),
    ("functions", CHAT, {"messages": USER, "functions": [TOOL["function"]]}, "functions"),
    ("function-call", CHAT, {"messages": USER, "function_call": {"name": "f"}}, "function_call"),
    (
        "parallel-tool-calls",
        CHAT,
        {"messages": USER, "parallel_tool_calls": "x"},
        "parallel_tool_calls",
    ),
    ("n-too-many", C, {"prompt": "hi", "n": 17}, "n"),
    ("chat-n-zero", CHAT, {"messages": USER, "n": 0}, "n"),
    ("best-of-below-n", C, {"prompt": "hi", "n": 3, "best_of": 2}, "best_of"),
    ("best-of-streamed", C, {"prompt": "hi", "best_of": 2, "stream": True}, "best_of"),
    ("suffix", C, {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("logprobs-top-21", C, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    (
        "top-logprobs-21",
        CHAT,
        {"messages": USER, "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ("top-logprobs-alone", CHAT, {"messages": USER, "top_logprobs": 3}, "top_logprobs"),
    ("presence-penalty-range", C, {"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    (
        "frequency-penalty-range",
        CHAT,
        {"messages": USER, "frequency_penalty": -3},
        "frequency_penalty",
    ),
    ("logit-bias-key", C, {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("logit-bias-past-vocab", C, {"prompt": "hi", "logit_bias": {"999999": 1}}, "logit_bias"),
    ("logit-bias-range", CHAT, {"messages": USER, "logit_bias": {"5": 101}}, "logit_bias"),
    ("audio", CHAT, {"messages": USER, "audio": {"voice": "x", "format": "wav"}}, "audio"),
    ("modalities", CHAT, {"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
    ("prediction", CHAT, {"messages": USER, "prediction": {"type": "content"}}, "prediction"),
    ("reasoning-effort", CHAT, {"messages": USER, "reasoning_effort": "high"}, "reasoning_effort"),
    ("web-search", CHAT, {"messages": USER, "web_search_options": {}}, "web_search_options"),
    ("min-p", C, {"prompt": "hi", "min_p": 0.1}, "min_p"),
    ("repetition-penalty-zero", C, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("min-tokens-negative", C, {"prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ("beam-search", C, {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ("guided-json-number", C, {"prompt": "hi", "guided_json": 5}, "guided_json"),
    (
        "tool-calls-in-history",
        CHAT,
        {"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "1"}]}]},
        "messages[1].tool_calls[0].function",
    ),
]


@pytest.mark.parametrize(
    "path, body, param", [u[1:] for u in UNSUPPORTED], ids=[u[0] for u in UNSUPPORTED]
)
def test_an_unsupported_field_is_400_naming_it(router, path, body, param):
    err = assert_error(post(router, path, body), 400, param)
    assert err["type"] == "invalid_request_error"


# What OpenAI clients send for fields they leave unset: accepted.
UNSET: list[tuple[str, str, dict[str, Any]]] = [
    ("nulls", C, {"prompt": "hi", **dict.fromkeys(
        ["logit_bias", "suffix", "logprobs", "best_of", "n", "echo", "presence_penalty",
         "frequency_penalty", "user", "seed", "stop", "min_p", "repetition_penalty",
         "min_tokens", "use_beam_search", "guided_json", "stream_options", "top_logprobs"])}),
    ("chat-nulls", CHAT, {"messages": USER, **dict.fromkeys(
        ["logit_bias", "response_format", "tools", "tool_choice", "functions", "function_call",
         "parallel_tool_calls", "n", "audio", "modalities", "prediction", "reasoning_effort",
         "web_search_options", "top_logprobs", "logprobs", "metadata", "store"])}),
    ("defaults", C, {"prompt": "hi", "logit_bias": {}, "suffix": "", "n": 1, "best_of": 1,
                     "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0,
                     "logprobs": 1, "min_p": 0, "repetition_penalty": 1,
                     "min_tokens": 0, "use_beam_search": False}),
    ("chat-defaults", CHAT, {"messages": USER, "tools": [], "tool_choice": "none",
                             "functions": [], "function_call": "none",
                             "parallel_tool_calls": False, "response_format": {"type": "text"},
                             "modalities": ["text"], "logprobs": True, "top_logprobs": 0,
                             "user": "u1", "metadata": {"k": "v"}, "store": False}),
    ("chat-auto", CHAT, {"messages": USER, "tool_choice": "auto", "function_call": "auto",
                         "parallel_tool_calls": True}),
    ("assistant-null-tool-calls", CHAT, {"messages": [
        *USER, {"role": "assistant", "content": "x", "tool_calls": None},
        {"role": "user", "content": "y"}]}),
]  # fmt: skip


@pytest.mark.parametrize("path, body", [u[1:] for u in UNSET], ids=[u[0] for u in UNSET])
def test_unset_fields_sent_as_null_or_default_are_accepted(router, path, body):
    r = post(router, path, body)
    assert r.status_code == 503, r.text  # valid: it reached dispatch
