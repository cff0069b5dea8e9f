"""Bad input over real HTTP: a router app served by uvicorn on 127.0.0.1,
asked as a new user would ask it.

Every malformed or unsupported request is a 4xx with an OpenAI-shaped JSON
body naming the field, never a 500; no error echoes an exception's text. The
router points at 127.0.0.1:1 (nothing listens there), so a request that
passes validation gets 503: that is how "accepted" is told from "refused".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from router import RouterConfig, build_app
from router.errors import install_error_handlers
from tests.cluster import free_port

NOBODY = "127.0.0.1:1"
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
LONE = "\ud800"  # an unpaired surrogate: valid JSON ("\ud800"), not valid Unicode


class ServedApp:
    """An ASGI app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from engine.builtin_model import make_model

    return make_model(tmp_path_factory.mktemp("router") / "tiny", preset="tiny", arch="llama")


@pytest.fixture(scope="module")
def router(model_dir) -> Iterator[ServedApp]:
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,), api_key=KEY))
    served = ServedApp(app)
    yield served
    served.stop()


def post(router: ServedApp, path: str, body: Any, headers: dict[str, Any] | None = None):
    """POST `body` as JSON with ASCII escapes, so a lone surrogate travels as
    the six characters \\ud800 (httpx's own encoder would fail on it)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("ascii")
    h = {**AUTH, "content-type": "application/json", **(headers or {})}
    return httpx.post(router.url + path, content=raw, headers=h, timeout=30)


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
        # The message names the field too, for clients that show only it.
        assert param.split("[")[0].split(".")[-1] in err["message"]
    return err


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


# -- the Authorization header ------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff", b"\xff\xfe", b"Bearer s3cr\xe9t", "Bearer s3cr\u00e9t".encode()],
    ids=["0xff", "only-high-bytes", "latin1", "utf8"],
)
def test_a_non_ascii_authorization_header_is_401(router, value):
    r = httpx.post(
        router.url + C,
        content=b'{"prompt": "hi"}',
        headers=[(b"content-type", b"application/json"), (b"authorization", value)],
        timeout=30,
    )
    err = assert_error(r, 401, None)
    assert err["code"] == "invalid_api_key"


def test_the_right_key_still_works(router):
    assert post(router, C, {"prompt": "hi"}).status_code == 503  # past auth: no workers


def test_a_non_ascii_key_is_compared_as_bytes(model_dir):
    key = "cl\u00e9"
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,), api_key=key))
    served = ServedApp(app)
    try:
        url = served.url + "/v1/models"
        ok = httpx.get(url, headers=[(b"authorization", f"Bearer {key}".encode())], timeout=30)
        assert ok.status_code == 200, ok.text
        bad = httpx.get(url, headers=[(b"authorization", b"Bearer cl\xe9")], timeout=30)
        assert_error(bad, 401, None)
    finally:
        served.stop()


# -- fields the server does not implement --------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

UNSUPPORTED: list[tuple[str, str, dict[str, Any], str]] = [
    ("logit-bias", C, {"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
    ("chat-logit-bias", CHAT, {"messages": USER, "logit_bias": {"5": -100}}, "logit_bias"),
    (
        "response-format-json",
        CHAT,
        {"messages": USER, "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        "response-format-schema",
        CHAT,
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {}}},
        "response_format",
    ),
    ("tools", CHAT, {"messages": USER, "tools": [TOOL]}, "tools"),
    (
        "tools-required",
        CHAT,
        {"messages": USER, "tools": [TOOL], "tool_choice": "required"},
        "tools",
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
    ("n", C, {"prompt": "hi", "n": 2}, "n"),
    ("chat-n", CHAT, {"messages": USER, "n": 4}, "n"),
    ("best-of", C, {"prompt": "hi", "best_of": 3}, "best_of"),
    ("echo", C, {"prompt": "hi", "echo": True}, "echo"),
    ("suffix", C, {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("logprobs-top-5", C, {"prompt": "hi", "logprobs": 5}, "logprobs"),
    ("top-logprobs", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ("presence-penalty", C, {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ("frequency-penalty", CHAT, {"messages": USER, "frequency_penalty": -1}, "frequency_penalty"),
    ("audio", CHAT, {"messages": USER, "audio": {"voice": "x", "format": "wav"}}, "audio"),
    ("modalities", CHAT, {"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
    ("prediction", CHAT, {"messages": USER, "prediction": {"type": "content"}}, "prediction"),
    ("reasoning-effort", CHAT, {"messages": USER, "reasoning_effort": "high"}, "reasoning_effort"),
    ("web-search", CHAT, {"messages": USER, "web_search_options": {}}, "web_search_options"),
    ("min-p", C, {"prompt": "hi", "min_p": 0.1}, "min_p"),
    ("repetition-penalty", C, {"prompt": "hi", "repetition_penalty": 1.3}, "repetition_penalty"),
    ("min-tokens", C, {"prompt": "hi", "min_tokens": 4}, "min_tokens"),
    ("beam-search", C, {"prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ("guided-json", C, {"prompt": "hi", "guided_json": {"type": "object"}}, "guided_json"),
    (
        "tool-calls-in-history",
        CHAT,
        {"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "1"}]}]},
        "messages[1].tool_calls",
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


# -- no internal text in errors ------------------------------------------------------


def test_a_crash_is_a_500_without_the_exception_text():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret at /srv/internal/path.py")

    served = ServedApp(app)
    try:
        r = httpx.get(served.url + "/boom", timeout=30)
    finally:
        served.stop()
    err = assert_error(r, 500, None)
    assert err["type"] == "server_error"
    assert "secret" not in r.text and "RuntimeError" not in r.text


def test_deeply_nested_json_is_400_without_internal_text(router):
    body = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = assert_error(post(router, C, body), 400, None)
    assert "recursion" not in err["message"].lower()


BREAKING_TEMPLATE = (
    "{% if messages[0]['content'] == 'refuse' %}{{ raise_exception('roles must alternate') }}"
    "{% elif messages[0]['content'] == 'crash' %}{{ (1 // 0) }}{% endif %}"
)


def test_a_failing_chat_template_is_400_without_internal_text(model_dir, tmp_path):
    """A template that refuses the messages (raise_exception, meant for the
    user) is a 400 with its message; one that crashes is a 400 that says
    so without the exception's text."""
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "tiny"
    shutil.copytree(model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = BREAKING_TEMPLATE + tok.chat_template
    tok.save_pretrained(other)
    app = build_app(RouterConfig(model=str(other), decode_addresses=(NOBODY,)))
    served = ServedApp(app)
    try:
        say = lambda text: [{"role": "user", "content": text}]  # noqa: E731
        r = httpx.post(served.url + CHAT, json={"messages": say("refuse")}, timeout=30)
        err = assert_error(r, 400, "messages")
        assert "roles must alternate" in err["message"]
        r = httpx.post(served.url + CHAT, json={"messages": say("crash")}, timeout=30)
        err = assert_error(r, 400, "messages")
        assert "chat template" in err["message"]
        assert "ZeroDivision" not in r.text and "division" not in r.text
        r = httpx.post(served.url + CHAT, json={"messages": say("fine")}, timeout=30)
        assert r.status_code == 503, r.text
    finally:
        served.stop()


# -- tokenization runs off the event loop ---------------------------------------------


def test_tokenizing_a_large_body_leaves_the_loop_free(model_dir):
    """While a large prompt is being tokenized, the router keeps answering:
    the tokenizer is held inside encode until another request has been
    answered (were it on the event loop, nothing else could be)."""
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,)))
    tok = app.state.served.tokenizer
    inside, release = threading.Event(), threading.Event()
    real_encode = tok.encode

    def held_encode(text: str, *args: Any, **kwargs: Any) -> Any:
        if len(text) > 100_000:
            inside.set()
            release.wait(60)
        return real_encode(text, *args, **kwargs)

    tok.encode = held_encode
    served = ServedApp(app)
    try:
        result: dict[str, Any] = {}

        def big() -> None:
            body = {"prompt": "hello " * 30_000, "max_tokens": 1}  # 180 KB
            result["r"] = httpx.post(served.url + C, json=body, timeout=120)

        t = threading.Thread(target=big)
        t.start()
        assert inside.wait(60)
        r = httpx.get(served.url + "/v1/models", timeout=60)
        answered_while_held = not release.is_set()
        release.set()
        t.join(120)
        assert r.status_code == 200 and answered_while_held
        # The large prompt itself was tokenized in full and judged on it.
        assert_error(result["r"], 400, "prompt")
        assert "context length" in result["r"].json()["error"]["message"]
    finally:
        release.set()
        served.stop()


def test_results_are_the_same_on_and_off_the_loop(model_dir):
    """A prompt tokenized off the loop (large body) is tokenized as it is
    inline (small body): the 400 for a too-long prompt counts its tokens,
    and the count is the tokenizer's own."""
    from transformers import AutoTokenizer

    from router.preprocess import OFF_LOOP_BYTES

    tok = AutoTokenizer.from_pretrained(model_dir)
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,)))
    served = ServedApp(app)
    try:
        for words in (1000, 30_000):  # a body under OFF_LOOP_BYTES, and one far over it
            text = "hello wörld " * words
            assert (len(text.encode()) < OFF_LOOP_BYTES) == (words == 1000)
            n = len(tok.encode(text))
            assert n >= 1024  # over the context: the answer states the count
            r = httpx.post(served.url + C, json={"prompt": text}, timeout=120)
            assert f"prompt has {n} tokens" in r.json()["error"]["message"]
            chat = [{"role": "user", "content": text}]
            out: Any = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            r = httpx.post(served.url + CHAT, json={"messages": chat}, timeout=120)
            assert f"prompt has {len(ids)} tokens" in r.json()["error"]["message"]
    finally:
        served.stop()


def test_preparation_runs_in_a_thread_only_for_large_bodies(model_dir):
    from router.preprocess import OFF_LOOP_BYTES

    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,)))
    tok = app.state.served.tokenizer
    threads: list[str] = []
    real_encode = tok.encode

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_encode(text, *args, **kwargs)

    tok.encode = spy
    served = ServedApp(app)
    try:
        httpx.post(served.url + C, json={"prompt": "hi"}, timeout=30)
        httpx.post(served.url + C, json={"prompt": "a " * OFF_LOOP_BYTES}, timeout=60)
    finally:
        served.stop()
    assert len(threads) == 2
    assert threads[0] == served.thread.name  # small: inline, on the loop's thread
    assert threads[1] != served.thread.name  # large: in the preparation thread
